"""Auditing a labelled folder: the images that are likely mislabelled, the outliers, the near-copies.

    result = audit("images/", "quickstart", output="runs/images-audit")
    for issue in result.issues[:10]:
        print(issue.kind, issue.file, issue.given, "->", issue.suggested, issue.score)

Every image goes once through the recipe's frozen backbone (the feature pass of
``training.features``, in the inference engine). The recipe's head is then trained K times
on those features, each time on K - 1 folds (stratified by class; whole groups with
``data.group_by``; near-copies of one image in one fold), and predicts the fold it did not
see: an out-of-sample probability for every image, one that its own label, right or wrong,
did not teach. From those:

- ``label``: confident learning (Northcutt, Jiang and Chuang, 2021), written out here (the
  cleanlab package is AGPL). Class j's threshold t_j is the mean out-of-sample probability
  of j over the images labelled j; an image is confidently of class s when P(s) >= t_s, and
  its suggestion is the likeliest such class (the likeliest class when none is). An image
  is listed when its suggestion or its likeliest class is not its label, scored
  1 - P(given); ``confident`` says whether the suggestion passed its threshold (those are
  the moves ``moves.sh`` suggests).
- ``duplicate``: a difference hash of each decoded image (64 bits, 9 x 8 grey gradients)
  within ``DUPLICATE_BITS`` bits of an earlier image's, its 16 x 16 grey thumbnail
  correlated with that image's at ``DUPLICATE_CORRELATION`` or more, and backbone features
  at least ``DUPLICATE_SIMILARITY`` alike (cosine): copies re-encoded, resized, brightened
  or barely cropped, which the data checks' identical-file test misses. Scored 1 - bits / 64.
- ``outlier``: the mean cosine distance to its ``NEIGHBOURS`` nearest images in the
  backbone's pooled features, far above the folder's typical one (beyond the median by 5
  scaled median absolute deviations, and 1.5 times it):
  an image unlike any other (a foreign picture, a blank frame). Scored 1 - median / distance.

``issues.csv`` lists label errors first (they change what a model learns), then
near-duplicates under different labels, outliers, and near-duplicates within one class,
each kind most suspicious first. The audit never moves a file: ``moves.sh`` holds the moves
it suggests, shell-quoted, for a person to read and run. The output folder is written as an
evaluation is (filled under its owner lock, renamed into place when complete, never over
another folder).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import RecipeError, RunError
from transferkit.files import (
    require_apart,
    require_not_a_file,
    require_writable_place,
    write_atomic,
    write_failure,
)
from transferkit.locks import publishing, require_not_live, stamped_folder
from transferkit.recipe import Recipe

log = logging.getLogger("transferkit")

DEFAULT_FOLDS = 5
MIN_HEAD_STEPS = 200
TILED_BYTES = 256 * 2**20  # a fold's features repeated for every epoch up to this size: one fit call
NEIGHBOURS = 5
DUPLICATE_BITS = 6
DUPLICATE_CORRELATION = 0.97
DUPLICATE_SIMILARITY = 0.9
OUTLIER_MADS = 5.0
OUTLIER_RATIO = 1.5
SHEET_IMAGES = 24
SUMMARY_FILE = "audit.json"
# issues.csv's order of kinds: what changes a model most first.
KIND_ORDER = ("label", "conflicting duplicate", "outlier", "duplicate")


@dataclass(frozen=True)
class Issue:
    """One suspicion about one image.

    Attributes:
        file: the image file (as indexed under the data folder given).
        given: its class folder.
        suggested: the class it likely belongs to (label issues), the class of the image it
            copies (duplicates), or its given class (outliers).
        score: how suspicious, 0..1, within its kind (see the module's docstring).
        kind: "label", "duplicate" or "outlier".
        detail: a few words: the probabilities, or which file it copies.
        confident: a label issue whose suggestion passed its class's threshold (a move
            ``moves.sh`` suggests); a near-duplicate or outlier: False.
        copy_of: for a duplicate, the earlier image it copies; else None.
    """

    file: Path
    given: str
    suggested: str
    score: float
    kind: str
    detail: str = ""
    confident: bool = False
    copy_of: Path | None = None

    @property
    def rank_kind(self) -> str:
        """The kind as ``issues.csv`` orders it (duplicates under different labels apart)."""
        if self.kind == "duplicate" and self.given != self.suggested:
            return "conflicting duplicate"
        return self.kind


@dataclass
class AuditResult:
    """What ``audit`` found.

    Attributes:
        path: the output folder written.
        data_dir: the folder audited.
        class_names: its classes, in label order.
        files: the readable images, in class then path order.
        labels: their given class indices.
        probabilities: (n, k) out-of-sample class probabilities.
        issues: every suspicion, most suspicious first (``issues.csv``'s rows).
        folds: K.
        accuracy: out-of-sample accuracy against the given labels.
        thresholds: confident learning's per-class thresholds t_j.
        skipped: (path, reason) of files left out.
    """

    path: Path | None
    data_dir: Path
    class_names: tuple[str, ...]
    files: list[Path]
    labels: np.ndarray
    probabilities: np.ndarray
    issues: list[Issue]
    folds: int
    accuracy: float
    thresholds: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Issues per kind."""
        return {kind: sum(issue.kind == kind for issue in self.issues) for kind in ("label", "duplicate", "outlier")}

    @property
    def confident_moves(self) -> int:
        """How many label errors are confident: the moves moves.sh suggests."""
        return sum(issue.confident for issue in self.issues)

    def summary(self) -> str:
        """A few lines for the terminal."""
        counts = self.counts()
        confident = self.confident_moves
        lines = [
            f"audited {len(self.files)} image(s) of {len(self.class_names)} classes ({self.folds} folds, "
            f"out-of-sample accuracy {self.accuracy:.3f})",
            f"  {counts['label']} likely label error(s) ({confident} confident: the moves in moves.sh), "
            f"{counts['duplicate']} near-duplicate(s), {counts['outlier']} outlier(s)",
        ]
        for issue in self.issues[:5]:
            told = f"{issue.given} -> {issue.suggested}" if issue.given != issue.suggested else issue.given
            lines.append(f"  {issue.kind:9} {issue.score:.2f}  {issue.file}  ({told})")
        if self.skipped:
            lines.append(f"  {len(self.skipped)} file(s) skipped (unreadable or not images)")
        if self.path is not None:
            lines.append(f"  written to {self.path} (issues.csv, issues.png, moves.sh); nothing was moved")
        return "\n".join(lines)


# Below this out-of-sample accuracy the held-out heads' suggestions are told to be weak evidence.
WEAK_ACCURACY = 0.8


def audit(
    data_dir: str | os.PathLike,
    recipe: Recipe | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    output: str | os.PathLike | None = None,
    force: bool = False,
    folds: int = DEFAULT_FOLDS,
    verbose: int = 1,
) -> AuditResult:
    """Rank the likely label errors, outliers and near-duplicates of a labelled folder, and
    write issues.csv, issues.png, moves.sh, predictions.csv and audit.json.

    No file of the folder is moved or changed.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped recipe name, or None for the defaults
            (its backbone, weights, image size, head, first stage's optimizer and epochs,
            engine, precision, seed and ``data.group_by`` apply).
        overrides: dotted recipe keys to values, over the recipe (a ``Recipe`` too).
        output: the folder to write; default ``runs/<data-folder>-audit-<timestamp>``.
        force: replace an earlier audit folder there; default False.
        folds: K, the folds the head is trained on K times; at least 2, default 5.
        verbose: 0 silent, 1 progress; default 1.

    Returns:
        The ``AuditResult`` (``path``: the folder written).

    Raises:
        RecipeError: a bad recipe or ``folds`` below 2.
        DataError: the folder or its images cannot be used.
        RunError: the output folder exists (without ``force``), is not an audit folder, is
            being written by another process, or cannot be written.
        WeightsError: the backbone's weights cannot be loaded.
    """
    from transferkit.data.prepare import decode_folder
    from transferkit.files import named_folder
    from transferkit.recipe import load_recipe

    recipe = load_recipe(recipe, overrides)  # a Recipe too: the overrides go over it
    if folds < 2:
        raise RecipeError(f"--folds must be at least 2, got {folds}")
    out = named_folder(output) if output is not None else default_output(data_dir)
    check_output_folder(out, force, data_dir)
    # more folds than images: told before any image is decoded, and again if unreadable ones leave too few
    decoded = decode_folder(data_dir, recipe, verbose=verbose, folds=folds)
    if recipe.weights == "none":  # (after the folder's own errors: a folder that cannot be audited is told alone)
        log.warning("the backbone has random weights (--weights none): its features separate colours, not much "
                    "else, so the label fixes suggested are guesses on photographs; read moves.sh before running it")
    counts = np.bincount(decoded.labels, minlength=len(decoded.class_names))
    if counts.min() < folds:
        log.warning("class %s has %d image(s), fewer than the %d folds: a head trained without it cannot suggest "
                    "it%s", decoded.class_names[int(np.argmin(counts))], int(counts.min()), folds,
                    " (nor judge its one image, which moves.sh leaves where it is)" if counts.min() == 1 else "")
    started = time.perf_counter()
    features = backbone_features(decoded.images, recipe, len(decoded.class_names), verbose)
    embeddings = pooled(features)
    copies = near_duplicates(image_signatures(decoded.images), embeddings)
    probabilities = out_of_fold_probabilities(features, decoded.labels, len(decoded.class_names), recipe,
                                              groups=fold_groups(decoded.groups, copies, len(decoded.labels)),
                                              folds=folds, verbose=verbose)
    result = _result(decoded, probabilities, embeddings, copies, folds)
    if result.accuracy < WEAK_ACCURACY and result.confident_moves:
        log.warning("the held-out heads were right on only %.0f%% of the images, so their %d suggested move(s) are "
                    "weak evidence: read moves.sh before running any of it (pretrained weights, a larger image size "
                    "or more images make the audit stronger)", 100 * result.accuracy, result.confident_moves)
    if verbose:
        log.info(f"audit computed in {time.perf_counter() - started:.1f}s")
    result.path = write_audit(result, recipe, out, force)
    return result


def default_output(data_dir: str | os.PathLike, runs_root: str | os.PathLike = "runs") -> Path:
    """``runs/<data-folder-name>-audit-<YYYYmmdd-HHMMSS>`` (``locks.stamped_folder``)."""
    return stamped_folder(runs_root, f"{Path(data_dir).resolve().name or 'data'}-audit")


def check_output_folder(out: Path, force: bool, data_dir: str | os.PathLike | None = None) -> None:
    """Fail before any work if ``out`` could not be written or would destroy something.

    Raises:
        RunError: another process is writing it, it exists (without ``force``), is a file,
            is not an audit folder (``force`` replaces audit folders only), or is inside
            the data folder or holds it.
    """
    require_not_live(out)
    require_apart(out, [data_dir], "audit folder")
    require_writable_place(Path(os.path.abspath(out)).parent)  # where it is published
    if not out.exists():
        return
    require_not_a_file(out)
    if not force:
        raise RunError(f"{out} exists already; pass --force to replace it or choose another -o")
    if any(out.iterdir()) and not (out / SUMMARY_FILE).is_file():
        raise RunError(f"{out} is not an audit folder (no {SUMMARY_FILE}) and is not empty; --force replaces only "
                       "audit folders: choose another -o")


# --- the out-of-sample probabilities ------------------------------------------------------


def backbone_features(images: np.ndarray, recipe: Recipe, n_classes: int, verbose: int = 1) -> np.ndarray:
    """The frozen backbone's output for every image, one forward pass each, in the recipe's
    engine and precision (pooled to 1 x 1 already when the head pools by average).

    Args:
        images: uint8 (n, S, S, 3) at the recipe's image size.
        recipe: the resolved recipe (backbone, weights, image size, engine, precision,
            batch size, head pooling, feature memory budget).
        n_classes: number of classes (the classifier is built whole, as training builds it).
        verbose: 0 silent, 1 a progress bar; default 1.

    Returns:
        float32 (n, h, w, c) features.
    """
    import keras

    from transferkit.backbones import get_spec
    from transferkit.inference.engines import SHARED, inference_engine
    from transferkit.model.build import build_model
    from transferkit.model.surgery import extractor_at
    from transferkit.progress import progress_bar
    from transferkit.training.features import FeaturePass, compute_feature_stores

    keras.utils.set_random_seed(recipe.seed)
    model = build_model(recipe, n_classes, verbose=verbose).model
    spec = get_spec(recipe.backbone)
    extractor = extractor_at(model, spec, [len(spec.blocks)])
    engine = inference_engine(extractor, recipe.engine, precision=recipe.precision, cache_dir=SHARED,
                              input_dtype="uint8")
    shape = tuple(int(d) for d in extractor.output.shape[1:])
    average = recipe.head.pooling == "avg"
    if average:  # the head's average pooling of a 1 x 1 map is the map: keep c numbers, not h x w x c
        shape = (1, 1, shape[-1])

    def forward(batch: np.ndarray) -> list[np.ndarray]:
        maps = np.asarray(engine.predict(batch), dtype="float32")
        return [maps.mean(axis=(1, 2), keepdims=True) if average else maps]

    batches = math.ceil(len(images) / recipe.batch_size)
    if verbose:
        log.info(f"computing the backbone's features of {len(images)} images ({engine.name} engine)")
    (store,) = compute_feature_stores(forward, images, [shape], FeaturePass(
        views=[1], batch_size=recipe.batch_size, memory_budget_mb=recipe.cache.memory_mb,
        progress=progress_bar("batch", batches, enabled=bool(verbose))))
    return store.array[0]


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, n_classes: int, recipe: Recipe, *,
                              groups: np.ndarray | None = None, folds: int = DEFAULT_FOLDS,
                              verbose: int = 1) -> np.ndarray:
    """Each image's class probabilities from a head that never saw it: the recipe's head is
    trained on K - 1 folds of the features (as the recipe's first stage trains it: optimizer,
    learning rate and schedule, epochs (at least ``MIN_HEAD_STEPS`` steps), class weights,
    label smoothing) and predicts the K-th, K times, each time from the same initial weights.

    Args:
        features: (n, h, w, c) backbone features.
        labels: class index per image.
        n_classes: number of classes.
        recipe: the resolved recipe.
        groups: group name per image (folds keep groups whole); default None.
        folds: K; default 5.
        verbose: 0 silent, 1 a line per fold; default 1.

    Returns:
        float64 (n, k) probabilities.
    """
    from transferkit.data.split import stratified_folds

    pairs = stratified_folds(labels, groups, folds, recipe.seed)
    head = FoldHead(features.shape[1:], n_classes, recipe, max(len(train) for train, _ in pairs))
    probabilities = np.zeros((len(labels), n_classes), dtype="float64")
    for fold, (train, held) in enumerate(pairs, start=1):
        started = time.perf_counter()
        head.fit(features, labels, train, fold)
        probabilities[held] = head.predict(features[held])
        if verbose:
            right = float(np.mean(probabilities[held].argmax(axis=1) == labels[held]))
            log.info(f"fold {fold}/{folds}: head trained on {len(train)} images ({head.epochs} epochs), "
                     f"{len(held)} held out (agreeing with their labels: {right:.2f}), "
                     f"{time.perf_counter() - started:.1f}s")
    return probabilities


