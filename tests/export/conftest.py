"""Trained runs the export tests share (a three-class softmax and a two-class sigmoid tiny
VGG16) and, per run, every format exported once and checked."""

from __future__ import annotations

import pytest

import transferkit
from tests.conftest import TINY


@pytest.fixture(scope="session")
def shapes_run(shapes_dir, tmp_path_factory):
    """A tiny three-class run on ``shapes_dir`` (softmax output)."""
    return transferkit.finetune(shapes_dir, None, TINY, output=tmp_path_factory.mktemp("export") / "shapes", verbose=0)


@pytest.fixture(scope="session")
def binary_run(binary_dir, tmp_path_factory):
    """A tiny two-class run on ``binary_dir`` (one sigmoid unit)."""
    return transferkit.finetune(binary_dir, None, TINY, output=tmp_path_factory.mktemp("export") / "binary", verbose=0)


@pytest.fixture(scope="session")
def shapes_exports(shapes_run, shapes_dir, tmp_path_factory):
    """Every format of the three-class run, checked against its validation split."""
    folder = tmp_path_factory.mktemp("shapes-exports")
    return {result.format: result for result in transferkit.export_run(shapes_run, "all", folder, data=shapes_dir)}


@pytest.fixture(scope="session")
def binary_exports(binary_run, tmp_path_factory):
    """Every format of the two-class run, checked on generated images (no data folder)."""
    folder = tmp_path_factory.mktemp("binary-exports")
    return {result.format: result for result in transferkit.export_run(binary_run, "all", folder)}
