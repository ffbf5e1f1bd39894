"""A run's predict engine rebuilt from its record: a warm predict loads no Keras.

The first predict of a run builds its engine from the Keras model: BatchNorm folded, the
network converted (and quantized and checked for int8), all cached by fingerprint in the
run's engine cache. Loading the model needs Keras and TensorFlow, about 5 s of imports on a
2-core CPU before the first image, every time. So once the engine is built, what it is made
of is recorded (``warm/{key}.json`` in the run's engine cache: which cached networks, at
which precision, with which int8 check), keyed by everything that chose it: the model
file's digest, the image size, the engine and precision asked for, whether int8 was worth
trying, the CPU's relevant flags, and the OpenVINO and transferkit versions. A later predict
with the same key rebuilds the engine from those networks with OpenVINO alone; each
network's fingerprint file must still say what it said when recorded, or the usual path
runs. The usual path also runs for anything not recorded: the Keras engine, a rejection
score's embedding engine, a machine with a GPU device (which Keras may use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from transferkit.files import write_atomic

log = logging.getLogger("transferkit")

WARM_FOLDER = "warm"
RECORD_REVISION = 2  # raised when what a record holds or how it was chosen changes: older records are not read
#                    (2: an int8 classifier's speed counts its near ties' float32 pass)
# The CPU flags that choose an engine's precision ("auto": bfloat16 where fast) or its int8 kernels.
CHOOSING_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")


def record_key(model_file: Path, image_size: int, engine: str, precision: str, int8_worth: bool) -> str | None:
    """The key an engine built for these choices is recorded under; None where no record is
    kept or read: a GPU device is present (the Keras backend may run on it) or OpenVINO does
    not import.

    Args:
        model_file: the run's model file (its bytes are digested).
        image_size: the side of the images the engine takes.
        engine, precision: as asked for ("auto", "openvino"; "auto", "float32", ...).
        int8_worth: whether int8 is tried (``inference.int8.worth_int8``; with ``gpu=False``
            it answers without the Keras backend, and where a GPU device is present no key
            is made).

    Returns:
        32 hex digits, or None.
    """
    if engine == "keras" or any(os.path.exists(device) for device in GPU_DEVICES):
        return None
    try:
        from transferkit.inference.openvino import import_openvino

        openvino_version = import_openvino().get_version()
    except ImportError:
        return None
    from transferkit import __version__
    from transferkit.runtime import cpu_flags

    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(model_file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError:
        return None
    flags = sorted(cpu_flags() & set(CHOOSING_FLAGS))
    digest.update(json.dumps([RECORD_REVISION, image_size, engine, precision, bool(int8_worth), flags,
                              openvino_version, __version__]).encode())
    return digest.hexdigest()


def recorded_engine(cache_dir: Path, key: str):
    """The engine recorded under ``key``, rebuilt from its cached networks; None where there
    is no record, or a network it names is gone or was converted again since."""
    path = Path(cache_dir) / WARM_FOLDER / f"{key}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        engine = _rebuild(record)
    except Exception as error:  # a record that no longer holds: the usual path
        log.debug("engine record %s not used: %s", path, error)
        return None
    if engine is not None:
        says = record.get("says", "OpenVINO")
        # int8 is told (auto chose it, from its check); the plain engine only with -v, as when built
        (log.info if "int8" in says else log.debug)("inference engine: %s, as recorded for this model (Keras not "
                                                    "loaded)", says)
    return engine


def keep_record(cache_dir: Path, key: str, engine) -> bool:
    """Record what ``engine`` is made of under ``key`` (where it is made of cached OpenVINO
    networks only: ``describe``); a 16-bit classifier's float32 engine for near ties is built
    now if it was not yet, so that the record is whole.

    Returns:
        Whether a record was written.
    """
    record = describe(engine)
    if record is None:
        return False
    record["says"] = _says(engine)
    folder = Path(cache_dir) / WARM_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{key}.json", json.dumps(record, indent=1))
    except OSError as error:  # a cache that cannot be written: nothing recorded, nothing lost
        log.debug("engine record not written: %s", error)
        return False
    return True


def describe(engine) -> dict | None:
    """What an engine is made of, as a JSON-ready dict; None for an engine that is not made
    of cached OpenVINO networks alone."""
    from transferkit.inference.engines import ChainedEngine, OpenVINOEngine
    from transferkit.inference.int8 import Int8Engine

    if isinstance(engine, Int8Engine):
        parts = (_network(engine.int8), _network(engine.float32))
        if None in parts:
            return None
        return {"kind": "int8", "int8": parts[0], "float32": parts[1], "check": asdict(engine.check),
                "classifier": engine.classifier}
    if isinstance(engine, ChainedEngine):
        exact = engine.exact  # built now where it was not yet: the record is whole
        parts = (_network(engine.body), _network(engine.head), None if exact is None else _network(exact))
        if parts[0] is None or parts[1] is None or (exact is not None and parts[2] is None):
            return None
        return {"kind": "chained", "body": parts[0], "head": parts[1], "exact": parts[2]}
    if isinstance(engine, OpenVINOEngine):
        network = _network(engine)
        return None if network is None else {"kind": "openvino", "network": network}
    return None


def _network(engine) -> dict | None:
    """One OpenVINO engine's cached network: its .xml, what its fingerprint file says, and how
    it was compiled; None where it is not a cached network."""
    from transferkit.inference.engines import OpenVINOEngine

    if not isinstance(engine, OpenVINOEngine) or engine.ir_path is None:
        return None
    xml = Path(engine.ir_path)
    try:
        fingerprint = xml.with_suffix(".fingerprint").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return {"xml": str(xml), "fingerprint": fingerprint, "shape": list(engine.input_shape),
            "hint": engine.precision_hint, "input_dtype": engine.input_dtype}


def _rebuild(record: dict):
    from transferkit.inference.engines import ChainedEngine
    from transferkit.inference.int8 import Int8Check, Int8Engine, warn_if_slower

    kind = record["kind"]
    if kind == "openvino":
        return _engine(record["network"])
    if kind == "int8":
        int8, float32 = _engine(record["int8"]), _engine(record["float32"])
        check = Int8Check(**record["check"])
        warn_if_slower(check)
        return Int8Engine(int8, float32, check, record["classifier"])
    if kind == "chained":
        body, head = _engine(record["body"]), _engine(record["head"])
        exact = record.get("exact")
        return ChainedEngine(body, head, None if exact is None else (lambda: _engine(exact)))
    raise ValueError(f"unknown engine kind {kind!r}")


def _engine(network: dict):
    """The ``OpenVINOEngine`` of a recorded network, compiled as it was (its compiled form is
    cached beside it, so this loads rather than compiles)."""
    from transferkit.inference.engines import OpenVINOEngine
    from transferkit.inference.openvino import compile_network, openvino_core, uint8_input

    xml = Path(network["xml"])
    stored = xml.with_suffix(".fingerprint").read_text(encoding="utf-8").strip()
    if stored != network["fingerprint"] or not xml.with_suffix(".bin").is_file():
        raise ValueError(f"{xml} was converted again since it was recorded")
    model = openvino_core().read_model(str(xml))
    if network["input_dtype"] == "uint8":
        model = uint8_input(model)
    hint = network["hint"]
    compiled = compile_network(model, "f32" if hint == "int8" else hint, xml)  # int8: its quantized ops say so
    return OpenVINOEngine(compiled, tuple(network["shape"]), hint, xml, network["input_dtype"])


def _says(engine) -> str:
    """How the engine is told in the log line."""
    from transferkit.inference.int8 import Int8Engine

    if isinstance(engine, Int8Engine):
        return f"OpenVINO int8 ({engine.check.describe()})"
    return f"OpenVINO on CPU, {engine.precision_hint}"