def head_epochs(epochs: int, steps_per_epoch: int) -> int:
    """The epochs a fold's head trains: the recipe's first stage's, and at least enough for
    ``MIN_HEAD_STEPS`` steps (a small folder's few steps per epoch leave a head unfit, and
    its probabilities near uniform)."""
    return max(epochs, math.ceil(MIN_HEAD_STEPS / max(1, steps_per_epoch)), 1)


class FoldHead:
    """The recipe's head on features, built and compiled once and reset for each fold (its
    initial weights and optimizer state put back), so Keras traces its steps once, not K times.

    Args:
        feature_shape: one image's features.
        n_classes: number of classes.
        recipe: the resolved recipe (head, first stage, batch size, loss, class weights, seed).
        train_size: the most training images of a fold (sets the steps per epoch).
    """

    def __init__(self, feature_shape: tuple[int, ...], n_classes: int, recipe: Recipe, train_size: int):
        import keras

        from transferkit.model.classifier import build_head
        from transferkit.training.compile import compile_for_stage

        self.n_classes, self.recipe = n_classes, recipe
        steps = math.ceil(train_size / recipe.batch_size)
        self.epochs = head_epochs(recipe.stages[0].epochs, steps)
        self.steps = self.epochs * steps  # every fold trains this many full batches (one trace for all)
        keras.utils.set_random_seed(recipe.seed)
        inputs = keras.Input(shape=tuple(feature_shape), name="features")
        self.model = keras.Model(inputs, build_head(tuple(feature_shape), n_classes, recipe.head)(inputs))
        # The schedule spans the epochs trained here (a cosine would otherwise end early at 0).
        stage = recipe.stages[0].model_copy(update={"epochs": self.epochs})
        compile_for_stage(self.model, stage, n_classes, steps_per_execution=min(steps, 32), steps_per_epoch=steps,
                          loss=recipe.loss)
        # A head this small trains faster than XLA compiles it.
        self.model.jit_compile = False
        # Every variable fit makes, made now: its step is traced once (for all folds).
        from transferkit.keras_private import build_for_fit
        from transferkit.outputs import encode_targets

        sample = np.zeros((1, *feature_shape), "float32")
        build_for_fit(self.model, (sample, encode_targets(np.zeros(1, int), n_classes), np.ones(1, "float32")))
        self.initial = (self.model.get_weights(), [variable.numpy() for variable in self.model.optimizer.variables])

    def fit(self, features: np.ndarray, labels: np.ndarray, train: np.ndarray, fold: int) -> None:
        """Train from the initial state on the rows ``train``."""
        from transferkit.data.arrays import balanced_class_weights
        from transferkit.model.classifier import calibrate_head_batchnorm
        from transferkit.outputs import encode_targets
        from transferkit.training.features import CALIBRATION_IMAGES

        weights, optimizer_state = self.initial
        self.model.set_weights(weights)
        for variable, value in zip(self.model.optimizer.variables, optimizer_state, strict=True):
            variable.assign(value)
        x = np.asarray(features[train], dtype="float32")
        # Each channel less its mean, all divided by one spread, over the fold's training
        # images (applied alike to what it predicts): a head on raw backbone outputs, all
        # positive and of a scale that varies by backbone and weights, learns far slower in
        # the steps it has. One spread for all channels keeps the quiet ones quiet.
        self.shift = x.mean(axis=tuple(range(x.ndim - 1)))
        self.scale = 1.0 / max(float(np.sqrt(np.mean((x - self.shift) ** 2))), 1e-6)
        x = (x - self.shift) * self.scale
        calibrate_head_batchnorm(self.model, x[:CALIBRATION_IMAGES])
        targets = encode_targets(labels[train], self.n_classes)
        sample_weights = np.ones(len(train), dtype="float32")
        if self.recipe.data.class_weights:
            sample_weights = balanced_class_weights(labels[train], self.n_classes)[labels[train]].astype("float32")
        batch_size, epochs = self.recipe.batch_size, self.epochs
        rows = self.steps * batch_size
        if rows * x[0].nbytes <= TILED_BYTES:
            # Shuffled orders laid end to end, cut to the same number of full batches in every
            # fold, fitted as one epoch: the epochs' steps without Keras's per-epoch overhead
            # (which dominates a small head's epoch), traced once for all folds.
            orders = [np.random.default_rng([self.recipe.seed, fold, epoch]).permutation(len(train))
                      for epoch in range(math.ceil(rows / len(train)))]
            order = np.concatenate(orders)[:rows]
            x, targets, sample_weights, epochs = x[order], targets[order], sample_weights[order], 1
        self.model.fit(x, targets, sample_weight=sample_weights, batch_size=batch_size, epochs=epochs, shuffle=True,
                       verbose=0)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(n, k) class probabilities."""
        from transferkit.outputs import class_probabilities

        features = (np.asarray(features, dtype="float32") - self.shift) * self.scale
        batch_size = self.recipe.batch_size
        padded = np.zeros((math.ceil(len(features) / batch_size) * batch_size, *features.shape[1:]), "float32")
        padded[: len(features)] = features  # full batches only: one trace for every fold
        outputs = self.model.predict(padded, batch_size=batch_size, verbose=0)[: len(features)]
        return class_probabilities(outputs)


@dataclass(frozen=True)
class LabelSuspicions:
    """Confident learning's verdict on each image.

    Attributes:
        suggested: the class each image likely belongs to.
        listed: whether it is a label issue (its suggestion or likeliest class is not its label).
        confident: whether its suggestion passed that class's threshold.
        score: 1 - P(given).
        thresholds: per class, the mean out-of-sample probability of its own images.
    """

    suggested: np.ndarray
    listed: np.ndarray
    confident: np.ndarray
    score: np.ndarray
    thresholds: np.ndarray


def suspect_labels(probabilities: np.ndarray, labels: np.ndarray) -> LabelSuspicions:
    """Confident learning on out-of-sample probabilities (see the module's docstring).

    Args:
        probabilities: (n, k) out-of-sample class probabilities.
        labels: the given class per image.

    Returns:
        A ``LabelSuspicions``.
    """
    probabilities = np.asarray(probabilities, dtype="float64")
    n, k = probabilities.shape
    rows = np.arange(n)
    thresholds = np.array([probabilities[labels == j, j].mean() if np.any(labels == j) else 1.0
                           for j in range(k)])
    confident_of = probabilities >= thresholds[None, :]
    masked = np.where(confident_of, probabilities, -1.0)
    confident = confident_of.any(axis=1)
    likeliest = probabilities.argmax(axis=1)
    suggested = np.where(confident, masked.argmax(axis=1), likeliest)
    listed = (suggested != labels) | (likeliest != labels)
    suggested = np.where(suggested != labels, suggested, likeliest)
    # A move is suggested only where the suggestion is both confident and the likeliest class,
    # and never for the one image of a class: the head that judged it trained without its
    # class, so it could not have given it (moving it out would empty the class).
    confident = confident & (suggested != labels) & confident_of[rows, suggested] & (suggested == likeliest)
    confident &= np.bincount(labels, minlength=k)[labels] >= 2
    return LabelSuspicions(suggested, listed, confident, 1.0 - probabilities[rows, labels], thresholds)


def pooled(features: np.ndarray) -> np.ndarray:
    """Unit-length average-pooled features (n, c), what distances are measured on."""
    vectors = np.asarray(features, dtype="float32")
    if vectors.ndim == 4:
        vectors = vectors.mean(axis=(1, 2))
    vectors = vectors.reshape(len(vectors), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class Signatures:
    """What near-copies are found by, per image.

    Attributes:
        hashes: uint64 (n,) difference hashes: the image in grey at 9 x 8 pixels, one bit
            per pair of horizontal neighbours (left brighter than right).
        thumbnails: float32 (n, 256) the image in grey at 16 x 16 pixels, less its mean, at
            unit length: their dot product is the pixels' correlation (which brightness and
            contrast changes leave alone).
    """

    hashes: np.ndarray
    thumbnails: np.ndarray


def image_signatures(images: np.ndarray) -> Signatures:
    """The ``Signatures`` of decoded images.

    Args:
        images: uint8 (n, S, S, 3).

    Returns:
        ``Signatures``.
    """
    from PIL import Image

    powers = 1 << np.arange(64, dtype=np.uint64)
    hashes = np.zeros(len(images), dtype=np.uint64)
    thumbnails = np.zeros((len(images), 256), dtype="float32")
    for row, image in enumerate(images):
        grey = Image.fromarray(np.asarray(image)).convert("L")
        small = np.asarray(grey.resize((9, 8), Image.Resampling.BOX), dtype="int16")
        bits = (small[:, :-1] > small[:, 1:]).ravel()
        hashes[row] = np.bitwise_or.reduce(powers[bits]) if bits.any() else np.uint64(0)
        thumbnail = np.asarray(grey.resize((16, 16), Image.Resampling.BOX), dtype="float32").ravel()
        thumbnail -= thumbnail.mean()
        thumbnails[row] = thumbnail / max(float(np.linalg.norm(thumbnail)), 1e-6)
    return Signatures(hashes, thumbnails)


def comparison_rows(count: int, cells: int = 1 << 22) -> int:
    """Rows compared with all ``count`` images at once: at most ``cells`` pairs (about 32 MB
    of float64), at most 512 rows."""
    return max(1, min(512, cells // max(1, count)))


def _bit_counts(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def near_duplicates(signatures: Signatures, embeddings: np.ndarray, *, max_bits: int = DUPLICATE_BITS,
                    min_correlation: float = DUPLICATE_CORRELATION, min_similarity: float = DUPLICATE_SIMILARITY,
                    chunk: int | None = None) -> list[tuple[int, int, int]]:
    """Pairs of near-identical images: hashes within ``max_bits`` bits, grey thumbnails
    correlated at least ``min_correlation`` and backbone features at least
    ``min_similarity`` alike.

    Args:
        signatures: ``image_signatures``.
        embeddings: ``pooled`` features, one row per image.
        max_bits: most differing hash bits; default 6 (of 64).
        min_correlation: least correlation of the 16 x 16 grey thumbnails; default 0.97.
        min_similarity: least cosine similarity of the features; default 0.9.
        chunk: rows compared with all others at a time; default None (``comparison_rows``).

    Returns:
        (earlier image, later image, differing bits) for each later image, paired with its
        nearest earlier near-copy; by later image.
    """
    hashes, thumbnails = signatures.hashes, signatures.thumbnails
    best: dict[int, tuple[int, int]] = {}
    chunk = chunk or comparison_rows(len(hashes))
    for start in range(0, len(hashes), chunk):
        rows = np.arange(start, min(start + chunk, len(hashes)))
        bits = _bit_counts(hashes[rows, None] ^ hashes[None, :])
        earlier, later = np.nonzero((bits <= max_bits) & (rows[:, None] < np.arange(len(hashes))[None, :]))
        for i, j in zip(rows[earlier], later, strict=True):
            if (float(thumbnails[i] @ thumbnails[j]) < min_correlation
                    or float(embeddings[i] @ embeddings[j]) < min_similarity):
                continue
            distance = int(bits[i - start, j])
            if j not in best or distance < best[j][1]:
                best[int(j)] = (int(i), distance)
    return [(i, j, distance) for j, (i, distance) in sorted(best.items())]


def outlier_scores(embeddings: np.ndarray, neighbours: int = NEIGHBOURS, chunk: int | None = None) -> np.ndarray:
    """Each image's mean cosine distance to its nearest other images.

    Args:
        embeddings: ``pooled`` features (unit rows).
        neighbours: how many nearest; default 5 (fewer in a smaller folder).
        chunk: rows compared with all others at a time; default None (``comparison_rows``).

    Returns:
        float64 (n,) distances (0 for a folder of one image).
    """
    n = len(embeddings)
    count = min(neighbours, n - 1)
    distances = np.zeros(n, dtype="float64")
    if count < 1:
        return distances
    chunk = chunk or comparison_rows(n)
    for start in range(0, n, chunk):
        block = 1.0 - embeddings[start : start + chunk] @ embeddings.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf  # not itself
        nearest = np.partition(block, count - 1, axis=1)[:, :count]
        distances[start : start + len(block)] = nearest.mean(axis=1)
    return distances


def outliers(distances: np.ndarray, mads: float = OUTLIER_MADS, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """The images whose distance is far above the folder's typical one: beyond the median
    by ``mads`` scaled median absolute deviations, and ``ratio`` times the median at least.

    Returns:
        Indices, the farthest first.
    """
    median = float(np.median(distances))
    spread = 1.4826 * float(np.median(np.abs(distances - median)))
    flagged = np.flatnonzero((distances > median + mads * spread) & (distances > ratio * median))
    return flagged[np.argsort(-distances[flagged], kind="stable")]


def fold_groups(groups: np.ndarray | None, copies: Sequence[tuple[int, int, int]], count: int) -> np.ndarray | None:
    """What the audit's folds keep whole: each ``data.group_by`` group and each set of
    near-copies (joined where they share an image). A copy held out apart from its twin
    would be predicted by a head that learnt the twin's label: two copies under two
    classes would each be "corrected" to the other's class, and ``moves.sh`` would swap them.

    Args:
        groups: group name per image, or None.
        copies: ``near_duplicates`` (earlier image, later image, bits).
        count: the number of images.

    Returns:
        An int group per image, or None where there are neither groups nor copies (the
        folds are then stratified by class alone).
    """
    if groups is None and not copies:
        return None
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = [(earlier, later) for earlier, later, _ in copies]
    if groups is not None:
        first: dict[Any, int] = {}
        edges += [(first.setdefault(name, row), row) for row, name in enumerate(groups.tolist())]
    rows, columns = np.asarray(edges, dtype=np.int64).reshape(-1, 2).T
    graph = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def _result(decoded, probabilities: np.ndarray, embeddings: np.ndarray, copies: Sequence[tuple[int, int, int]],
            folds: int) -> AuditResult:
    """The suspicions of every kind, ordered as issues.csv lists them."""
    names, files, labels = decoded.class_names, list(decoded.files), decoded.labels
    verdict = suspect_labels(probabilities, labels)
    issues = []
    for row in np.flatnonzero(verdict.listed):
        given, suggested = labels[row], verdict.suggested[row]
        issues.append(Issue(files[row], names[given], names[suggested], float(verdict.score[row]), "label",
                            f"P({names[given]}) {probabilities[row, given]:.3f}, P({names[suggested]}) "
                            f"{probabilities[row, suggested]:.3f}", bool(verdict.confident[row])))
    for earlier, later, bits in copies:
        issues.append(Issue(files[later], names[labels[later]], names[labels[earlier]], 1.0 - bits / 64,
                            "duplicate", f"near-copy of {files[earlier]} ({bits} of 64 hash bits differ)",
                            copy_of=files[earlier]))
    distances = outlier_scores(embeddings)
    median = float(np.median(distances))
    for row in outliers(distances):
        issues.append(Issue(files[row], names[labels[row]], names[labels[row]],
                            1.0 - median / distances[row], "outlier",
                            f"distance to its {NEIGHBOURS} nearest images {distances[row]:.3f}, typical {median:.3f}"))
    issues.sort(key=lambda issue: (KIND_ORDER.index(issue.rank_kind), -issue.score, str(issue.file)))
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels)) if len(labels) else 0.0
    return AuditResult(None, Path(decoded.data_dir), tuple(names), files, labels, probabilities, issues, folds,
                       accuracy, verdict.thresholds, list(decoded.skipped))


# --- the folder -----------------------------------------------------------------------------


def write_audit(result: AuditResult, recipe: Recipe, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the audit folder atomically: issues.csv, issues.png, moves.sh, predictions.csv,
    audit.json and recipe.toml, filled under its owner lock and renamed into place.

    Args:
        result: from the audit.
        recipe: the recipe it ran with.
        out: the folder.
        force: replace an earlier audit folder; default False.

    Returns:
        The folder.

    Raises:
        RunError: the folder exists (without ``force``), is not an audit folder, is being
            written by another process, or cannot be written.
    """
    out = Path(out)
    check = lambda: check_output_folder(out, force, result.data_dir)  # again under the lock
    try:
        with publishing(out, "audit", check=check) as staging:
            _write_contents(result, recipe, staging)
    except OSError as error:
        raise RunError(f"could not write {out}: {write_failure(error)}; nothing was written") from error
    return out


