"""Numeric precision: which Keras dtype policy a run trains and predicts in.

``auto`` picks mixed bfloat16 where the hardware runs it fast (CPUs with AMX or AVX512-BF16,
GPUs of compute capability 8.0 or newer) and float32 elsewhere. Mixed policies keep weights
in float32 and compute in 16 bits; the preprocessing and output layers stay float32.
``int8`` trains in float32 and runs the forward-only work (the feature cache, predict,
evaluate) in int8 on OpenVINO, checked against float32 first (``inference.int8``); where the
CPU has no fast bfloat16, ``auto`` does so too when the work is large enough to pay.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

# The choice tables: recipes, the CLI's --help and the engines all read these.
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
ENGINES = ("auto", "keras", "openvino")

# Recipe precision -> Keras dtype policy.
# int8 is for forward passes only: its training (and any Keras forward pass) is float32.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16", "int8": "float32"}


# TRANSFERKIT_TEST_CPU=avx2: the tests and benchmarks run as on a CPU without AVX-512, AMX or
# AVX-VNNI (the AVX2-only AMD EPYC Zen 3 machines): this machine's flags are read without those.
EMULATED_CPU_VARIABLE = "TRANSFERKIT_TEST_CPU"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo"), emulated: bool = True) -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is missing).

    Args:
        cpuinfo: where to read them; default /proc/cpuinfo.
        emulated: with ``TRANSFERKIT_TEST_CPU=avx2`` set, leave AVX-512, AMX and AVX-VNNI out of
            /proc/cpuinfo's flags (any other file is read as it is); default True.
    """
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if emulated and os.environ.get(EMULATED_CPU_VARIABLE) == "avx2" and Path(cpuinfo) == Path("/proc/cpuinfo"):
        flags = {flag for flag in flags if not flag.startswith(("avx512", "amx")) and flag != "avx_vnni"}
    return flags


