"""Learning checks: why a network does not learn, asked in the usual order.

    report = check_learning("images/", "quickstart", {"weights": "none"})
    report.passed, report.format_text(), report.to_dict()

``transferkit doctor DATA_DIR --model`` prints this report. The checks run on one stage of
the recipe as ``run_stages`` would begin it (``lr_find.prepare_stage``: on cached features
where the stage's bottom is frozen), each from the stage's starting weights, in the order
of ``CHECKS`` (one small function per check; each returns a ``LearningCheck`` with its
figure and, when it fails, what to try):

1. initial loss: close to ln(number of classes) (ln 2 for one sigmoid unit): the outputs
   start unsure, as a new head should;
2. input: the model's own preprocessing turns known colours into what the backbone's
   weights expect (for "caffe": BGR, ImageNet mean subtracted), and the decoded pixels
   span the 0..255 range the model expects (not 0..1);
3. gradients: one batch's gradients reach the head and every block the stage unfreezes,
   and none is zero, NaN or exploding;
4. overfit one batch: ``OVERFIT_IMAGES`` training images are learnt to 100% accuracy
   within ``OVERFIT_STEPS`` steps at the stage's learning rate;
5. learning rate: the stage's rate lies in the range the learning-rate range test finds
   usable (``lr_find``);
6. validation loss: falls below chance in a short run (``SHORT_RUN_EPOCHS`` epochs, more on
   tiny data: at least ``SHORT_RUN_STEPS`` steps);
7. horizontal flip: where the recipe flips images (``augment.hflip``) and there are at least
   ``MIN_JUDGED_IMAGES`` validation images, after the same short run, mirrored validation
   images do not score clearly worse than the originals (the rule of
   ``training.flips.check_flips``, which finetune warns with too): a flip that changes the
   class (digits, left and right) teaches the model wrong labels. With ``hflip = "auto"``
   the check passes and says so: finetune judges it after its first stage, which trains
   without flips, and flips in no stage where they change the class.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.data.batches import keras_input
from transferkit.recipe import Recipe, load_recipe
from transferkit.tuning.lr_find import StageSetup, prepare_stage, range_test, stage_label

# An initial loss within this share of ln(classes) passes: a random head on calibrated
# features starts a little above it.
INITIAL_LOSS_TOLERANCE = 0.5
# Decoded pixels spanning less than this (0.5th to 99.5th percentile, of 255) look like 0..1.
MIN_PIXEL_SPREAD = 16.0
# The model's preprocessing may differ from Keras's by this much on 0..255 colours.
PREPROCESSING_TOLERANCE = 0.5
GRADIENT_FLOOR = 1e-10  # a block's gradient norm at or below this is zero
GRADIENT_CEILING = 1e4  # above this a block's gradient norm is exploding
OVERFIT_IMAGES, OVERFIT_STEPS, OVERFIT_EVERY = 16, 100, 10
OVERFIT_ACCURACY = 0.99
# The short run: at least this many epochs and steps (tiny data gives few steps an epoch),
# at most MAX_SHORT_RUN_EPOCHS epochs.
SHORT_RUN_EPOCHS, SHORT_RUN_STEPS, MAX_SHORT_RUN_EPOCHS = 5, 100, 30
# The short run's best validation loss must end this share below min(chance, its start).
VALIDATION_FALL = 0.05


@dataclass(frozen=True)
class LearningCheck:
    """One learning check's outcome.

    Attributes:
        name: what was checked, e.g. "initial loss".
        passed: whether it passed.
        figure: what was measured, in words with its numbers.
        advice: what to try when it failed; empty when it passed.
        value: the main figure as a number (None where there is none).
    """

    name: str
    passed: bool
    figure: str
    advice: str = ""
    value: float | None = None


@dataclass(frozen=True)
class LearningReport:
    """What ``check_learning`` found.

    Attributes:
        data_dir: the data folder.
        stage_index, stage_name: the stage checked.
        backbone: the recipe's backbone.
        n_classes: number of classes.
        cached: whether the stage was checked on cached features of its frozen part.
        checks: one ``LearningCheck`` per check, in ``CHECKS`` order.
    """

    data_dir: Path
    stage_index: int
    stage_name: str
    backbone: str
    n_classes: int
    cached: bool
    checks: tuple[LearningCheck, ...]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[LearningCheck]:
        """The checks that failed."""
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable values."""
        return {
            "data_dir": str(self.data_dir), "stage": self.stage_index, "stage_name": self.stage_name,
            "backbone": self.backbone, "n_classes": self.n_classes, "cached": self.cached, "passed": self.passed,
            "checks": [{"name": check.name, "passed": check.passed, "figure": check.figure,
                        "value": check.value, "advice": check.advice} for check in self.checks],
        }

    def format_text(self) -> str:
        """One line per check, "pass" or "FAIL", its figure, and what to try."""
        where = ", on cached features" if self.cached else ""
        lines = [f"learning checks of {stage_label(self.stage_index, self.stage_name)}: "
                 f"{self.backbone}, {self.n_classes} classes{where}"]
        width = max(len(check.name) for check in self.checks)
        for check in self.checks:
            lines.append(f"{'pass' if check.passed else 'FAIL'}  {check.name:<{width}}  {check.figure}")
            if not check.passed:
                lines.append(f"      {'':<{width}}  try: {check.advice}")
        failed = len(self.failed)
        lines += ["", "all checks passed" if not failed else f"{failed} of {len(self.checks)} checks failed"]
        return "\n".join(lines)


