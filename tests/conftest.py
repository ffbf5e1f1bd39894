"""Shared fixtures: tiny generated image folders and a tiny recipe, so tests run in seconds.

Also the ``needs_fast_bfloat16`` marker: a test that only means something where the CPU
computes bfloat16 (AMX-BF16 or AVX512-BF16; elsewhere a bf16 precision hint runs in float32)
carries it, says so in its name, and is skipped, with the reason, on other CPUs.
"""

from __future__ import annotations

import functools
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


@functools.cache
def fast_bfloat16() -> tuple[bool, str]:
    """(whether this machine computes bfloat16 fast, why), as transferkit's "auto" precision
    decides it (``transferkit.runtime.resolve_precision``, from the CPU flags): the one
    source of that fact, and the one to monkeypatch (``runtime.cpu_flags``) to emulate a CPU
    without it."""
    from transferkit.runtime import resolve_precision

    policy, reason = resolve_precision("auto")
    return policy == "mixed_bfloat16", reason


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs_fast_bfloat16: only meaningful where the CPU computes bfloat16 (AMX-BF16 or "
        "AVX512-BF16); skipped elsewhere",
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_fast_bfloat16") is not None:
        fast, reason = fast_bfloat16()
        if not fast:
            pytest.skip(f"needs a CPU with fast bfloat16 (AMX-BF16 or AVX512-BF16), which this one lacks ({reason}); "
                        "a bfloat16 hint computes in float32 here")


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
