"""Shared fixtures: tiny generated image folders and a tiny recipe, so tests run in seconds.

Also the ``needs_fast_bfloat16`` marker: a test that only means something where the CPU
computes bfloat16 (AMX-BF16 or AVX512-BF16; elsewhere a bf16 precision hint runs in float32)
carries it, says so in its name, and is skipped, with the reason, on other CPUs.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The repository (what subprocesses put on PYTHONPATH or run in, to import ``tests.*`` helpers).
ROOT = Path(__file__).resolve().parent.parent
# The suite's small backbones, "tinyvgg" and "tinyresnet", as an installed package adds one
# (tests/plugins/transferkit_test_backbones.py): its folder on this process's path and on
# every process's it starts (the fork server's children inherit the path).
PLUGINS = ROOT / "tests" / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])])
# PYTHONPATH for a process that also imports ``tests.*`` helpers.
SUBPROCESS_PATH = os.pathsep.join([str(ROOT), str(PLUGINS)])
# XLA_FLAGS for the suite's JAX processes: their programs (hundreds: each op Keras runs
# eagerly, at each shape) compiled without LLVM's optimizations. For these tiny models
# compiling is most of a process's time (the JAX backend session: 24 -> 15 CPU seconds on an
# AMD EPYC), and what the tests check does not depend on how fast the programs run.
UNOPTIMIZED_XLA_FLAGS = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

# TRANSFERKIT_TEST_CPU=avx2 runs the suite as on a CPU without AVX-512, AMX or bfloat16 (the
# AMD EPYC Zen 3 machines): TensorFlow with its oneDNN kernels turned on, as transferkit turns
# them on there (``runtime.prefer_onednn``: TensorFlow alone enables them only on CPUs with
# AVX512-VNNI/BF16 or AMX), and transferkit reading no fast-bfloat16 flag
# (``runtime.cpu_flags`` leaves them out, in every process of the session), so "auto"
# precision is float32 everywhere. (OpenVINO still sees the real CPU: where a test asks it
# for bfloat16 it gets it here, and float32 on a CPU without bfloat16, as OpenVINO falls back.)
EMULATED_CPU = os.environ.get("TRANSFERKIT_TEST_CPU", "")
if EMULATED_CPU == "avx2":
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Under pytest-xdist (pyproject's addopts), each worker gets its share of the cores: TensorFlow
# and oneDNN threads beyond it would only contend with the other workers' (measured with
# TRANSFERKIT_TEST_CPU=avx2 on 2 cores, 2 workers: 8:11 with all cores each, 6:51 with one).
# Where the system allows it, each worker is also bound to its own cores (CPU affinity), so
# that what reads no thread variable (OpenVINO, XLA under JAX, NNCF) sizes its thread pools
# to them instead of spinning on the other workers' cores; subprocesses a test starts
# inherit both. On 2 cores (AMD EPYC, 2026-12-07): 794 CPU seconds and 7:42 against 863-913
# and 8:23-8:49 unbound, the same tests.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    _cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    _share = max(1, (len(_cores) or os.cpu_count() or 1) // _WORKERS)
    if _worker.startswith("gw") and _worker[2:].isdigit() and len(_cores) >= _WORKERS:
        _index = int(_worker[2:]) % _WORKERS  # worker k of N: the k-th of N near-equal runs of cores
        _mine = _cores[_index * len(_cores) // _WORKERS : (_index + 1) * len(_cores) // _WORKERS]
        os.sched_setaffinity(0, _mine)
        _share = len(_mine)
    for _name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, str(_share))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No test process sends OpenVINO's usage events (transferkit imports openvino with them off,
# and tests/inference/test_engines.py checks that in a process of its own; a test that imported
# openvino or nncf first would turn them on: each conversion would then try to reach the
# network, in a process of its own).
sys.modules.setdefault("openvino_telemetry", None)
# Converted inference networks go to a per-session folder, not the user's cache (made by the
# process that starts the session; its xdist workers inherit it; removed when it ends).
_SESSION_CACHE = None if os.environ.get("TRANSFERKIT_CACHE") else tempfile.mkdtemp(prefix="tk-cache-")
if _SESSION_CACHE is not None:
    os.environ["TRANSFERKIT_CACHE"] = _SESSION_CACHE

# The environment above must be set before these imports.
import pytest  # noqa: E402

import transferkit  # noqa: E402
import transferkit.runtime  # noqa: E402
from transferkit.data.synthetic import write_shapes_dataset  # noqa: E402

# Small everything: the suite's VGG-shaped backbone (``tinyvgg``: tests whose behaviour
# depends on the architecture name a real one), 32 px, one tiny dense layer, one epoch per stage. In
# float32 on every CPU ("auto" is mixed bfloat16 on AMX and AVX512-BF16 ones), so that what a
# test compares to float rounding (two passes of one model, Keras and an engine, two backends)
# is compared alike everywhere; the bfloat16 path has its own run (``bfloat16_run``) and tests.
TINY = {
    "backbone": "tinyvgg",
    "precision": "float32",
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


# The test files that take longest, longest first (measured on a 2-core AVX2 CPU, 2 workers).
# xdist hands files to the workers in collection order (pyproject: --dist loadfile,
# --no-loadscope-reorder), so the long ones start first and the short ones fill in at the
# end: the workers finish together instead of one waiting on a long file started last.
# The other files follow in their usual order; a new slow file belongs in this list.
LONGEST_FIRST = (
    "test_data_parallel.py",  # two pairs of real processes on loopback (Keras on JAX)
    "test_strategies.py", "test_backbone_families.py", "training/test_features.py", "tuning/test_search.py",
    "test_backends.py",
    "reliability/test_faults.py",
    "inference/test_engines.py", "training/test_checkpoint.py", "test_workflow.py", "training/test_stages.py",
    "training/test_budget.py", "inference/test_passes.py", "training/test_int8_guard.py",
    "export/test_roundtrip.py", "inference/test_predict.py", "tuning/test_workers.py", "model/test_fold.py",
    "cli/test_cli.py", "test_defaults_benchmark.py",
    "serve/test_server.py",  # one server process (TensorFlow's start-up) and a headless Chromium
    "tuning/test_diagnostics.py", "evaluation/test_tta.py", "export/test_cli.py",
    "export/test_quantize.py", "test_messy.py", "evaluation/test_gradcam.py", "model/test_surgery.py",
    "trust/test_open_set.py", "evaluation/test_evaluate.py", "model/test_classifier.py", "tuning/test_lr_find.py",
    "reliability/test_live_runs.py", "reliability/test_untrusted.py", "model/test_transfer.py",
    "test_backbones.py",
)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    here = Path(__file__).parent

    def place(item):
        try:
            return rank.get(item.path.relative_to(here).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=place)  # stable: each file's own tests keep their order


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_fast_bfloat16") is not None:
        fast, reason = fast_bfloat16()
        if not fast:
            pytest.skip(f"needs a CPU with fast bfloat16 (AMX-BF16 or AVX512-BF16), which this one lacks ({reason}); "
                        "a bfloat16 hint computes in float32 here")


# Session-wide things every xdist worker shares: each is made once, by the first worker that
# needs it, under a file lock, in the folder the workers' temporary folders share (with -n 0,
# this session's own), and the other workers use it as it is. A test never changes one.
def shared(tmp_path_factory, name: str, make) -> Path:
    """``<shared>/NAME/``, where ``make(folder)`` was run once this session (by this worker
    or another: the others wait for it)."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    (root / "locks").mkdir(parents=True, exist_ok=True)
    folder, done = root / name, root / "locks" / f"{name}.done"
    with open(root / "locks" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


class TensorFlowChecksForked:
    """``subprocess`` as ``transferkit.export.verify`` uses it, with the checks of the
    TensorFlow formats (``verify.SHARED_PROCESS``: a SavedModel, a .keras or .h5 file) forked
    from the suite's preloaded server (tests/forked.py), as the tests' own ``python -c``
    processes are: each would otherwise pay TensorFlow's and Keras's import (seconds of a
    core; about twenty in the suite). Still a process of its own that never imports
    transferkit. The other formats' checks (ONNX, LiteRT, OpenVINO) keep a fresh Python with
    their runtime alone: a file that loads only beside TensorFlow still fails there."""

    PIPE, STDOUT, DEVNULL, TimeoutExpired = subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL, \
        subprocess.TimeoutExpired

    @staticmethod
    def _starter(args):
        from tests import forked
        from transferkit.export.verify import SHARED_PROCESS

        job = str(args[-1])  # the job file, or "-": the shared process, TensorFlow's formats
        tensorflow = job == "-" or json.loads(Path(job).read_text(encoding="utf-8"))["format"] in SHARED_PROCESS
        return forked if tensorflow else subprocess

    def run(self, args, **options):
        return self._starter(args).run(args, **options)

    def Popen(self, args, **options):  # noqa: N802 - subprocess's name
        return self._starter(args).Popen(args, **options)


@pytest.fixture(scope="session", autouse=True)
def export_checks_forked():
    """The TensorFlow formats' export checks forked (``TensorFlowChecksForked``)."""
    from transferkit.export import verify

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify, "subprocess", TensorFlowChecksForked())
        yield


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """Three classes x 10 images, 40 px JPEGs."""
    return shared(tmp_path_factory, "shapes", lambda folder: write_shapes_dataset(
        folder / "data", 3, 10, size=40, seed=1)) / "data"