def check_learning(
    data_dir: str | os.PathLike,
    recipe: Recipe | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    stage: int = 0,
    val_dir: str | os.PathLike | None = None,
    verbose: int = 0,
) -> LearningReport:
    """Run the learning checks of one stage of a recipe on a data folder.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped name, or None for the defaults.
        overrides: dotted recipe keys to values, over the recipe (a ``Recipe`` too).
        stage: the stage to check; default 0 (the head). Earlier stages are trained first.
        val_dir: a validation folder; default None (the recipe's split).
        verbose: 0 silent, 1 progress; default 0.

    Returns:
        A ``LearningReport``; ``passed`` is True when every check passed.

    Raises:
        RecipeError: a bad recipe or stage. TransferkitError: what ``finetune`` raises for
            the data.
    """
    recipe = load_recipe(recipe, overrides)  # a Recipe too: the overrides go over it
    with prepare_stage(data_dir, recipe, stage, val_dir=val_dir, verbose=verbose) as setup:
        return run_checks(setup, Path(data_dir))


def run_checks(setup: StageSetup, data_dir: Path | None = None,
               checks: tuple[Callable[[StageSetup], LearningCheck], ...] | None = None) -> LearningReport:
    """Run checks on a set-up stage, each from the stage's starting weights (put back after).

    Args:
        setup: from ``lr_find.prepare_stage`` (tests may break it on purpose first).
        data_dir: the data folder, for the report; default None.
        checks: the checks to run; default ``CHECKS``.

    Returns:
        A ``LearningReport``.
    """
    results = []
    for check in checks or CHECKS:
        setup.reset()
        try:
            results.append(check(setup))
        finally:
            setup.reset()
    return LearningReport(
        data_dir=Path(data_dir) if data_dir is not None else Path("."), stage_index=setup.stage_index,
        stage_name=setup.stage.name, backbone=setup.recipe.backbone, n_classes=setup.n_classes,
        cached=setup.cached, checks=tuple(results),
    )


# --- the checks ---------------------------------------------------------------------------


def _initial_loss(setup: StageSetup) -> LearningCheck:
    """The loss before training, over up to 256 training samples, against ln(classes)."""
    from transferkit.outputs import is_binary

    outputs, targets, _ = _outputs_on(setup.model, setup.train, limit=256)
    loss = _mean_loss(setup.n_classes, targets, outputs)
    expected = math.log(2 if is_binary(setup.n_classes) else setup.n_classes)
    label = "ln 2, one sigmoid unit" if is_binary(setup.n_classes) else f"ln {setup.n_classes}"
    passed = math.isfinite(loss) and abs(loss - expected) <= INITIAL_LOSS_TOLERANCE * expected
    return LearningCheck(
        "initial loss", passed, f"{loss:.3f} before training (expected about {expected:.3f} = {label})",
        "" if passed else (
            "the untrained outputs are already confident: check the output layer's initial weights and bias "
            "and the input scale (see the input check); a loss far from ln(classes) at the start makes the "
            "first steps undo it" if loss > expected else
            "the untrained model is already better than chance: are validation or label files mixed into "
            "the inputs? check the class folders"),
        loss,
    )


