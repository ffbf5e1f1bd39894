"""Shared fixtures: tiny generated image folders and a tiny recipe, so tests run in seconds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# TRANSFERKIT_TEST_CPU=avx2 runs the suite as on a CPU without AVX-512, AMX or bfloat16 (the
# AMD EPYC Zen 3 machines): TensorFlow without its oneDNN kernels (it enables them only on
# CPUs with AVX512-VNNI/BF16 or AMX) and transferkit reading no fast-bfloat16 flag, so "auto"
# precision is float32 everywhere. (OpenVINO still sees the real CPU: where a test asks it
# for bfloat16 it gets it here, and float32 on a CPU without bfloat16, as OpenVINO falls back.)
EMULATED_CPU = os.environ.get("TRANSFERKIT_TEST_CPU", "")
if EMULATED_CPU == "avx2":
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"

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


@pytest.fixture(scope="session", autouse=True)
def emulated_cpu():
    """With TRANSFERKIT_TEST_CPU=avx2, the CPU flags transferkit reads lack AMX and AVX512."""
    if EMULATED_CPU != "avx2":
        yield
        return
    import transferkit.runtime

    real = transferkit.runtime.cpu_flags

    def without_avx512(cpuinfo=Path("/proc/cpuinfo")):
        flags = real(cpuinfo)
        if Path(cpuinfo) != Path("/proc/cpuinfo"):
            return flags  # a test's own cpuinfo file
        return {flag for flag in flags if not flag.startswith(("avx512", "amx"))}

    transferkit.runtime.cpu_flags = without_avx512
    yield
    transferkit.runtime.cpu_flags = real


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