def _write_contents(result: AuditResult, recipe: Recipe, folder: Path) -> None:
    from transferkit.evaluation.figures import plot_contact_sheet

    write_atomic(folder / "issues.csv", issues_table(result.issues))
    write_atomic(folder / "predictions.csv", _predictions_table(result))
    write_atomic(folder / "moves.sh", moves_script(result.issues, result.data_dir))
    write_atomic(folder / "recipe.toml", recipe.to_toml())
    shown = result.issues[:SHEET_IMAGES]
    plot_contact_sheet([(issue.file, _caption(issue)) for issue in shown], folder / "issues.png",
                       f"audit of {result.data_dir.name}: the {len(shown)} most suspicious images",
                       empty="no suspicions")
    summary = {
        "data_dir": str(result.data_dir),
        "n_images": len(result.files),
        "class_names": list(result.class_names),
        "folds": result.folds,
        "group_by": recipe.data.group_by,
        "out_of_sample_accuracy": result.accuracy,
        "thresholds": {name: float(t) for name, t in zip(result.class_names, result.thresholds, strict=True)},
        "counts": result.counts(),
        "confident_label_errors": result.confident_moves,
        "n_skipped": len(result.skipped),
        "backbone": recipe.backbone, "weights": recipe.weights, "image_size": recipe.image_size,
    }
    write_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def _caption(issue: Issue) -> str:
    """Four short lines under an image of issues.png, each cut to its column (22 characters)."""
    from transferkit.evaluation.figures import fit_text

    name = fit_text(Path(issue.file).name, 22)
    given = f"given: {fit_text(issue.given, 15)}"
    if issue.kind == "label":
        return f"{name}\n{given}\nsuggested: {fit_text(issue.suggested, 11)}\nlabel {issue.score:.2f}"
    if issue.kind == "duplicate":  # which image it copies, so that the pair can be found
        copied = Path(issue.copy_of).name if issue.copy_of is not None else issue.suggested
        return f"{name}\n{given}\ncopy of {fit_text(copied, 14)}\nduplicate {issue.score:.2f}"
    return f"{name}\n{given}\noutlier {issue.score:.2f}"