@pytest.fixture(scope="session")
def binary_dir(tmp_path_factory):
    """Two classes x 10 images, 40 px PNGs."""
    return shared(tmp_path_factory, "binary", lambda folder: write_shapes_dataset(
        folder / "data", ["circle", "square"], 10, size=40, seed=2, extension=".png")) / "data"


@pytest.fixture()
def tiny():
    """Recipe overrides for a seconds-long run."""
    return dict(TINY)


# Trained runs shared by every test that only reads one (predict, evaluate, export, transfer):
# one training each for the whole session. A test that changes a run copies it first.
@pytest.fixture(scope="session")
def shapes_run(shapes_dir, tmp_path_factory):
    """A tiny three-class run on ``shapes_dir`` (softmax output)."""
    return shared_run(tmp_path_factory, "shapes-run", shapes_dir)


@pytest.fixture(scope="session")
def binary_run(binary_dir, tmp_path_factory):
    """A tiny two-class run on ``binary_dir`` (one sigmoid unit)."""
    return shared_run(tmp_path_factory, "binary-run", binary_dir)


@pytest.fixture(scope="session")
def bfloat16_run(binary_dir, tmp_path_factory):
    """A tiny two-class run trained in mixed bfloat16 whatever the CPU ("auto" picks it only
    on some)."""
    return shared_run(tmp_path_factory, "bfloat16-run", binary_dir, {"precision": "bfloat16"})


def shared_run(tmp_path_factory, name: str, data_dir: Path, overrides: dict | None = None):
    """A run trained once per session (by whichever worker needs it first) on ``data_dir``
    with TINY and ``overrides``, in a folder of its own: ``<shared>/NAME/run``."""
    recipe = {**TINY, **(overrides or {})}

    def train(folder):
        transferkit.finetune(data_dir, None, recipe, output=folder / "run", verbose=0)

    return transferkit.load_run(shared(tmp_path_factory, name, train) / "run")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """A factory of fresh MLflow SQLite stores: ``mlflow_store(folder)`` -> a ``sqlite:///``
    tracking URI in that folder. Each is a copy of one store made once per session (MLflow's
    migrations take seconds when it creates a store)."""
    import shutil

    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables

    def new_store(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return new_store
