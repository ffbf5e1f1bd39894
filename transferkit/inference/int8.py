"""int8 forward passes where the CPU has no fast bfloat16, checked against float32 before use.

The frozen part's feature cache, predict, evaluate and TTA only run networks forward, and
on a CPU without AMX or AVX512-BF16 an int8 network (NNCF's post-training quantization,
calibrated on the run's own training images) runs them about twice as fast as float32 or
more. Rounding to 8 bits can hurt some networks, so an int8 network is used only after it
passed its check on held-back images, never among the calibration images:

- a classifier: its top-1 class (after its near ties are computed again in float32, as
  ``Int8Engine`` does for every image) agrees with float32 on at least ``AGREEMENT`` of them;
- a feature extractor (the frozen part): its features differ from float32 by at most
  ``FEATURE_ERROR`` (relative L2 norm over the sample).

Where it falls short the float32 network runs, with a one-line notice. (The feature
cache's int8 features are checked once more, by the head they train: ``training.int8_guard``.)
``precision="int8"``
asks for int8; ``"auto"`` takes it where the CPU has no fast bfloat16 and no GPU is in use
(``int8_candidate``), the work is large enough for quantizing to pay (``worth_int8``), and the
check also measured it at least ``AUTO_SPEEDUP`` times as fast as float32; it says so. The
int8 network and its check are cached beside the float32 network (``{name}-int8.xml`` and
``{name}-int8.check.json``), keyed by the network's fingerprint, so a warm start neither
quantizes nor checks again. The feature cache's frozen part (the same pretrained weights in
runs on any images) is keyed by its calibration and held-back images too
(``{name}-int8-{digest}.xml``): each data set gets a network calibrated and checked on its
own images, which runs and tune trials on the same images share.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from transferkit.files import write_atomic
from transferkit.inference.engines import (
    REFINE_MARGIN,
    ForwardEngine,
    OpenVINOEngine,
    TwoLookEngine,
    body_and_head,
    inference_engine,
    make_engine,
)
from transferkit.inference.openvino import compile_network, load_or_convert, uint8_input
from transferkit.outputs import predicted_labels, top_margin

log = logging.getLogger("transferkit")

AGREEMENT = 0.995  # a classifier's top-1 agreement with float32 on the held-back images
FEATURE_ERROR = 0.1  # a feature extractor's relative L2 difference from float32 (int8 of random-weight
#                      VGG16 and ResNet50 measured 0.02-0.07; one outlier channel 100x the rest: 0.23)
AUTO_SPEEDUP = 1.2  # "auto" keeps int8 only when it measured at least this much faster
AUTO_MIN_IMAGES = 1000  # "auto": fewer image passes than this stay float32 (quantizing costs ~2 passes
#                         over the calibration images, once per network)
CALIBRATION_IMAGES = 64
HELD_BACK_IMAGES = 64


@dataclass(frozen=True)
class Int8Samples:
    """The images an int8 network is calibrated and checked on.

    Attributes:
        calibration: uint8 (n, S, S, 3) training images NNCF gathers activation ranges on.
        held_back: uint8 (m, S, S, 3) other images (validation images where there are
            some) the int8 network is compared with float32 on.
    """

    calibration: np.ndarray
    held_back: np.ndarray

    def digest(self) -> str:
        """16 hex digits naming these images (their pixels and shapes)."""
        import hashlib

        digest = hashlib.blake2b(digest_size=8)
        for images in (self.calibration, self.held_back):
            array = np.ascontiguousarray(images)
            digest.update(repr((array.shape, str(array.dtype))).encode())
            digest.update(array.tobytes())
        return digest.hexdigest()


def samples_from(train_images: np.ndarray, other_images: np.ndarray, seed: int = 0) -> Int8Samples:
    """Calibration images drawn from the training images and held-back images from the others
    (topped up with unused training images when there are fewer than ``HELD_BACK_IMAGES``).

    Args:
        train_images, other_images: uint8 (n, S, S, 3) arrays (memory-mapped ones are read
            only where sampled).
        seed: which images are drawn; default 0.

    Returns:
        ``Int8Samples``.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_images))
    calibration = np.sort(order[:CALIBRATION_IMAGES])
    spare = np.sort(order[CALIBRATION_IMAGES:][: max(0, HELD_BACK_IMAGES - len(other_images))])
    others = np.sort(rng.permutation(len(other_images))[:HELD_BACK_IMAGES])
    held_back = np.concatenate([np.asarray(other_images[others]), np.asarray(train_images[spare])])
    return Int8Samples(np.asarray(train_images[calibration]), held_back.astype("uint8", copy=False))


