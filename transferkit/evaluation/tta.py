"""Test-time augmentation: average the probabilities of an image and a few fixed variants.

The variants come from the run's recipe (``[tta]``): "identity" (the image), "hflip" (its
mirror image, only when the run trained with horizontal flips: a model that never saw
mirrored images is not helped by them) and "shift" (four copies moved left, right, up and
down by ``tta.shift`` of the side, edges reflected as in training augmentation). Every
variant is deterministic, so a TTA prediction is reproducible.

``TTAEngine`` wraps any ``ForwardEngine`` (Keras, OpenVINO, chained): a batch of B images
becomes B x V variants that go through the inner engine in one call, then each image's V
outputs are averaged.

At the end of finetune, ``choose_transforms`` keeps only the transforms that help on the
validation split (the rule is in its docstring), on the engine the rejection fit shares
(``inference.passes``), and ``fit_tta`` records them in the run's metrics.json ("tta");
``--tta`` then averages over the kept ones (``run_variants``), and a run trained before
that record over its recipe's (as trained: ``training.flips.as_trained``). Where the run
trained with flips, ``training.flips.check_flips`` tells when mirrored images score clearly
worse than the originals (the flip changes the class: digits, left/right): finetune warns,
and so does ``doctor --model`` (``hflip = "auto"`` decides it during training instead).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from transferkit.inference.engines import ForwardEngine
from transferkit.inference.passes import ForwardPasses
from transferkit.outputs import class_probabilities
from transferkit.recipe import TTAConfig
from transferkit.training.flips import (
    DECISIVE,
    FLIP_ADVICE,
    JUDGE_ROUND,
    MAX_JUDGED_IMAGES,
    MIN_JUDGED_IMAGES,
    FlipCheck,
    check_flips,
    flipped_after_judging,
    image_log_losses,
    mean_log_loss,
)

log = logging.getLogger("transferkit")

SHIFTS = ("shift_left", "shift_right", "shift_up", "shift_down")
# A transform is kept when adding it raises the validation log loss by at most this much
# (nats): float rounding only, so that a tie (a mirror-symmetric image's flip is the image
# itself) keeps it.
KEEP_TOLERANCE = 1e-6
# Where the constants of the judgement live (``training.flips``): the flip check's rule, the
# fewest and most validation images judged, the rounds and when an answer is clear.


def tta_variants(run_recipe: dict | None) -> tuple[str, ...]:
    """The variant names a run's recipe asks for, "shift" expanded into its four shifts.

    Args:
        run_recipe: the run's resolved recipe as a dict (``Run.recipe``); None (a bare
            model file) gives the defaults without "hflip".

    Returns:
        Variant names, e.g. ("identity", "hflip", "shift_left", ..., "shift_down").
    """
    return tuple(name for _, variants in _transforms(run_recipe) for name in variants)


def _transforms(run_recipe: dict | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(transform, its variants) per transform of the recipe's ``tta.transforms``, in order;
    "hflip" only when the run trained with horizontal flips."""
    recipe = run_recipe or {}
    config = TTAConfig.model_validate(_tuples(recipe.get("tta", {})))
    return tuple((transform, SHIFTS if transform == "shift" else (transform,)) for transform in config.transforms
                 if transform != "hflip" or _flips(recipe))


def _flips(run_recipe: dict | None) -> bool:
    """Whether the run trained with horizontal flips (``augment.hflip``; for "auto", the
    recipe as trained, ``training.flips.as_trained``)."""
    return bool((run_recipe or {}).get("augment", {}).get("hflip", False))


def run_variants(run) -> tuple[str, ...]:
    """The variants ``--tta`` averages for a run: those its finetune kept (metrics.json
    "tta" "kept", see ``choose_transforms``), or, for a run trained before that record, one
    with too few validation images to judge on, or a bare model file, all its recipe's
    (``tta_variants``).

    Args:
        run: a ``Run``.

    Returns:
        Variant names, "identity" first when it was kept.
    """
    record = (run.metrics or {}).get("tta")
    if record and record.get("kept"):
        return tuple(record["kept"])
    recipe = run.recipe or {}
    hflip = (recipe.get("augment") or {}).get("hflip")
    if hflip == "auto" and not flipped_after_judging(hflip, (run.metrics or {}).get("hflip")):
        recipe = {**recipe, "augment": {**recipe["augment"], "hflip": False}}  # as trained (as_trained)
    return tta_variants(recipe)


