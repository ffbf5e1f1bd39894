"""Trained runs the evaluation tests share: one three-class and one two-class tiny VGG16."""

from __future__ import annotations

import pytest

import transferkit
from tests.conftest import TINY


@pytest.fixture(scope="session")
def shapes_run(shapes_dir, tmp_path_factory):
    """A tiny three-class run on ``shapes_dir`` (softmax output)."""
    return transferkit.finetune(shapes_dir, None, TINY, output=tmp_path_factory.mktemp("eval") / "shapes", verbose=0)


@pytest.fixture(scope="session")
def binary_run(binary_dir, tmp_path_factory):
    """A tiny two-class run on ``binary_dir`` (one sigmoid unit)."""
    return transferkit.finetune(binary_dir, None, TINY, output=tmp_path_factory.mktemp("eval") / "binary", verbose=0)