def int8_candidate(precision: str, gpu: bool | None = None) -> bool:
    """Whether forward-only work in ``precision`` may run in int8: "int8", or "auto" where the
    CPU has no fast bfloat16 (where it has, bfloat16 is as fast and exact enough) and the
    Keras backend sees no GPU.

    Args:
        precision: the precision asked for.
        gpu: False where the caller knows there is no GPU: the CPU's flags decide, and the
            Keras backend is neither asked nor imported (a warm predict,
            ``inference.warm``); default None (the backend is asked).
    """
    if precision == "int8":
        return True
    if precision != "auto":
        return False
    from transferkit.runtime import FAST_BFLOAT16_FLAGS, cpu_flags, gpu_visible, resolve_precision

    if gpu is False:
        return not cpu_flags() & set(FAST_BFLOAT16_FLAGS)
    return resolve_precision("auto")[0] == "float32" and not gpu_visible()


def worth_int8(precision: str, image_passes: int, gpu: bool | None = None) -> bool:
    """Whether forward-only work of ``image_passes`` images should try int8: always when
    "int8" is asked for; for "auto", where ``int8_candidate`` (``gpu`` as it takes it) and the
    work is at least ``AUTO_MIN_IMAGES`` image passes."""
    return precision == "int8" or (image_passes >= AUTO_MIN_IMAGES and int8_candidate(precision, gpu))


@dataclass(frozen=True)
class Int8Check:
    """How an int8 network compared with float32 on held-back images.

    Attributes:
        measure: "top-1 agreement" (a classifier: at least ``bar``) or "feature error"
            (a feature extractor: at most ``bar``).
        value: what was measured.
        bar: the threshold.
        speedup: float32's time over int8's on those images (same batches, same process);
            for a classifier, int8's time includes the float32 pass over its near ties, as
            ``Int8Engine`` runs it (where most outputs are near ties, int8 is no faster).
        images: how many held-back images.
        margin: a classifier's near-tie margin: outputs whose top two probabilities are
            closer than this are computed again in float32 (twice the largest change int8
            made to that gap on the calibration images, at least ``REFINE_MARGIN``); 0 for
            a feature extractor.
        near_ties: a classifier's share of the held-back images within that margin; None
            for a feature extractor.
    """

    measure: str
    value: float
    bar: float
    speedup: float
    images: int
    margin: float = 0.0
    near_ties: float | None = None

    @property
    def passed(self) -> bool:
        return self.value >= self.bar if self.measure == "top-1 agreement" else self.value <= self.bar

    def describe(self) -> str:
        shown = f"{self.value:.2%}" if self.measure == "top-1 agreement" else f"{self.value:.4f}"
        bar = f"{self.bar:.1%}" if self.measure == "top-1 agreement" else f"{self.bar:g}"
        relation = ">=" if self.measure == "top-1 agreement" else "<="
        verdict = relation if self.passed else {">=": "<", "<=": ">"}[relation]
        near = f", near ties below {self.margin:.3f} in float32" if self.margin else ""
        if self.near_ties is not None:
            near += f" ({self.near_ties:.0%} of them)"
        return (f"{self.measure} with float32 {shown} {verdict} {bar} on {self.images} held-back images{near}, "
                f"{self.speedup:.2f}x as fast")


