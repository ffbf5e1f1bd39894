"""Distribution strategies: on how many devices a run trains, chosen once per process.

    none           one device (TensorFlow's own placement: the GPU when there is one)
    mirrored       tf.distribute.MirroredStrategy: one replica per local GPU, or, on a CPU,
                   per logical CPU device (``devices`` of them, configured before TensorFlow
                   starts); each step splits the recipe's batch (the global batch) across
                   the replicas and averages their gradients
    data-parallel  several processes (one per machine, or per accelerator) on Keras's JAX
                   backend: keras.distribution.DataParallel over the devices of every
                   process, joined by keras.distribution.initialize() from Keras's
                   KERAS_DISTRIBUTION_* variables or from Slurm (srun); each process trains
                   on its share of the images (its part of every global batch, a
                   PyDataset: no TensorFlow needed), and process 0 alone writes the run
                   folder
    auto           data-parallel when a KERAS_DISTRIBUTION_* variable is set, mirrored when
                   TensorFlow sees more than one GPU (or when ``devices`` > 1 asks for
                   several devices on a CPU), else none (always none with Keras on JAX or
                   PyTorch: mirrored is TensorFlow's, and TensorFlow is not imported there)

Each strategy is a row of ``BUILDERS``; ``resolve_distribution`` turns a recipe's
``strategy`` and ``devices`` into a ``Distribution`` (the same object for the same request
within a process) whose ``scope()`` every model build and compile enters.

Under data-parallel every process runs the same command; ``Distribution.process`` tells
process 0 (which checkpoints and writes the run) from the others (which train, then wait for
the run to be written: ``training.data_parallel``).

TensorFlow's multi-worker strategy is not offered: Keras 3's ``fit`` fails under it
(keras#20585; tests/test_strategies.py pins the failure so that the day Keras fixes it shows).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transferkit.backend import requested_backend
from transferkit.errors import StrategyError

# The choice table: the recipe, the CLI's --help and the errors read it.
STRATEGIES = ("auto", "none", "mirrored", "data-parallel")

# Keras's own variables for several processes (keras.distribution.initialize reads them).
KERAS_DISTRIBUTION_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
# What jax.distributed reads to join the processes of an srun step by itself.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclass(frozen=True)
class Distribution:
    """How a run trains across devices.

    Attributes:
        name: "none", "mirrored" or "data-parallel".
        devices: the devices the replicas run on, e.g. ("/gpu:0", "/gpu:1"); one for none.
        reason: why this strategy (the request, or what ``auto`` saw).
        requested: the recipe's strategy as given ("auto", ...); default: ``name``.
        process: this process's index among those that train together (data-parallel;
            0 writes the run); default 0.
        processes: how many processes train together; default 1.
        strategy: what ``scope()`` enters: a ``tf.distribute.Strategy`` (or, for a
            data-parallel row, a ``keras.distribution.Distribution``, which has a ``scope()``
            too), or None (one device).
    """

    name: str
    devices: tuple[str, ...]
    reason: str
    requested: str = ""
    strategy: Any = field(default=None, compare=False, repr=False)
    process: int = 0
    processes: int = 1

    @property
    def replicas(self) -> int:
        """Replicas each step's batch is split across."""
        return max(1, len(self.devices))

    @property
    def synchronizes_batchnorm(self) -> bool:
        """Whether training BatchNorm layers should compute their batch statistics across
        the replicas (TensorFlow's ``synchronized``): under a mirrored strategy of several
        replicas, so that a step normalises over the global batch as one device would."""
        return self.name == "mirrored" and self.replicas > 1

    def scope(self):
        """A context in which models are built and compiled for this strategy (a no-op for
        one device)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def describe(self) -> str:
        """One line, e.g. "mirrored over 2 devices (/cpu:0, /cpu:1)"."""
        if self.name == "none":
            return f"none (one device, {self.devices[0]})" if self.devices else "none (one device)"
        across = f" in {self.processes} processes" if self.processes > 1 else ""
        return f"{self.name} over {self.replicas} device(s){across} ({', '.join(self.devices)})"

    def as_dict(self) -> dict:
        """What labels.json records: name, what was asked, replicas, devices (processes, when
        several) and why."""
        record = {"name": self.name, "requested": self.requested or self.name, "replicas": self.replicas,
                  "devices": list(self.devices), "reason": self.reason}
        if self.processes > 1:
            record["processes"] = self.processes
        return record


def keras_distribution_variables(environ=None) -> list[str]:
    """The KERAS_DISTRIBUTION_* variables set (non-empty) in the environment."""
    environ = os.environ if environ is None else environ
    return [name for name in KERAS_DISTRIBUTION_VARIABLES if environ.get(name)]


def check_devices(devices: int | str) -> None:
    """Raise ``StrategyError`` for a device count that is neither "all" nor at least 1."""
    if devices != "all" and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise StrategyError(f"--devices {devices!r}: give a number of devices, at least 1 (or leave it out for "
                            "all the GPUs TensorFlow sees)")


# --- the strategies -----------------------------------------------------------------------


def _one_device(devices: int | str, reason: str) -> Distribution:
    if devices != "all" and devices > 1:
        raise StrategyError(f"--devices {devices} asks for several devices, which --strategy none does not use; "
                            "use --strategy mirrored (or auto), or drop --devices")
    if requested_backend() != "tensorflow":
        from transferkit.backend import gpu_capabilities

        return Distribution("none", ("/gpu:0" if gpu_capabilities() else "/cpu:0",), reason)
    import tensorflow as tf

    where = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
    return Distribution("none", (where,), reason)


def _mirrored(devices: int | str, reason: str) -> Distribution:
    if requested_backend() != "tensorflow":
        raise StrategyError(f"--strategy mirrored is TensorFlow's (tf.distribute), and Keras runs on "
                            f"{requested_backend()} here; run it with KERAS_BACKEND=tensorflow, or drop --strategy "
                            "and --devices to train on one device")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = len(gpus) if devices == "all" else devices
        if count > len(gpus):
            raise StrategyError(f"--devices {devices}: TensorFlow sees {len(gpus)} GPU(s) on this machine; use "
                                f"--devices {len(gpus)} or fewer (or leave it out for all of them)")
        names = tuple(f"/gpu:{index}" for index in range(count))
    else:
        if devices == "all":
            raise StrategyError("--strategy mirrored: TensorFlow sees no GPU here; on a CPU give --devices N to "
                                "train on N logical CPU devices (or use --strategy none)")
        names = tuple(f"/cpu:{index}" for index in range(_logical_cpus(devices)))
    return Distribution("mirrored", names, reason, strategy=_mirrored_strategy(names))


def check_data_parallel(devices: int | str = "all", environ=None, reason: str = "") -> None:
    """Raise ``StrategyError`` unless data-parallel can start here: Keras on JAX, and the
    processes to join named by the three KERAS_DISTRIBUTION_* variables or by Slurm.

    Args:
        devices: the recipe's device count; data-parallel takes every device ("all").
        environ: the environment to read; default ``os.environ``.
        reason: why data-parallel (``choose_strategy``'s), told when ``auto`` chose it.

    Raises:
        StrategyError: off the JAX backend, some variables set but not all, none set and
            no Slurm step, or ``devices`` given.
    """
    environ = os.environ if environ is None else environ
    backend = requested_backend()
    chosen = f" ({reason})" if reason.startswith("auto") else ""
    if backend != "jax":
        raise StrategyError(f"--strategy data-parallel{chosen} runs on Keras's JAX backend (keras.distribution), "
                            f"and Keras runs on {backend} here; start every process with KERAS_BACKEND=jax (or unset "
                            "the KERAS_DISTRIBUTION_* variables and use --strategy mirrored for the GPUs of one "
                            "machine)")
    given = keras_distribution_variables(environ)
    if given and len(given) < len(KERAS_DISTRIBUTION_VARIABLES):
        missing = [name for name in KERAS_DISTRIBUTION_VARIABLES if name not in given]
        raise StrategyError(f"--strategy data-parallel: {', '.join(given)} set but not {', '.join(missing)}; set "
                            "all three in every process (docs/backends.md: Scale out)")
    if not given and not all(environ.get(name) for name in SLURM_VARIABLES):
        raise StrategyError("--strategy data-parallel needs the processes to join: set "
                            f"{', '.join(KERAS_DISTRIBUTION_VARIABLES)} in every process, or start them with srun "
                            "under Slurm (docs/backends.md: Scale out)")
    if devices != "all":
        raise StrategyError(f"--devices {devices}: data-parallel trains on every device of every process; drop "
                            "--devices (start fewer processes, or hide devices with CUDA_VISIBLE_DEVICES)")


@contextlib.contextmanager
def _signals_end_at_once():
    """SIGINT and SIGTERM with their default action (end the process) while the process
    waits inside C code for the others to join: a Python handler would only run once the
    wait returns, minutes later when a partner never comes. Only from the main thread."""
    import signal
    import threading

    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {number: signal.signal(number, signal.SIG_DFL) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def _data_parallel(devices: int | str, reason: str) -> Distribution:
    check_data_parallel(devices, reason=reason)
    import keras

    if keras.distribution.distribution() is None:
        try:
            with _signals_end_at_once():
                keras.distribution.initialize()  # reads KERAS_DISTRIBUTION_*, or Slurm through jax.distributed
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StrategyError(f"--strategy data-parallel: the processes could not join ({first}); check "
                                f"{', '.join(KERAS_DISTRIBUTION_VARIABLES)} in every process") from None
        # transferkit hands each process its own share of every batch (``data.batches``),
        # so Keras must not shard the input again. (Its sharding takes only tf.data: with it
        # on, Keras would refuse the share, a PyDataset, and need TensorFlow.)
        keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
    parallel = keras.distribution.distribution()
    import jax

    names = tuple(str(device) for device in parallel.device_mesh.devices.flatten())
    return Distribution("data-parallel", names, reason, strategy=parallel, process=jax.process_index(),
                        processes=jax.process_count())


# Strategy name -> builder(devices, reason) -> Distribution. A new strategy is one row here
# and one name in STRATEGIES.
BUILDERS: dict[str, Callable[[int | str, str], Distribution]] = {
    "none": _one_device,
    "mirrored": _mirrored,
    "data-parallel": _data_parallel,
}


def choose_strategy(choice: str, devices: int | str = "all", environ=None) -> tuple[str, str]:
    """Which strategy a request means, and why (``auto`` looks at the environment and the GPUs).

    Args:
        choice: one of ``STRATEGIES``.
        devices: the recipe's device count, or "all"; default "all".
        environ: the environment to read; default ``os.environ``.

    Returns:
        (name, reason), e.g. ("mirrored", "auto: TensorFlow sees 4 GPUs").

    Raises:
        StrategyError: an unknown choice or a bad device count.
    """
    if choice not in STRATEGIES:
        raise StrategyError(f"--strategy {choice!r}: choose {', '.join(STRATEGIES[:-1])} or {STRATEGIES[-1]}")
    check_devices(devices)
    if choice != "auto":
        return choice, f"--strategy {choice}" + (f" --devices {devices}" if devices != "all" else "")
    variables = keras_distribution_variables(environ)
    if variables:
        return "data-parallel", f"auto: {', '.join(variables)} set"
    backend = requested_backend()
    if backend != "tensorflow":  # mirrored is TensorFlow's: one device on JAX and PyTorch
        from transferkit.backend import gpu_capabilities

        if devices != "all" and devices > 1:
            raise StrategyError(f"--devices {devices}: several devices in one process is TensorFlow's mirrored "
                                f"strategy, and Keras runs on {backend} here; run with KERAS_BACKEND=tensorflow, "
                                "or drop --devices")
        gpus = len(gpu_capabilities())
        return "none", f"auto: Keras on {backend}, which sees {gpus or 'no'} GPU{'' if gpus == 1 else 's'}"
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    seen = f"TensorFlow sees {gpus or 'no'} GPU{'' if gpus == 1 else 's'}"
    if devices != "all" and devices > 1:
        return "mirrored", f"auto: --devices {devices} ({seen})"
    if gpus > 1 and devices == "all":
        return "mirrored", f"auto: {seen}"
    return "none", f"auto: {seen}" + (", --devices 1" if devices == 1 else "")


_RESOLVED: dict[tuple[str, int | str], Distribution] = {}


def require_one_process(choice: str, devices: int | str, command: str) -> None:
    """Refuse data-parallel for a command that runs in one process (tune, lr-find, doctor
    --model), before any process joins the others.

    Args:
        choice, devices: the recipe's ``strategy`` and ``devices``.
        command: the command, for the message ("tune").

    Raises:
        StrategyError: the request means data-parallel (asked for, or ``auto`` with the
            KERAS_DISTRIBUTION_* variables set).
    """
    name, reason = choose_strategy(choice, devices)
    if name == "data-parallel":
        raise StrategyError(f"data-parallel ({reason}) is for finetune and --resume; {command} trains in one "
                            "process: run it with --strategy none and without the KERAS_DISTRIBUTION_* variables")


def resolve_distribution(choice: str = "auto", devices: int | str = "all") -> Distribution:
    """The ``Distribution`` for a recipe's ``strategy`` and ``devices``, set up once per process.

    Call it before TensorFlow runs its first operation when it may configure logical CPU
    devices (``mirrored`` with ``devices`` on a CPU): TensorFlow fixes its devices then.
    Asked again for the same request, it returns the same object (the same strategy).

    Args:
        choice: one of ``STRATEGIES``; default "auto".
        devices: how many devices (GPUs, or logical CPU devices on a CPU), or "all" (every
            GPU TensorFlow sees); default "all".

    Returns:
        A ``Distribution``.

    Raises:
        StrategyError: a bad choice or count, more devices than the machine has, logical
            CPU devices asked for after TensorFlow started with fewer, or data-parallel
            off the JAX backend or without the processes to join.
    """
    key = (choice, devices)
    if key not in _RESOLVED:
        name, reason = choose_strategy(choice, devices)
        built = BUILDERS[name](devices, reason)
        _RESOLVED[key] = Distribution(built.name, built.devices, built.reason, choice, built.strategy,
                                      built.process, built.processes)
    return _RESOLVED[key]


@contextlib.contextmanager
def alone():
    """A block that one process runs on its own while Keras's distribution is set
    (data-parallel): the distribution is unset in it, so that what it creates (saving a model
    makes a variable) is not placed across every process, which would wait for the others.
    A no-op without a distribution, or off the JAX backend."""
    if requested_backend() != "jax":
        yield
        return
    import keras

    current = keras.distribution.distribution()
    if current is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


def _logical_cpus(count: int) -> int:
    """Split the CPU into ``count`` logical devices (TensorFlow allows it before it starts);
    where it started already with as many, use those."""
    import tensorflow as tf

    cores = os.cpu_count() or 1
    if count > cores:
        raise StrategyError(f"--devices {count}: this CPU has {cores} core(s); use --devices {cores} or fewer "
                            "(logical CPU devices share the cores)")
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu) or []
    if len(configured) < count:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            have = len(tf.config.list_logical_devices("CPU"))
            if have < count:
                raise StrategyError(
                    f"--devices {count}: TensorFlow started in this process with {have} logical CPU device(s) "
                    "before the strategy was chosen, and its devices cannot change now; choose the strategy "
                    "first in a fresh process (the transferkit command does)") from None
    return count


# One tf.distribute strategy per device set and process (creating one is not free, and the
# models built under one must be fitted under the same).
_MIRRORED: dict[tuple[str, ...], Any] = {}


def _mirrored_strategy(devices: tuple[str, ...]):
    if devices not in _MIRRORED:
        import tensorflow as tf

        _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _MIRRORED[devices]
