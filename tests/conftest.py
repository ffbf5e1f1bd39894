"""Shared fixtures: tiny generated image folders and a tiny recipe, so tests run in seconds."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Converted inference networks go to a per-session folder, not the user's cache.
os.environ.setdefault("TRANSFERKIT_CACHE", tempfile.mkdtemp(prefix="tk-cache-"))

import pytest

from transferkit.data.synthetic import write_shapes_dataset

# Small everything: 32 px is VGG's minimum, one tiny dense layer, one epoch per stage.
TINY = {
    "weights": "none",
    "image_size": 32,
    "batch_size": 8,
    "head.units": [16],
    "stages.0.epochs": 1,
    "stages.1:.epochs": 1,
}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """Three classes x 10 images, 40 px JPEGs."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", 3, 10, size=40, seed=1)


@pytest.fixture(scope="session")
def binary_dir(tmp_path_factory):
    """Two classes x 10 images, 40 px PNGs."""
    return write_shapes_dataset(
        tmp_path_factory.mktemp("binary") / "data", ["circle", "square"], 10, size=40, seed=2,
        extension=".png",
    )


@pytest.fixture()
def tiny():
    """Recipe overrides for a seconds-long run."""
    return dict(TINY)