def tta_shift(run_recipe: dict | None) -> float:
    """The recipe's ``tta.shift`` (fraction of the side each shift moves the image)."""
    return TTAConfig.model_validate(_tuples((run_recipe or {}).get("tta", {}))).shift


def _tuples(section: dict) -> dict:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in section.items()}


def transform_batch(batch: np.ndarray, variant: str, shift: float = 0.05) -> np.ndarray:
    """One variant of a (B, S, S, 3) batch, same dtype and shape.

    Args:
        batch: images, (B, H, W, C).
        variant: "identity", "hflip" or one of ``SHIFTS``.
        shift: fraction of the side a shift moves the image (at least one pixel); default 0.05.

    Returns:
        The transformed batch.

    Raises:
        ValueError: an unknown variant.
    """
    if variant == "identity":
        return batch
    if variant == "hflip":
        return batch[:, :, ::-1]
    if variant not in SHIFTS:
        raise ValueError(f"unknown TTA variant {variant!r}; choose identity, hflip or one of {', '.join(SHIFTS)}")
    height, width = batch.shape[1:3]
    axis = 2 if variant in ("shift_left", "shift_right") else 1
    side = width if axis == 2 else height
    d = max(1, int(round(shift * side)))
    d = min(d, side - 1)
    pad = [(0, 0)] * batch.ndim
    # Content moves left / up: the far edge is filled by reflection, and the near edge cut.
    forward = variant in ("shift_left", "shift_up")
    pad[axis] = (0, d) if forward else (d, 0)
    padded = np.pad(batch, pad, mode="reflect")
    index = [slice(None)] * batch.ndim
    index[axis] = slice(d, d + side) if forward else slice(0, side)
    return padded[tuple(index)]


class TTAEngine(ForwardEngine):
    """A ``ForwardEngine`` that averages another engine's outputs over fixed variants.

    Args:
        inner: the engine that runs the model (its ``predict`` gets all variants at once).
        variants: names as ``tta_variants`` gives them; default ("identity",).
        shift: fraction of the side a shift moves the image; default 0.05.

    Attributes:
        calls: how many times the inner engine was called.
    """

    def __init__(self, inner: ForwardEngine, variants: Sequence[str] = ("identity",), shift: float = 0.05):
        if not variants:
            raise ValueError("TTAEngine needs at least one variant")
        for variant in variants:
            transform_batch(np.zeros((1, 2, 2, 3), dtype="uint8"), variant, shift)  # fails on an unknown name
        self.inner, self.variants, self.shift = inner, tuple(variants), shift
        self.name = inner.name
        self.calls = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        count = len(batch)
        expanded = np.concatenate([transform_batch(batch, variant, self.shift) for variant in self.variants])
        self.calls += 1
        outputs = np.asarray(self.inner.predict(np.ascontiguousarray(expanded)), dtype="float32")
        # Variant-major: rows [v * B, (v + 1) * B) are variant v of the batch.
        return outputs.reshape(len(self.variants), count, *outputs.shape[1:]).mean(axis=0)

    def __repr__(self) -> str:
        return f"<TTAEngine {', '.join(self.variants)} over {self.inner!r}>"


def tta_engine(run, engine: str = "auto", precision: str = "auto", variants: Sequence[str] | None = None,
               images: int = 0) -> TTAEngine:
    """The TTA engine for a loaded run, over its inference engine.

    Args:
        run: a ``Run`` with its model.
        engine: "auto", "keras" or "openvino"; default "auto" (see ``inference_engine``).
        precision: the engine's precision; default "auto".
        variants: the variants to use; default the run's (``run_variants``: those its
            finetune kept, or its recipe's for an older run). When the run kept none but
            "identity", one warning says that ``--tta`` predicts without augmentation.
        images: how many images it will be given (each runs once per variant: int8 may be
            worth it, ``inference.predict.int8_samples_for``); default 0.

    Returns:
        A ``TTAEngine`` taking uint8 (B, S, S, 3) batches.
    """
    from transferkit.inference.int8 import forward_engine
    from transferkit.inference.openvino import claim_engine_cache
    from transferkit.inference.predict import int8_samples_for

    if variants is None:
        variants = run_variants(run)
        if variants == ("identity",) and ((run.metrics or {}).get("tta") or {}).get("kept"):
            log.warning("--tta: no test-time transform lowered this run's validation log loss at the end of "
                        "finetune (metrics.json \"tta\"), so it predicts without test-time augmentation")
    inner = forward_engine(run.model, engine, run.image_size, cache_dir=claim_engine_cache(run.path),
                           precision=precision, input_dtype="uint8",
                           int8_samples=int8_samples_for(run, precision, images * (1 + len(variants))))
    return TTAEngine(inner, variants, tta_shift(run.recipe))