# int8 dot products that cannot saturate: AVX512-VNNI, AVX-VNNI, AMX-INT8. Without them (AVX2-only
# CPUs such as AMD Zen 3, AVX-512 CPUs before Cascade Lake) the CPU adds pairs of u8 x s8
# products in 16 bits, which saturate where 8-bit weights use their whole range.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# ONEDNN_MAX_CPU_ISA values below the first VNNI one (oneDNN's names; OpenVINO obeys it too).
ISAS_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def int8_saturates(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU's int8 convolutions can saturate: it has no VNNI (as under
    ``TRANSFERKIT_TEST_CPU=avx2``), or oneDNN is capped below VNNI by ``ONEDNN_MAX_CPU_ISA``.

    Such a CPU needs int8 weights in 7 bits (NNCF's overflow fix on every layer): with 8,
    VGG16's features under the AVX2 cap measured 0.13 from float32 against 0.06 with 7.
    Where the flags cannot be read (no /proc/cpuinfo), 7 bits too: they cost little on a CPU
    with VNNI (0.062 -> 0.063 on the same features), 8 bits cost much on one without.
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ISAS_WITHOUT_VNNI:
        return True
    return not cpu_flags(cpuinfo) & set(VNNI_FLAGS)


# CPU flags with which TensorFlow runs its oneDNN kernels by default (TF_ENABLE_ONEDNN_OPTS unset).
ONEDNN_DEFAULT_FLAGS = frozenset({"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"})
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def tensorflow_onednn() -> bool:
    """Whether TensorFlow runs (or, not yet imported, will run) its oneDNN kernels in this
    process: ``TF_ENABLE_ONEDNN_OPTS`` "1" or "0" where set, else TensorFlow's default (on
    CPUs with one of ``ONEDNN_DEFAULT_FLAGS``)."""
    setting = os.environ.get(ONEDNN_VARIABLE, "").strip().lower()
    if setting in ("1", "true"):
        return True
    if setting in ("0", "false"):
        return False
    return bool(ONEDNN_DEFAULT_FLAGS & cpu_flags())


def onednn_worth_turning_on(flags: set[str]) -> bool:
    """Whether a CPU with these flags is one where TensorFlow leaves its oneDNN kernels off
    and transferkit turns them on (``prefer_onednn``): x86 with AVX2, none of
    ``ONEDNN_DEFAULT_FLAGS``."""
    return "avx2" in flags and not flags & ONEDNN_DEFAULT_FLAGS


def prefer_onednn() -> bool:
    """Turn TensorFlow's oneDNN kernels on (``TF_ENABLE_ONEDNN_OPTS=1``) on an x86 CPU where
    TensorFlow leaves them off by default (AVX2 without AVX512-VNNI, AVX512-BF16, AVX-VNNI or
    AMX: AMD Zen 3, older Intel), before TensorFlow is imported and where the variable is not
    set (``TF_ENABLE_ONEDNN_OPTS=0`` keeps them off).

    TensorFlow's own kernels are slow at the small maps of a fine stage on cached features:
    under oneDNN's AVX2 cap a ResNet50 fine-stage step (conv5_block3 on 2x2 maps, batch 32)
    took 322 ms without oneDNN, 595 ms compiled by XLA and 67 ms with oneDNN; VGG16's block5
    (4x4 maps) 356, 140 and 136 ms.

    Returns:
        Whether it set the variable.
    """
    if ONEDNN_VARIABLE in os.environ or "tensorflow" in sys.modules:
        return False
    if not onednn_worth_turning_on(cpu_flags()):
        return False
    os.environ[ONEDNN_VARIABLE] = "1"
    return True


def onednn_left_off() -> bool:
    """Whether TensorFlow runs without its oneDNN kernels on a CPU where ``prefer_onednn`` would
    have turned them on but could not: TensorFlow was imported before transferkit (``import
    keras`` first, in a script or notebook) and ``TF_ENABLE_ONEDNN_OPTS`` is unset (set to 0 it
    is the user's choice). Its own kernels then train a fine stage several times slower
    (ResNet50's: 322 ms a step, 595 ms under XLA, against 67 ms with oneDNN)."""
    return (ONEDNN_VARIABLE not in os.environ and "tensorflow" in sys.modules
            and onednn_worth_turning_on(cpu_flags()))


ONEDNN_LEFT_OFF = (
    "TensorFlow was imported before transferkit, so its oneDNN kernels stay off on this CPU (AVX2 without "
    "AVX512-VNNI, AVX512-BF16 or AMX): fine stages train several times slower (ResNet50's up to 9x); import "
    "transferkit before TensorFlow or Keras, or start Python with TF_ENABLE_ONEDNN_OPTS=1 (=0 keeps them off "
    "without this notice)"
)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as Linux reports it ("unknown" where /proc/cpuinfo is missing)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# The CPU flags with which mixed bfloat16 runs fast, in the order "auto" names them, and their names.
FAST_BFLOAT16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def machine_facts() -> dict:
    """What a benchmark figure depends on: the CPU model, its core count and its 16-bit
    features (AMX / AVX512-BF16: mixed bfloat16 runs fast only where they are present)."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "fast_bfloat16": sorted(flag for flag in flags if flag in FAST_BFLOAT16_FLAGS),
        # oneDNN (TensorFlow's and OpenVINO's kernels) capped to an older instruction set, as
        # ONEDNN_MAX_CPU_ISA=AVX2 runs them as on a CPU without AVX-512.
        **({"onednn_max_cpu_isa": os.environ["ONEDNN_MAX_CPU_ISA"]} if os.environ.get("ONEDNN_MAX_CPU_ISA") else {}),
    }


def check_engine_choice(engine, precision) -> None:
    """Refuse an engine or precision name outside the choices, as a library call may give
    one (the command line checks its flags itself).

    Args:
        engine: one of ``ENGINES``, or an engine object (passed over).
        precision: one of ``PRECISIONS``.

    Raises:
        EngineError: naming the value and the choices.
    """
    from transferkit.errors import EngineError

    if isinstance(engine, str) and engine not in ENGINES:
        raise EngineError(f"engine {engine!r}: choose {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r}: choose {', '.join(PRECISIONS)}")


def resolve_precision(choice: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, str]:
    """Turn a recipe's precision into a Keras dtype policy name and the reason for it.

    Args:
        choice: "auto", "float32", "bfloat16", "float16" or "int8" (float32 training).
        cpuinfo: where to read CPU flags; default /proc/cpuinfo.

    Returns:
        (policy, reason), e.g. ("mixed_bfloat16", "auto: CPU has AMX-BF16").
    """
    if choice == "int8":
        return "float32", "int8 asked for: training in float32, forward-only work in int8 where it passes its check"
    if choice != "auto":
        return POLICIES[choice], "set in the recipe"
    from transferkit.backend import gpu_capabilities

    for capability in gpu_capabilities():
        if capability and tuple(capability) >= (8, 0):
            return "mixed_bfloat16", f"auto: GPU compute capability {capability[0]}.{capability[1]}"
        return "float32", "auto: GPU without fast bfloat16"
    flags = cpu_flags(cpuinfo)
    for flag, name in FAST_BFLOAT16_FLAGS.items():
        if flag in flags:
            return "mixed_bfloat16", f"auto: CPU has {name}"
    return "float32", "auto: no fast bfloat16 on this CPU"


@contextlib.contextmanager
def dtype_policy(policy: str):
    """Build layers under a Keras dtype policy, restoring the previous one afterwards.

    Layers keep the policy they were built with, so it need not stay global.
    """
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def gpu_visible() -> bool:
    """Whether the Keras backend of this process sees a GPU."""
    from transferkit.backend import gpu_capabilities

    return bool(gpu_capabilities())


class KerasRetracingFilter(logging.Filter):
    """Drops TensorFlow's warning that Keras's train, test or predict function was traced again.

    Keras makes those functions anew for every model it compiles, so a process that trains
    several models (a notebook's runs, the stages of one run, tune's trials) traces each anew by
    design; TensorFlow takes the fifth such trace in its window for a retracing mistake and
    warns ("... triggered tf.function retracing. Tracing is expensive ...") at every one after.
    Only the warnings that name Keras's trainer functions are dropped: a function of the
    user's own that retraces is still reported.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and "TensorFlowTrainer" in message)


@contextlib.contextmanager
def quieter_loggers(levels: Mapping[str, int]):
    """For the block, each named logger shows only records of at least its level in
    ``levels`` (never more than it showed before); then its own level again, errors included.

    Args:
        levels: logger name -> the lowest level shown, e.g. {"absl": logging.ERROR}.
    """
    loggers = [(logging.getLogger(name), level) for name, level in levels.items()]
    saved = [(logger, logger.level) for logger, _ in loggers]
    for logger, level in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def quiet_keras_retracing() -> None:
    """Put one ``KerasRetracingFilter`` on TensorFlow's logger (done when transferkit is
    imported; TensorFlow itself is not imported)."""
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(known, KerasRetracingFilter) for known in logger.filters):
        logger.addFilter(KerasRetracingFilter())