class Int8Engine(TwoLookEngine):
    """An int8 network that passed its check, with the float32 one it was checked against:
    a classifier's near ties are computed again in float32 (``TwoLookEngine``), so its top
    class agrees with float32 where int8 rounding could have changed it; a feature
    extractor's outputs are int8's.

    Attributes:
        int8, float32: the two ``OpenVINOEngine`` networks.
        check: the ``Int8Check`` it passed.
        classifier: whether its near ties are computed again in float32 (a classifier).
    """

    name = "openvino"
    precision_hint = "int8"

    def __init__(self, int8: OpenVINOEngine, float32: OpenVINOEngine, check: Int8Check, classifier: bool):
        super().__init__((lambda: float32) if classifier else None)
        self.int8, self.float32, self.check, self.classifier = int8, float32, check, classifier
        self.refine_margin = max(check.margin, REFINE_MARGIN)
        self.input_shape, self.ir_path = int8.input_shape, int8.ir_path

    @property
    def image_size(self) -> int:
        return self.int8.image_size

    def first_look(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.int8.predict(batch)
        if isinstance(outputs, list):  # a multi-output feature extractor: no near ties
            return outputs, np.zeros(0, dtype="int64")
        return outputs, self.near_ties(outputs)

    def __repr__(self) -> str:
        return f"<Int8Engine {self.int8!r}, {self.check.describe()}, refined={self.refined}>"


def forward_engine(model, engine: str = "auto", image_size: int | None = None, cache_dir=None,
                   precision: str = "auto", input_dtype: str = "float32",
                   int8_samples: Int8Samples | Callable[[], Int8Samples | None] | None = None) -> ForwardEngine:
    """``engines.inference_engine``, in int8 where it is asked for (or "auto" and worth it) and
    passes its check.

    Args:
        model, engine, image_size, cache_dir, input_dtype: as for ``inference_engine``.
        precision: "int8", or any precision ``inference_engine`` takes; default "auto".
        int8_samples: ``Int8Samples`` (or a function returning them, called only when the
            int8 network or its check is not cached) for precision "int8", or for "auto"
            where ``int8_candidate`` holds; the caller passes them where the work is large
            enough (``worth_int8``). Default None: no int8 ("int8" then runs float32, with a
            notice).

    Returns:
        An ``Int8Engine``, or the engine ``inference_engine`` builds.
    """
    from transferkit.model.fold import batchnorm_count, fold_batchnorm

    tries = precision == "int8" or (precision == "auto" and int8_samples is not None)
    if tries and int8_samples is not None and engine != "keras" and int8_candidate(precision):
        folded = fold_batchnorm(model, fold_trainable=True) if batchnorm_count(model) else model
        shape = (image_size, image_size, 3) if image_size else None
        exact = make_engine(folded, engine, input_shape=shape, cache_dir=cache_dir, precision="float32",
                            input_dtype=input_dtype)
        if isinstance(exact, OpenVINOEngine):
            return int8_engine(folded, exact, int8_samples, cache_dir, classifier=body_and_head(model) is not None,
                               auto=precision == "auto")
        precision = "float32"
    elif precision == "int8":
        log.warning("int8 runs on the OpenVINO engine, with images to calibrate on%s; running float32",
                    " (the Keras engine was asked for)" if engine == "keras" else "")
        precision = "float32"
    return inference_engine(model, engine, image_size, cache_dir=cache_dir, precision=precision,
                            input_dtype=input_dtype)


def int8_engine(model, float32: OpenVINOEngine, samples: Int8Samples | Callable[[], Int8Samples | None] | None,
                cache_dir, *, classifier: bool, auto: bool) -> OpenVINOEngine | Int8Engine:
    """The int8 engine for a model when it passes its check (and, for "auto", is faster),
    else ``float32`` with a one-line notice.

    Args:
        model: the Keras model ``float32`` was converted from (its BatchNorm folded).
        float32: its float32 ``OpenVINOEngine`` (the reference, and the near ties' engine).
        samples: ``Int8Samples``, or a function returning them (called only when the int8
            network or its check is not cached yet); None or a function returning None:
            no images to calibrate on, float32 is used. ``Int8Samples`` given as such key
            the cached int8 network and its check (``Int8Samples.digest``): a network that
            runs on other images in other runs (a pretrained frozen part) is calibrated and
            checked on each run's own; a function's are drawn only where nothing is cached
            (the first calibration of the network is kept: a run's own classifier).
        cache_dir: the engine cache folder (``SHARED`` included) or None.
        classifier: compare top-1 classes (True) or features (False).
        auto: int8 was not asked for: also require ``AUTO_SPEEDUP``, and say less when it
            is not used.

    Returns:
        An ``Int8Engine``, or ``float32``.
    """
    shape = float32.input_shape
    drawn: list[Int8Samples | None] = []

    def images() -> Int8Samples | None:
        if not drawn:
            drawn.append(samples() if callable(samples) else samples)
        return drawn[0]

    tell = log.info if auto else log.warning
    key = samples.digest() if isinstance(samples, Int8Samples) else ""
    try:
        network, xml = _quantized(model, shape, cache_dir, images, key)
    except ImportError as error:
        tell("int8 needs NNCF (%s): pip install nncf; running float32", error)
        return float32
    if network is None:
        tell("int8 needs the run's training images to calibrate on and none are available; running float32")
        return float32
    if float32.input_dtype == "uint8":
        network = uint8_input(network)
    int8 = OpenVINOEngine(compile_network(network, "f32", xml), shape, "int8", xml, float32.input_dtype)
    check = _cached_check(xml)
    if check is None:
        if images() is None:
            tell("int8: no held-back images to check the int8 network on; running float32")
            return float32
        check = measure(int8, float32, images().held_back, classifier, images().calibration)
        _keep_check(xml, check)
    if not check.passed:
        tell("int8 fell short of float32 (%s); running float32", check.describe())
        return float32
    if auto and check.speedup < AUTO_SPEEDUP:
        log.info("precision auto: int8 is not worth it here (%s); running float32", check.describe())
        return float32
    log.info("inference engine: OpenVINO int8, %s (%s)", "x".join(map(str, shape)), check.describe())
    warn_if_slower(check)
    return Int8Engine(int8, float32, check, classifier)


def warn_if_slower(check: Int8Check) -> None:
    """Warn where int8, asked for by name ("auto" runs float32 then), measured slower than
    float32: a classifier most of whose outputs are near ties, computed again in float32."""
    if check.near_ties is not None and check.speedup < 1:
        log.warning("int8 runs slower than float32 here (%.2fx as fast: most outputs are near ties, computed "
                    "again in float32); --precision auto or float32 is faster", check.speedup)


def _quantized(model, shape, cache_dir, images: Callable[[], Int8Samples | None], key: str = ""):
    """The int8 network from the cache, else quantized on the calibration images ((None,
    None) when there are none)."""

    def calibration() -> np.ndarray:
        if images() is None or not len(images().calibration):
            raise LookupError("no calibration images")  # found only when the int8 network is not cached
        log.info("quantizing %s to int8 on %d training images (NNCF; once: it is cached)",
                 getattr(model, "name", "the model"), len(images().calibration))
        return images().calibration

    try:
        return load_or_convert(model, shape, cache_dir, calibration=calibration, calibration_key=key)
    except LookupError:
        return None, None


def measure(int8, float32, images: np.ndarray, classifier: bool, calibration: np.ndarray | None = None,
            batch_size: int = 32) -> Int8Check:
    """Compare an int8 engine with its float32 one on images, timing both.

    Args:
        int8, float32: engines taking the same batches.
        images: held-back images (as the engines take them).
        classifier: compare top-1 classes, near ties computed again in float32 as
            ``Int8Engine`` does (True), or features (False: the relative L2 difference of
            each output, the worst one counting).
        calibration: a classifier's calibration images, on which the near-tie margin is
            measured (never on the held-back images it is then checked on); default None
            (``REFINE_MARGIN``).
        batch_size: images per pass; default 32.

    Returns:
        An ``Int8Check``.
    """

    def run(engine, batch_images, timed=False):
        """(one (n, ...) array per output, seconds)."""
        if timed:
            engine.predict(batch_images[:1])  # first-call costs out of the timing
        started = time.perf_counter()
        outputs = [engine.predict(batch_images[i : i + batch_size]) for i in range(0, len(batch_images), batch_size)]
        elapsed = time.perf_counter() - started
        if not isinstance(outputs[0], list):
            return [np.concatenate(outputs)], elapsed
        return [np.concatenate([batch[k] for batch in outputs]) for k in range(len(outputs[0]))], elapsed

    fast_outputs, fast_time = run(int8, images, timed=True)
    exact_outputs, exact_time = run(float32, images, timed=True)
    speedup = exact_time / max(fast_time, 1e-9)
    if classifier:
        (fast,), (exact,) = fast_outputs, exact_outputs
        margin = REFINE_MARGIN
        if calibration is not None and len(calibration):
            change = np.abs(top_margin(run(int8, calibration)[0][0]) - top_margin(run(float32, calibration)[0][0]))
            margin = float(min(max(2 * change.max(), REFINE_MARGIN), 1.0))
        fast = np.array(fast, copy=True)
        near = top_margin(fast) < margin
        fast[near] = exact[near]  # what Int8Engine computes again in float32
        agree = predicted_labels(fast) == predicted_labels(exact)
        share = float(np.mean(near))
        # As Int8Engine runs: its near ties pay for a float32 pass too.
        speedup = exact_time / max(fast_time + share * exact_time, 1e-9)
        return Int8Check("top-1 agreement", float(np.mean(agree)), AGREEMENT, speedup, len(images), margin, share)
    # Each output on its own (a network with several boundaries): the worst one counts, so
    # that a small deep output is not hidden by a large shallow one.
    error = max(float(np.linalg.norm(fast - exact) / max(np.linalg.norm(exact), 1e-12))
                for fast, exact in zip(fast_outputs, exact_outputs, strict=True))
    return Int8Check("feature error", error, FEATURE_ERROR, speedup, len(images))


def _check_file(xml: Path) -> Path:
    return xml.with_suffix(".check.json")


def _cached_check(xml: Path | None) -> Int8Check | None:
    """The check stored beside a cached int8 network, when it was made for this very network."""
    if xml is None:
        return None
    try:
        stored = json.loads(_check_file(xml).read_text(encoding="utf-8"))
        fingerprint = xml.with_suffix(".fingerprint").read_text(encoding="utf-8").strip()
        if stored.pop("fingerprint") != fingerprint:
            return None
        if stored["measure"] == "top-1 agreement" and stored.get("near_ties") is None:
            return None  # kept before near ties counted in the speed: measured again
        return Int8Check(**stored)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep_check(xml: Path | None, check: Int8Check) -> None:
    if xml is None:
        return
    try:
        fingerprint = xml.with_suffix(".fingerprint").read_text(encoding="utf-8").strip()
        write_atomic(_check_file(xml), json.dumps({**asdict(check), "fingerprint": fingerprint}) + "\n")
    except OSError as error:
        log.debug("cannot keep the int8 check beside %s: %s", xml, error)