# --- which transforms help: chosen at the end of finetune ---------------------------------


@dataclass(frozen=True)
class TransformTrial:
    """One TTA transform tried by ``choose_transforms``.

    Attributes:
        transform: its name in the recipe's ``tta.transforms`` ("hflip", "shift").
        variants: the variants it stands for.
        log_loss: the validation log loss of the average over the kept variants and these
            (on the images it was judged on).
        compared_with: that of the kept variants before it (plain prediction for the first).
        kept: whether it was kept.
        n_images: the validation images it was judged on (its trial ends once its effect
            is clear, see ``choose_transforms``).
    """

    transform: str
    variants: tuple[str, ...]
    log_loss: float
    compared_with: float
    kept: bool
    n_images: int


@dataclass(frozen=True)
class TTAChoice:
    """Which TTA transforms lower the validation log loss (metrics.json "tta").

    Attributes:
        kept: the variants ``--tta`` averages, "identity" first.
        plain_log_loss: the validation log loss of plain prediction (on ``n_images``).
        log_loss: that of the average over ``kept``.
        trials: one ``TransformTrial`` per transform tried, in the recipe's order.
        n_images: the validation images the last transform was judged on.
        flip: how mirrored images score, when the run trained with flips; else None.
    """

    kept: tuple[str, ...]
    plain_log_loss: float
    log_loss: float
    trials: tuple[TransformTrial, ...]
    n_images: int
    flip: FlipCheck | None = None

    def as_dict(self) -> dict:
        """JSON-ready, for metrics.json "tta"."""
        return {"kept": list(self.kept), "plain_log_loss": self.plain_log_loss, "log_loss": self.log_loss,
                "n_images": self.n_images,
                "transforms": [{**asdict(trial), "variants": list(trial.variants)} for trial in self.trials],
                "flip": self.flip.as_dict() if self.flip is not None else None}

    def summary(self) -> str:
        """One line: each transform's log loss against what it was compared with, and the choice."""
        if not self.trials:
            return "test-time augmentation: the recipe's tta.transforms name nothing beyond identity"
        tried = ", ".join(f"{trial.transform} {trial.compared_with:.4f} -> {trial.log_loss:.4f} "
                          f"({'kept' if trial.kept else 'dropped'}, {trial.n_images} images)" for trial in self.trials)
        return (f"test-time augmentation, validation log loss: {tried}; --tta averages "
                f"{', '.join(self.kept) if len(self.kept) > 1 else 'nothing but the image itself'}")