def _input(setup: StageSetup) -> LearningCheck:
    """The model's preprocessing on known colours, and the decoded pixels' spread."""
    error = _preprocessing_error(setup.classifier, setup.spec)
    sample = np.asarray(setup.train_images[:256])
    low, high = (float(value) for value in np.percentile(sample, [0.5, 99.5]))
    spread = high - low
    convention = _CONVENTIONS[setup.spec.preprocessing]["words"]
    figure = (f"pixels {low:.0f}..{high:.0f} of 0..255; preprocessing: {convention}, "
              f"largest difference from Keras's {error:.2g}")
    advice = []
    if spread < MIN_PIXEL_SPREAD:
        advice.append(f"the images span only {low:.0f}..{high:.0f}: they look scaled to 0..1 before they were "
                      "saved; save them as 0..255 (the model does its own preprocessing)")
    if not error <= PREPROCESSING_TOLERANCE:
        advice.append(f"the model's preprocessing does not give what {setup.spec.name}'s weights expect "
                      f"({convention}); build the model with transferkit's build_classifier")
    return LearningCheck("input", not advice, figure, "; ".join(advice), spread)


def _gradients(setup: StageSetup) -> LearningCheck:
    """One batch's gradient norm per part that should train: the head and each unfrozen block."""
    from transferkit.backend import weight_gradients
    from transferkit.model.surgery import unfrozen_blocks, walk_layers
    from transferkit.training.compile import make_loss

    model = setup.model
    head = {id(layer) for layer in walk_layers(setup.classifier.get_layer("head"))}
    expected = ["head"] + [setup.spec.blocks[index] for index in sorted(unfrozen_blocks(setup.spec,
                                                                                       setup.stage.unfreeze))]
    groups: dict[int, str] = {}
    for layer in walk_layers(model):  # a nested model comes before its own layers
        block = setup.spec.block_of(layer.name)
        if getattr(layer, "layers", None) and block is None:
            continue  # a nested model that is no block (backbone, head): its own layers are walked
        # A nested model that is a block (ConvNeXt's downsampling) names its layers' weights.
        name = "head" if id(layer) in head else setup.spec.blocks[block] if block is not None else layer.name
        for weight in layer.trainable_weights:
            groups.setdefault(id(weight), name)
    x, y, *weights = _first_batch(setup.train)
    loss_fn = make_loss(setup.n_classes, setup.recipe.loss)
    variables = list(model.trainable_weights)
    gradients = weight_gradients(
        model, lambda outputs: loss_fn(y, outputs, sample_weight=weights[0] if weights else None), x)
    squares: dict[str, float] = {}
    for variable, gradient in zip(variables, gradients):
        value = 0.0 if gradient is None else float(np.sum(np.square(np.asarray(gradient, dtype="float64"))))
        name = groups.get(id(variable), "other")
        squares[name] = squares.get(name, 0.0) + value
    norms = {name: math.sqrt(value) if math.isfinite(value) else math.nan for name, value in squares.items()}
    problems = []
    for name in expected:
        if name not in norms:
            problems.append(f"{name} has no trainable weights (frozen)")
        elif not math.isfinite(norms[name]):
            problems.append(f"{name}'s gradient is NaN or infinite")
        elif norms[name] <= GRADIENT_FLOOR:
            problems.append(f"{name}'s gradient is zero")
        elif norms[name] > GRADIENT_CEILING:
            problems.append(f"{name}'s gradient explodes ({norms[name]:.3g})")
    shown = ", ".join(f"{name} {norms[name]:.3g}" for name in expected if name in norms) or "no trainable weights"
    figure = f"gradient norms: {shown}" + (f" ({'; '.join(problems)})" if problems else "")
    advice = ("" if not problems else
              "a frozen part gets no update: make sure the head (and the stage's blocks) are trainable; a zero "
              "gradient means dead units (lower the learning rate, try head.activation = \"leaky_relu\"); NaN or "
              "exploding: lower the learning rate, check the input check")
    finite = [value for value in norms.values() if math.isfinite(value)]
    return LearningCheck("gradients", not problems, figure, advice, min(finite) if finite else None)