@contextlib.contextmanager
def held_stderr():
    """File descriptor 2 held for the block (C++ libraries, TensorFlow's start-up and its
    converters, write there directly, past Python's ``sys.stderr``): what was written is
    dropped when the block succeeds or is interrupted (Ctrl-C, SIGTERM: the start-up lines
    say nothing about that) and written out when it fails, so an error keeps its context.
    ``TRANSFERKIT_DEBUG`` set: nothing is held."""
    if os.environ.get("TRANSFERKIT_DEBUG"):
        yield
        return
    import tempfile

    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            except KeyboardInterrupt:
                raise
            except BaseException:
                os.dup2(saved, 2)
                held.seek(0)
                os.write(2, held.read())
                raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# The signal (SIGINT, SIGTERM) the command line's handler last turned into a KeyboardInterrupt:
# that exception can be lost (Python ignores exceptions raised in a garbage-collection
# callback, such as one JAX registers), so training looks here before it starts.
_NOTED_SIGNAL: list[str] = []


def interrupt_on_signal(signum, frame) -> None:
    """A signal handler: note the signal, then raise ``KeyboardInterrupt`` as Python's own
    SIGINT handler does."""
    import signal

    _NOTED_SIGNAL[:] = [signal.Signals(signum).name]
    raise KeyboardInterrupt