def issues_table(issues: Sequence[Issue]) -> str:
    """``issues.csv``'s text: file, given, suggested, score, kind, confident, detail; in the
    order given (most suspicious first)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "given", "suggested", "score", "kind", "confident", "detail"])
    for issue in issues:
        writer.writerow([str(issue.file), issue.given, issue.suggested, f"{issue.score:.4f}", issue.kind,
                         str(issue.confident).lower(), issue.detail])
    return buffer.getvalue()


def _predictions_table(result: AuditResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "given", "predicted", "confidence", *result.class_names])
    names = result.class_names
    for file, label, row in zip(result.files, result.labels, result.probabilities, strict=True):
        best = int(np.argmax(row))
        writer.writerow([str(file), names[label], names[best], f"{row[best]:.4f}", *(f"{p:.4f}" for p in row)])
    return buffer.getvalue()


def moves_script(issues: Sequence[Issue], data_dir: str | os.PathLike) -> str:
    """``moves.sh``: the moves the audit suggests, for a person to read and run with ``sh``.

    Each confident label error moves to its suggested class folder (its path below the class
    folder kept); outliers and near-copies move, only with ``SET_ASIDE=yes``, to
    ``DATA-set-aside/`` beside the data folder. The data folder is the audited one unless
    ``TRANSFERKIT_DATA=/a/copy sh moves.sh`` names another (a copy, or the data on another
    machine; a name no shell sets by chance); every path is below it and shell-quoted; ``mv -n`` never
    replaces a file. Comments never hold a file name (a name can hold a newline).

    Args:
        issues: the audit's issues.
        data_dir: the data folder.

    Returns:
        The script's text.
    """
    data = Path(os.path.abspath(data_dir))
    moved = set()
    lines = [
        "#!/bin/sh",
        f"# The moves `transferkit audit` suggests for {_comment(str(data))}.",
        "# Nothing has been moved: read the lines below, delete those you disagree with, then run",
        "#   sh moves.sh                  (label fixes only)",
        "#   SET_ASIDE=yes sh moves.sh    (and set outliers and near-copies aside, into DATA-set-aside)",
        "#   TRANSFERKIT_DATA=/a/copy sh moves.sh  (the same moves in another copy of the data folder)",
        "# No file is replaced: where a label fix's new name is taken (IMG_0001.jpg in both classes),",
        "# it takes NAME-from-ITS_CLASS; where that is taken too, or a set-aside name is, the file",
        "# stays where it is and is named on stderr (exit 1). A file moved already is passed over,",
        "# so running it twice does no harm.",
        "set -u",
        f"DATA=${{TRANSFERKIT_DATA:-{shlex.quote(str(data))}}}",
        'ASIDE="$DATA-set-aside"',
        "kept=0",
        "move() {  # FILE FOLDER NEW [OTHER]: FILE into FOLDER as NEW, or as OTHER where NEW is taken",
        '  [ -e "$1" ] || return 0',
        '  mkdir -p -- "$2" || return 1',
        '  if [ ! -e "$3" ]; then mv -n -- "$1" "$3"',
        '  elif [ -n "${4:-}" ] && [ ! -e "$4" ]; then mv -n -- "$1" "$4"',
        "  else kept=$((kept + 1)); printf 'not moved, its new name is taken: %s\\n' \"$1\" >&2",
        "  fi",
        "}",
        "",
        "# Likely label errors: each to the class the held-out head is confident it belongs to.",
    ]
    for issue in issues:
        if issue.kind != "label" or not issue.confident:
            continue
        source = _below(Path(os.path.abspath(issue.file)), data)
        target = Path(issue.suggested) / _below_class(source)
        lines.append(f"# {_comment(issue.given)} -> {_comment(issue.suggested)} (score {issue.score:.2f})")
        other = target.with_name(f"{target.stem}-from-{issue.given}{target.suffix}")
        lines.append(_move("$DATA", source, "$DATA", target, other))
        moved.add(source)
    lines += ["", "# Outliers and near-copies, set aside into $ASIDE with SET_ASIDE=yes.",
              'if [ "${SET_ASIDE:-no}" = yes ]; then']
    for issue in issues:
        source = _below(Path(os.path.abspath(issue.file)), data)
        if issue.kind == "label" or source in moved:
            continue
        moved.add(source)
        lines.append(f"  # {issue.kind} (score {issue.score:.2f})")
        lines.append("  " + _move("$DATA", source, "$ASIDE", source))
    lines += ["  :", "fi", 'if [ "$kept" -gt 0 ]; then',
              '  echo "$kept file(s) not moved: their new names are taken (listed above); move them by hand" >&2',
              "  exit 1", "fi", ""]
    return "\n".join(lines)


def _below(path: Path, data: Path) -> Path:
    """A file's path below the data folder (the audit reads only files there)."""
    return path.relative_to(data)


def _below_class(relative: Path) -> Path:
    """A file's path below its class folder (``cat/sub/x.jpg`` -> ``sub/x.jpg``)."""
    parts = relative.parts
    return Path(*parts[1:]) if len(parts) > 1 else Path(relative.name)


def _move(source_root: str, source: Path, target_root: str, target: Path, other: Path | None = None) -> str:
    """One move as a line of shell (the script's ``move``), each path a shell variable's
    folder ("$DATA") and a quoted path below it: to ``target``, or to ``other`` where that
    name is taken; passed over when the file is gone (moved already)."""
    def path(root: str, below: Path) -> str:
        return f'"{root}"/{shlex.quote(below.as_posix())}'

    folder = path(target_root, target.parent) if target.parent != Path(".") else f'"{target_root}"'
    return " ".join(["move", path(source_root, source), folder, path(target_root, target),
                     *([path(target_root, other)] if other is not None else [])])


def _comment(text: str) -> str:
    """Text safe on a comment line: no line breaks."""
    return "".join(char if char.isprintable() else "?" for char in text)