def _overfit_one_batch(setup: StageSetup) -> LearningCheck:
    """Train on one small batch at the stage's rate until every image of it is right."""
    import keras

    from transferkit.outputs import predicted_labels

    x, y, *_ = _first_batch(setup.train)
    x, y = x[:OVERFIT_IMAGES], y[:OVERFIT_IMAGES]
    labels = predicted_labels(y)
    rate = setup.stage.learning_rate
    advice = (f"the model cannot learn even {len(x)} images: the learning rate {rate:g} may be far too low or "
              "too high (run transferkit lr-find), or the head is frozen (see the gradient check)")
    if not setup.model.trainable_weights:
        return LearningCheck("overfit one batch", False, "nothing trains: the stage has no trainable weights",
                             advice, 0.0)
    setup.compile(rate)
    accuracy, steps = 0.0, 0
    for steps in range(OVERFIT_EVERY, OVERFIT_STEPS + 1, OVERFIT_EVERY):  # noqa: B007 (read after the loop)
        for _ in range(OVERFIT_EVERY):
            setup.model.train_on_batch(x, y)
        outputs = keras.ops.convert_to_numpy(setup.model(x, training=False))
        accuracy = float(np.mean(predicted_labels(outputs) == labels))
        if accuracy >= OVERFIT_ACCURACY:
            break
    passed = accuracy >= OVERFIT_ACCURACY
    figure = (f"{accuracy:.0%} of {len(x)} images after {steps} steps at {rate:g}"
              + ("" if passed else f" (needs {OVERFIT_ACCURACY:.0%} within {OVERFIT_STEPS})"))
    return LearningCheck("overfit one batch", passed, figure, "" if passed else advice, accuracy)


def _learning_rate(setup: StageSetup) -> LearningCheck:
    """The stage's rate against the usable range of its range test."""
    rate = setup.stage.learning_rate
    where = f"stages.{setup.stage_index}.learning_rate"
    result = range_test(setup)
    if result.usable is None:
        return LearningCheck(
            "learning rate", False, f"{rate:g}; the range test found no rate at which the loss falls",
            "nothing learns at any rate: see the gradient and overfit checks (a frozen head?), and that the "
            "labels follow the images", rate)
    low, high = result.usable
    passed = low <= rate <= high
    side = "" if passed else " (too low)" if rate < low else " (too high)"
    return LearningCheck(
        "learning rate", passed, f"{rate:g}{side}; usable {low:.2g}..{high:.2g}, suggestion {result.suggestion:.2g}",
        "" if passed else f"--set {where}={result.suggestion:.2g} (transferkit lr-find --stage {setup.stage_index} "
        "draws the curve)", rate)


def _validation_loss_falls(setup: StageSetup) -> LearningCheck:
    """A short run at the stage's rate: the best validation loss must fall below chance."""
    import keras

    from transferkit.outputs import is_binary

    def val_loss() -> float:
        outputs, targets, _ = _outputs_on(setup.model, setup.val)
        return _mean_loss(setup.n_classes, targets, outputs)

    start = val_loss()
    chance = _chance_loss(setup)
    losses = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            losses.append(val_loss())

    _short_run(setup, [Record()])
    best = min(losses) if losses else start
    target = (1 - VALIDATION_FALL) * min(start, chance)
    passed = math.isfinite(best) and best < target
    expected = "ln 2" if is_binary(setup.n_classes) else f"ln {setup.n_classes}"
    figure = (f"{start:.3f} -> {best:.3f} (best of {len(losses)} epochs); chance {chance:.3f} "
              f"(about {expected}); needs below {target:.3f}")
    advice = ("" if passed else
              "too high a learning rate (see the learning-rate check), too strong augmentation (try "
              "--set augment.rotation=0 --set augment.shift=0), or labels that do not follow the images "
              "(look into the class folders)")
    return LearningCheck("validation loss falls", passed, figure, advice, best)


def _horizontal_flip(setup: StageSetup) -> LearningCheck:
    """Where the recipe flips: after the short run, mirrored validation images against the originals."""
    from transferkit.evaluation.tta import variant_probabilities
    from transferkit.training.flips import FLIP_ADVICE, MIN_JUDGED_IMAGES, check_flips

    if not setup.recipe.augment.hflip:
        return LearningCheck("horizontal flip", True, "the recipe does not flip images (augment.hflip = false)")
    count = 0 if setup.val_images is None else len(setup.val_images)
    if count < MIN_JUDGED_IMAGES:
        return LearningCheck("horizontal flip", True, f"{count} validation images, fewer than the "
                             f"{MIN_JUDGED_IMAGES} needed to compare mirrored images with")
    _short_run(setup)
    plain, flipped = variant_probabilities(setup.classifier, setup.val_images, ("identity", "hflip"),
                                           batch_size=setup.recipe.batch_size)
    check = check_flips(plain, flipped, setup.val_labels)
    auto = setup.recipe.augment.hflip == "auto"
    passed = not check.changes_class or auto
    figure = f"after the short run, {check.figure()}"
    if auto and check.changes_class:  # finetune judges it too
        figure += ("; flipping seems to change the class: finetune's hflip = \"auto\" finds it after the first "
                   "stage (trained without flips) and flips in no stage")
    return LearningCheck("horizontal flip", passed, figure,
                         "" if passed else f"flipping seems to change the class; {FLIP_ADVICE}",
                         check.flipped_accuracy - check.accuracy)