def choose_transforms(model, images: np.ndarray, labels: np.ndarray, run_recipe: dict | None,
                      batch_size: int = 32, plain: np.ndarray | None = None, seed: int = 0) -> TTAChoice:
    """Keep the recipe's TTA transforms that do not raise the validation log loss.

    The rule: start from plain prediction (the image alone: "identity" is always kept);
    try the recipe's transforms in the order of ``tta.transforms`` ("hflip" only when the
    run trained with flips; "shift" as its four shifts together); keep a transform when the
    log loss of the probabilities averaged over the kept variants and its own is at most
    that of the kept variants alone (plus ``KEEP_TOLERANCE``, float rounding). Each
    transform is so judged against what ``--tta`` would average without it, and the kept
    set never scores worse than plain prediction on the images judged. With flips in the
    recipe, ``check_flips`` compares the mirror images with the originals too.

    The images are judged in rounds (``JUDGE_ROUND``, in a seeded order), and a transform's
    trial ends as soon as its effect is clear: the mean change of the per-image log loss
    lies more than ``DECISIVE`` standard errors from the tolerance (else it goes on to the
    next round; on all the images the rule above decides). Its variants then stop being
    computed unless they were kept and a later transform is still on trial. The flip check
    goes on until it warns or has seen every image.

    Args:
        model: the trained (calibrated) Keras classifier, called directly, or an
            ``inference.passes.ForwardPasses`` of it (its engine runs the variants).
        images: (n, S, S, 3) validation images, uint8 (a memory-mapped array is read a
            round at a time).
        labels: (n,) their class indices.
        run_recipe: the run's recipe as a dict (``Recipe.model_dump(mode="json")``).
        batch_size: images per call (times the variants); default 32 (a ``ForwardPasses``
            has its own).
        plain: (n, k) class probabilities of the images themselves when they are computed
            already (not computed again); default None.
        seed: the order in which the images are judged; default 0.

    Returns:
        A ``TTAChoice``.
    """
    labels = np.asarray(labels, dtype="int64")
    order = np.random.default_rng(seed).permutation(len(labels))
    race = _Race(labels[order], [(name, variants) for name, variants in _transforms(run_recipe) if name != "identity"],
                 _flips(run_recipe))
    if plain is not None:
        race.seen["identity"] = np.asarray(plain, dtype="float64")[order]
    step = batch_size * max(1, -(-JUDGE_ROUND // batch_size))  # whole batches: no padded passes
    shift = tta_shift(run_recipe)
    while race.done == 0 or (race.open() and race.done < len(labels)):
        rows = order[race.done : race.done + step]
        wanted = [name for name in race.wanted() if len(race.seen.get(name, ())) < race.done + len(rows)]
        race.add(wanted, variant_probabilities(model, images[rows], wanted, shift, batch_size) if wanted else [])
        race.done += len(rows)
        race.decide()
    return race.choice()


class _Race:
    """The state of ``choose_transforms``: the images judged so far (``done``, in the judged
    order), each variant's probabilities on them (``seen``), the transforms still on trial,
    those kept, and the flip check."""

    def __init__(self, labels: np.ndarray, transforms: list, flips: bool):
        self.labels, self.pending = labels, list(transforms)
        self.seen: dict[str, np.ndarray] = {}
        self.kept, self.trials = ["identity"], []
        self.done = self.judged = 0
        self.flip: FlipCheck | None = None
        self.flip_open = flips

    def open(self) -> bool:
        """Whether a transform is still on trial or the flip check still goes on."""
        return bool(self.pending) or self.flip_open

    def wanted(self) -> list[str]:
        """The variants the next round computes: the image, the variants on trial and, while
        one is, the kept ones (what it is compared with), and "hflip" for the flip check."""
        names = ["identity"]
        if self.pending:
            names += [*self.kept[1:], *(variant for _, variants in self.pending for variant in variants)]
        if self.flip_open:
            names.append("hflip")
        return list(dict.fromkeys(names))

    def add(self, names: list[str], probabilities) -> None:
        for name, values in zip(names, probabilities, strict=True):
            values = np.asarray(values, dtype="float64")
            self.seen[name] = values if name not in self.seen else np.concatenate([self.seen[name], values])

    def decide(self) -> None:
        """Decide the transforms in order while their effect is clear, then the flip check."""
        final = self.done == len(self.labels)
        labels = self.labels[: self.done]
        while self.pending:
            transform, variants = self.pending[0]
            compared = image_log_losses(self._mean(self.kept), labels)
            tried = image_log_losses(self._mean([*self.kept, *variants]), labels)
            change = tried - compared
            margin = float(np.mean(change)) - KEEP_TOLERANCE
            error = float(np.std(change, ddof=1)) / math.sqrt(len(change)) if len(change) > 1 else math.inf
            if not final and abs(margin) <= DECISIVE * error:
                break  # not clear yet: the next round
            keep = margin <= 0
            self.trials.append(TransformTrial(transform, variants, float(np.mean(tried)), float(np.mean(compared)),
                                              keep, int(self.done)))
            self.pending.pop(0)
            self.judged = self.done
            if keep:
                self.kept.extend(variants)
        if self.flip_open:
            self.flip = check_flips(self.seen["identity"][: self.done], self.seen["hflip"][: self.done], labels)
            self.flip_open = not (final or self.flip.changes_class)

    def _mean(self, names, count: int | None = None) -> np.ndarray:
        """The probabilities averaged over the variants ``names`` on the first ``count``
        images judged (default all judged so far)."""
        count = self.done if count is None else count
        return np.mean([self.seen[name][:count] for name in names], axis=0)

    def choice(self) -> TTAChoice:
        """The ``TTAChoice``: plain prediction and the kept set scored on the images the
        last transform was decided on (all computed there)."""
        judged = self.judged or self.done
        labels = self.labels[:judged]
        return TTAChoice(tuple(self.kept), mean_log_loss(self._mean(["identity"], judged), labels),
                         mean_log_loss(self._mean(self.kept, judged), labels), tuple(self.trials), int(judged),
                         self.flip)


def judged_variants(run_recipe: dict | None) -> list[str]:
    """The variants ``choose_transforms`` computes: "identity" first, then those of the
    recipe's transforms, and "hflip" for the flip check when the run trained with flips."""
    names = ["identity", *(variant for name, variants in _transforms(run_recipe) if name != "identity"
                           for variant in variants)]
    if _flips(run_recipe) and "hflip" not in names:
        names.append("hflip")
    return names


def variant_probabilities(model, images: np.ndarray, variants: Sequence[str], shift: float = 0.05,
                          batch_size: int = 32) -> np.ndarray:
    """The class probabilities of each variant of the images, all variants of a batch in one
    call: of the Keras model called directly, or of the engine of a ``ForwardPasses``.

    Args:
        model: a Keras classifier taking (B, S, S, 3) images, 0..255, or an
            ``inference.passes.ForwardPasses`` (batches of its own ``batch_size``).
        images: (n, S, S, 3) images, read ``batch_size`` at a time.
        variants: variant names (see ``transform_batch``).
        shift: fraction of the side a shift moves the image; default 0.05.
        batch_size: images per call (times the variants); default 32.

    Returns:
        (len(variants), n, k) float64 class probabilities (a sigmoid unit p as [1 - p, p]).
    """
    import keras

    def expand(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([transform_batch(batch, variant, shift) for variant in variants])

    if isinstance(model, ForwardPasses):
        return model.probabilities(model.variant_outputs(images, expand, len(variants)))
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size])
        outputs = keras.ops.convert_to_numpy(model(expand(batch).astype("float32"), training=False))
        chunks.append(class_probabilities(outputs).reshape(len(variants), len(batch), -1))
    return np.concatenate(chunks, axis=1)


def judged_passes(prepared, recipe) -> int:
    """How many image passes beyond the validation images' plain one ``fit_tta`` takes:
    each judged image once per variant other than "identity" (none when too few to judge)."""
    count = len(prepared.val_labels)
    if count < MIN_JUDGED_IMAGES:
        return 0
    return min(count, MAX_JUDGED_IMAGES) * (len(judged_variants(recipe.model_dump(mode="json"))) - 1)


def fit_tta(model, prepared, recipe, verbose: int = 0, forward: ForwardPasses | None = None) -> dict | None:
    """The end-of-finetune step: choose the TTA transforms on the validation split
    (``choose_transforms``, in rounds; on a seeded choice of ``MAX_JUDGED_IMAGES`` of a
    larger one), log the choice, and warn in one line when mirrored images score clearly
    worse than the originals (``FlipCheck.changes_class``).

    Args:
        model: the trained, calibrated classifier.
        prepared: the run's ``PreparedData`` (its validation images and labels).
        recipe: the run's ``Recipe``.
        verbose: 1 logs the choice in one line; default 0.
        forward: the ``inference.passes.ForwardPasses`` of ``model`` that the work after
            training shares: the engine of its ``approximate`` passes runs the variants; where
            those are the passes themselves, their validation images' plain outputs (known, or
            computed once for the rejection fit too) stand for "identity", else "identity" is
            computed with the variants on the images judged; default None (the Keras model is
            called directly on every variant).

    Returns:
        metrics.json "tta": ``TTAChoice.as_dict`` with "judged" true; with fewer than
        ``MIN_JUDGED_IMAGES`` validation images, only {"judged": false, "n_images": n}.
    """
    if len(prepared.val_labels) < MIN_JUDGED_IMAGES:
        if verbose:
            log.info(f"test-time augmentation: {len(prepared.val_labels)} validation images, fewer than the "
                     f"{MIN_JUDGED_IMAGES} needed to judge the transforms on; --tta averages all of tta.transforms")
        return {"judged": False, "n_images": int(len(prepared.val_labels))}
    images, labels = prepared.val_images, prepared.val_labels
    rows = slice(None)
    if len(labels) > MAX_JUDGED_IMAGES:
        rows = np.sort(np.random.default_rng(recipe.seed).choice(len(labels), MAX_JUDGED_IMAGES, replace=False))
        images, labels = images[rows], labels[rows]
    plain = None
    if forward is not None:
        # The plain outputs stand for "identity" where the variants' engine computes them (or
        # knows them); on passes of their own, "identity" goes round by round with the variants.
        if forward.approximate is forward:
            plain = forward.probabilities(forward.validation_outputs()[rows])
        model = forward.approximate
    choice = choose_transforms(model, images, labels, recipe.model_dump(mode="json"), batch_size=recipe.batch_size,
                               plain=plain, seed=recipe.seed)
    if verbose:
        log.info(choice.summary())
    if choice.flip is not None and choice.flip.changes_class:
        log.warning(f"horizontal flips seem to change the class: {choice.flip.figure()}; {FLIP_ADVICE}")
    return {"judged": True, **choice.as_dict()}