def take_noted_signal() -> str | None:
    """The signal ``interrupt_on_signal`` noted since the last call (its name), or None; the
    note is cleared."""
    noted = _NOTED_SIGNAL[0] if _NOTED_SIGNAL else None
    _NOTED_SIGNAL.clear()
    return noted


def import_without_torch(name: str, torch_parts: tuple[str, ...]):
    """Import a package without its optional PyTorch parts, where torch is installed but not
    imported: albumentations and NNCF import theirs, and torch with them (1.2-1.5 s of a
    process's start), each in a ``suppress(ImportError)`` that skips a part that cannot be
    imported. transferkit uses none of them. The parts can still be imported afterwards by
    the caller's own code; where torch is imported already, nothing is left out.

    Args:
        name: the package ("albumentations", "nncf").
        torch_parts: its modules that import torch.

    Returns:
        The package's module.
    """
    if name in sys.modules or "torch" in sys.modules:
        return importlib.import_module(name)
    left_out = [part for part in torch_parts if part not in sys.modules]
    for part in left_out:
        sys.modules[part] = None  # an ImportError for that import alone
    try:
        return importlib.import_module(name)
    finally:
        for part in left_out:
            if part in sys.modules and sys.modules[part] is None:
                del sys.modules[part]


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN, CUDA probing) hidden.

    Those lines are written before TensorFlow's own log level applies, straight to file
    descriptor 2, so only a redirect hides them. Where TensorFlow is not installed, nothing
    happens. ``TRANSFERKIT_DEBUG`` set: nothing hidden.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ.get("TRANSFERKIT_DEBUG"):
        return
    with held_stderr():
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            pass


class FirstImportHook(importlib.abc.MetaPathFinder):
    """Changes how one module runs at its first import, whenever something makes it: the
    module's own loader, found by the finders after this one, is wrapped by ``wrap`` (a
    ``WrappedLoader``). It takes itself off at that import.

    The command line puts one on ``sys.meta_path`` for TensorFlow (``quiet_tensorflow_import``:
    its C++ start-up chatter hidden, as ``import_tensorflow_quietly`` hides it) instead of
    importing TensorFlow before each command, so that a mistake found before Keras is needed (a
    recipe key, a run folder that does not exist) is told at once, not after seconds of
    TensorFlow's start-up; ``keras_private.hide_tensorflow_from_keras`` puts one on Keras's
    lazy modules.

    Args:
        name: the module's full name.
        wrap: ``loader -> loader``.
    """

    def __init__(self, name: str, wrap: Callable):
        self.name, self.wrap = name, wrap

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # by the finders after this one
        if spec is not None and spec.loader is not None:
            spec.loader = self.wrap(spec.loader)
        return spec


def hook_first_import(name: str, wrap: Callable) -> None:
    """A ``FirstImportHook`` for ``name`` on ``sys.meta_path``, unless one is there already."""
    if not any(isinstance(finder, FirstImportHook) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, FirstImportHook(name, wrap))


class WrappedLoader(importlib.abc.Loader):
    """A module's own loader, its module run inside ``around()`` and then handed to ``then``;
    the module keeps its own loader afterwards."""

    def __init__(self, loader, around: Callable = contextlib.nullcontext, then: Callable | None = None):
        self.loader, self.around, self.then = loader, around, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        with self.around():
            self.loader.exec_module(module)
        if self.then is not None:
            self.then(module)


def quiet_tensorflow_import() -> None:
    """Hide the C++ start-up chatter of TensorFlow's import whenever it comes (a
    ``FirstImportHook`` on ``sys.meta_path``); nothing where TensorFlow is imported already
    or ``TRANSFERKIT_DEBUG`` is set."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ.get("TRANSFERKIT_DEBUG") or "tensorflow" in sys.modules:
        return
    hook_first_import("tensorflow", lambda loader: WrappedLoader(loader, around=held_stderr))