CHECKS: tuple[Callable[[StageSetup], LearningCheck], ...] = (
    _initial_loss,
    _input,
    _gradients,
    _overfit_one_batch,
    _learning_rate,
    _validation_loss_falls,
    _horizontal_flip,
)


# --- helpers -------------------------------------------------------------------------------


def _keras_caffe(rgb: np.ndarray) -> np.ndarray:
    import keras

    return keras.applications.imagenet_utils.preprocess_input(rgb.copy(), mode="caffe")


def _keras_included(rgb: np.ndarray) -> np.ndarray:
    import keras

    # A pass-through: these backbones normalise inside the model (convnext's and mobilenet_v3's
    # preprocess_input are the same pass-through).
    return keras.applications.efficientnet_v2.preprocess_input(rgb.copy())


# Per preprocessing convention of the registry: Keras's own function, and in words.
_CONVENTIONS = {
    "caffe": {"reference": _keras_caffe, "words": "BGR, ImageNet mean subtracted"},
    "included": {"reference": _keras_included, "words": "RGB 0..255 as they are; the backbone normalises them"},
}
_KNOWN_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [255, 255, 255], [200, 120, 40]],
                          dtype="float32")


def _preprocessing_error(classifier, spec) -> float:
    """The largest difference between the model's preprocessing and Keras's on plain colours."""
    import keras

    size = int(classifier.get_layer("backbone").input_shape[1])
    images = np.broadcast_to(_KNOWN_COLOURS[:, None, None, :], (len(_KNOWN_COLOURS), size, size, 3))
    images = np.ascontiguousarray(images)
    ours = np.asarray(keras.ops.convert_to_numpy(classifier.get_layer("preprocessing")(images, training=False)),
                      dtype="float32")
    reference = _CONVENTIONS[spec.preprocessing]["reference"](images)
    return float(np.max(np.abs(ours - reference)))


def _short_run(setup: StageSetup, callbacks=()) -> None:
    """Train the stage's model at its rate for ``SHORT_RUN_EPOCHS`` epochs (more on tiny data:
    at least ``SHORT_RUN_STEPS`` steps, at most ``MAX_SHORT_RUN_EPOCHS`` epochs)."""
    if not setup.model.trainable_weights:
        return
    setup.compile(setup.stage.learning_rate)
    epochs = min(MAX_SHORT_RUN_EPOCHS, max(SHORT_RUN_EPOCHS, math.ceil(SHORT_RUN_STEPS / len(setup.train))))
    setup.model.fit(keras_input(setup.train), epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks))
    if hasattr(setup.train, "set_epoch"):
        setup.train.set_epoch(0)


def _first_batch(batches):
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(0)
    return batches[0]


def _outputs_on(model, batches, limit: int | None = None):
    """(outputs, targets, sample weights or None) over the batches in order, up to ``limit`` samples."""
    import keras

    outputs, targets, weights = [], [], []
    count = 0
    for index in range(len(batches)):
        x, y, *w = batches[index]
        outputs.append(np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype="float32"))
        targets.append(np.asarray(y))
        weights.append(w[0] if w else np.ones(len(y), dtype="float32"))
        count += len(y)
        if limit is not None and count >= limit:
            break
    return np.concatenate(outputs), np.concatenate(targets), np.concatenate(weights)


def _mean_loss(n_classes: int, targets: np.ndarray, outputs: np.ndarray) -> float:
    """The plain cross-entropy (no label smoothing), averaged over the samples."""
    from transferkit.training.compile import make_loss

    return float(np.asarray(make_loss(n_classes)(targets, outputs)))


def _chance_loss(setup: StageSetup) -> float:
    """The validation loss of the best guess that ignores the images: uniform, or the training
    classes' shares, whichever is lower."""
    from transferkit.outputs import class_probabilities

    val_targets = class_probabilities(setup.val.targets) if setup.val.targets.shape[-1] == 1 else setup.val.targets
    train_targets = (class_probabilities(setup.train.targets) if setup.train.targets.shape[-1] == 1
                     else setup.train.targets)
    prior = np.clip(np.mean(train_targets, axis=0), 1e-6, 1)
    shares = np.mean(val_targets, axis=0)
    uniform = math.log(len(shares))
    return min(uniform, float(-np.sum(shares * np.log(prior))))
