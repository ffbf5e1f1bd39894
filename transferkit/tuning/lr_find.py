"""The learning-rate range test: which rates make one stage learn, and which one to use.

    result = find_learning_rate("images/", "quickstart", {"weights": "none"}, stage=0, output="lr_find.png")
    result.suggestion, result.usable, result.override()   # "stages.0.learning_rate=0.003"

The stage is set up as ``run_stages`` would begin it (``prepare_stage``): the data decoded
and split as ``finetune`` does, the earlier stages trained, the stage's blocks opened, and,
where its bottom is frozen and the recipe caches features, only its top trained on cached
features of the frozen part (much faster). Then the rate grows exponentially from
``min_lr`` to ``max_lr``, one step per training batch (cycling over them), and the loss of
each step is smoothed (an exponential average, bias-corrected). The test stops when the
smoothed loss passes ``DIVERGED`` x its minimum, or is no longer finite.

Reading the curve: ``r_min`` is the rate at the smoothed loss's minimum (beyond it the loss
rises: too high), ``r_fall`` the rate from which on the smoothed loss stays 10% of its way
from the start to the minimum below the start (where learning shows within the test's few
steps).

- suggestion: ``sqrt(r_fall x r_min / 10)``, the middle on the log scale between where
  learning showed and a tenth of the rate at the minimum (the usual "minimum / 10" rule).
  On small, easy data the loss keeps falling almost to the divergence (every step learns
  more), so the minimum's tenth alone is often too bold for a whole stage; the middle
  trains steadily. Never below ``r_fall``;
- usable range: ``r_fall / 10 .. r_min``, not below the lowest rate tested. A stage runs far
  more steps at one rate than the test spends there, so a rate a little below where the test first saw learning still
  learns; above the minimum's rate the loss climbs.

When the smoothed loss never falls by ``MIN_FALL`` of its start after the start (the first
tenth of the steps), no rate made the stage learn: no suggestion. Where it stays about level,
the stage does not learn (a frozen head, labels that do not follow the images ...); where it
rises above its start instead, every rate tried was too high, and a range test from a lower
``min_lr`` is what tells.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.backbones import BackboneSpec, get_spec
from transferkit.data.prepare import prepare_data
from transferkit.errors import RecipeError, RunError
from transferkit.files import atomic_path, require_apart, require_new_file, require_writable_place, write_failure
from transferkit.keras_private import build_for_fit
from transferkit.model.build import build_model
from transferkit.recipe import Recipe, StageConfig, load_recipe
from transferkit.runs import require_outside_runs
from transferkit.strategies import require_one_process, resolve_distribution
from transferkit.training.checkpoint import TrainingState
from transferkit.training.compile import make_loss, make_optimizer
from transferkit.training.stages import Checkpointing, StageOptions, StagesRun, begin_stage, run_stages

log = logging.getLogger("transferkit")

MIN_LR = 1e-7
MAX_LR = 10.0
MIN_STEPS, MAX_STEPS, STEPS_PER_BATCH = 50, 200, 8  # steps: 8 passes over the batches, within 50..200
SMOOTHING = 0.9  # weight of the past in the averaged loss
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
MIN_FALL = 0.02  # a fall of the smoothed loss below this share of its start is no learning
FALL_SHOWN = 0.1  # r_fall: where the smoothed loss has fallen this share of its way to the minimum
FIGURE_SIZE = (7.0, 4.5)


def stage_label(index: int, name: str) -> str:
    """A recipe's stage as lr-find and doctor --model name it: its name and the flag that
    picks it, 0-based as ``--stage`` and ``stages.N`` count (finetune's "stage 1/2" counts
    from 1), e.g. "stage 'head' (--stage 0)"."""
    return f"stage {name!r} (--stage {index})"


@dataclass
class StageSetup:
    """One stage of a recipe as ``run_stages`` begins it: what trains and on what.

    Attributes:
        recipe: the resolved recipe.
        stage_index: which stage (0: the first).
        classifier: the whole classifier (earlier stages trained, the stage's blocks open).
        model: what the stage fits: the classifier, or its top part on cached features.
        train, val: the batches ``model`` trains and validates on (images or features).
        n_classes: number of classes.
        class_names: the class names.
        train_images: the decoded training images, uint8 (n, S, S, 3), as training reads them.
        val_images, val_labels: the decoded validation images, uint8, and their class
            indices (None where a caller set the stage up without them).
        cached: whether ``model`` is the top part on cached features.
        run: the ``StagesRun`` the stage was begun in (it holds the cached features);
            ``close`` releases it.
        initial_weights: ``model``'s weights as the stage begins (``reset`` puts them back).
    """

    recipe: Recipe
    stage_index: int
    classifier: keras.Model
    model: keras.Model
    train: keras.utils.PyDataset
    val: keras.utils.PyDataset
    n_classes: int
    class_names: list[str]
    train_images: np.ndarray
    cached: bool
    run: StagesRun | None = None
    initial_weights: list = field(default_factory=list)
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def stage(self) -> StageConfig:
        """The stage's recipe entry."""
        return self.recipe.stages[self.stage_index]

    @property
    def spec(self) -> BackboneSpec:
        """The backbone's registry entry."""
        return get_spec(self.recipe.backbone)

    def reset(self) -> None:
        """Put back the weights the stage starts with (after a check or a test trained them)."""
        self.model.set_weights(self.initial_weights)

    def compile(self, learning_rate: float) -> None:
        """Compile ``model`` with the stage's optimizer and weight decay at a constant rate,
        and the recipe's loss (in the distribution strategy's scope, where the optimizer's
        variables must be made)."""
        with self.run.scope() if self.run is not None else contextlib.nullcontext():
            self.model.compile(
                optimizer=make_optimizer(self.stage.optimizer, learning_rate, self.stage.weight_decay),
                loss=make_loss(self.n_classes, self.recipe.loss),
                metrics=["accuracy"],
            )
            if len(self.train):
                build_for_fit(self.model, self.train[0])  # fit's step traced once

    def close(self) -> None:
        """Release the cached features."""
        if self.run is not None:
            self.run.close()
            self.run = None

    def __enter__(self) -> StageSetup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare_stage(
    data_dir: str | os.PathLike,
    recipe: Recipe,
    stage: int = 0,
    *,
    val_dir: str | os.PathLike | None = None,
    verbose: int = 0,
) -> StageSetup:
    """Set up one stage of a recipe on a data folder as ``finetune`` would begin it.

    The images are decoded and split as in ``finetune``; the stages before ``stage`` are
    trained as the recipe says (so a later stage starts from a trained head); then the
    stage's blocks are opened and, where its bottom is frozen and ``cache.enabled``, the
    features of the frozen part are computed once.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: the resolved recipe.
        stage: index of the stage; default 0.
        val_dir: a validation folder; default None (the recipe's split).
        verbose: 0 silent, 1 progress; default 0.

    Returns:
        A ``StageSetup`` (close it, or use it in a ``with`` block, to release the cache).

    Raises:
        RecipeError: no such stage. TransferkitError: what ``finetune`` would raise for the data.
    """
    if not 0 <= stage < len(recipe.stages):
        raise RecipeError(f"--stage {stage}: the recipe has {len(recipe.stages)} stage(s); "
                          f"use 0..{len(recipe.stages) - 1}")
    require_one_process(recipe.strategy, recipe.devices, "lr-find (and doctor --model)")
    resolve_distribution(recipe.strategy, recipe.devices)  # before TensorFlow starts: it may set its devices
    prepared = prepare_data(data_dir, recipe, val_dir=val_dir, verbose=verbose)
    keras.utils.set_random_seed(recipe.seed)
    built = build_model(recipe, prepared.n_classes)
    classifier = built.model
    spec = get_spec(recipe.backbone)
    train, val = prepared.batches(recipe)
    options = StageOptions(verbose=verbose, seed=recipe.seed, cache=recipe.cache, loss=recipe.loss,
                           distribution=built.distribution)
    earlier = [config for config in recipe.stages[:stage] if config.epochs > 0]
    if earlier:
        run_stages(classifier, spec, earlier, train, val, prepared.n_classes, options)
    # The stage alone, begun as training begins it; a stage of 0 epochs is tested as one
    # (the feature plan caches only for stages that train). The head's BatchNorm statistics
    # are set before the first stage that trains, so once the earlier ones did.
    tested = recipe.stages[stage].model_copy(update={"epochs": max(1, recipe.stages[stage].epochs)})
    run = StagesRun.start(classifier, spec, [tested], train, val, prepared.n_classes, options,
                          Checkpointing(state=TrainingState(calibrated=bool(earlier))))
    try:
        begun = begin_stage(run, 0)
    except BaseException:
        run.close()
        raise
    setup = StageSetup(
        recipe=recipe, stage_index=stage, classifier=classifier, model=begun.model, train=begun.train,
        val=begun.val, n_classes=prepared.n_classes, class_names=list(prepared.class_names),
        train_images=prepared.train_images, cached=begun.cached, run=run, val_images=prepared.val_images,
        val_labels=prepared.val_labels,
    )
    setup.initial_weights = setup.model.get_weights()
    return setup


@dataclass
class RangeTest:
    """What the learning-rate range test saw.

    Attributes:
        learning_rates: the rate of each step taken.
        losses: each step's training loss (of the batch, before its update).
        smoothed: the smoothed loss per step.
        min_lr, max_lr: the range the test was to cover (it may stop before ``max_lr``).
        steps: the steps planned (more than taken when the loss diverged).
        suggestion: the rate to use (see the module's docstring), or None when no rate made
            the loss fall.
        usable: (lowest, highest) rate that learns, or None.
        stage_index: the stage tested; None for a test on a model outside a recipe.
        stage_name: its name in the recipe; None outside a recipe.
        figure: the plot written, or None.
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    min_lr: float
    max_lr: float
    steps: int
    suggestion: float | None = None
    usable: tuple[float, float] | None = None
    stage_index: int | None = None
    stage_name: str | None = None
    figure: Path | None = None

    @property
    def lowest_at_start(self) -> bool:
        """Whether the smoothed loss never fell below its start and rose clearly above it
        (by ``MIN_FALL``; diverging counts): the rates tried were all too high. A level loss
        (no learning at all) is not."""
        values = np.where(np.isfinite(self.smoothed), self.smoothed, np.inf)
        head = _start_steps(len(values))
        if self.suggestion is not None:
            return False
        if len(values) <= head:  # diverged within its first steps: the first rates were too high already
            return self.diverged
        start = float(np.median(values[:head]))
        return bool(values[head:].max() > start + MIN_FALL * abs(start))

    @property
    def diverged(self) -> bool:
        """Whether the test stopped early because the loss diverged."""
        return len(self.learning_rates) < self.steps

    def override(self) -> str | None:
        """The ``--set`` assignment of the suggestion, e.g. "stages.0.learning_rate=0.003"."""
        if self.suggestion is None or self.stage_index is None:
            return None
        return f"stages.{self.stage_index}.learning_rate={self.suggestion:.2g}"

    def describe(self) -> str:
        """A few lines for the terminal: what was tested, the usable range, the suggestion
        and the ``--set`` to use it."""
        taken = len(self.learning_rates)
        stage = "the model" if self.stage_index is None else stage_label(self.stage_index, self.stage_name)
        lines = [f"learning-rate range test of {stage}: {taken} of {self.steps} steps, "
                 f"{self.learning_rates[0]:.2g} .. {self.learning_rates[-1]:.2g}"
                 + (" (stopped: the loss diverged)" if self.diverged else "")]
        if self.suggestion is None and self.lowest_at_start:
            lines.append(f"the loss was lowest at the start of the range, {self.learning_rates[0]:.2g}: every rate "
                         "tried was too high; run the test again with a lower --min-lr")
        elif self.suggestion is None:
            lines.append("no rate made the loss fall: run transferkit doctor DATA_DIR --model to see why")
        else:
            low, high = self.usable
            lines += [f"usable: {low:.2g} .. {high:.2g} (the smoothed loss is lowest at {high:.2g})",
                      f"suggestion: {self.suggestion:.2g} (midway, on the log scale, between where the loss "
                      f"began to fall, {low * 10:.2g}, and a tenth of the rate at its minimum)"]
            if self.override() is not None:
                lines.append(f"use it with: --set {self.override()}")
        if self.figure is not None:
            lines.append(f"wrote {self.figure}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The result as JSON-serialisable values."""
        return {
            "stage": self.stage_index, "stage_name": self.stage_name, "suggestion": self.suggestion,
            "lowest_at_start": self.lowest_at_start,
            "usable": list(self.usable) if self.usable else None, "min_lr": self.min_lr, "max_lr": self.max_lr,
            "steps": self.steps, "steps_taken": len(self.learning_rates), "diverged": self.diverged,
            "learning_rates": self.learning_rates.tolist(), "losses": self.losses.tolist(),
            "smoothed": self.smoothed.tolist(), "figure": str(self.figure) if self.figure else None,
        }


def find_learning_rate(
    data_dir: str | os.PathLike,
    recipe: Recipe | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    stage: int = 0,
    *,
    val_dir: str | os.PathLike | None = None,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
    steps: int | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    verbose: int = 0,
) -> RangeTest:
    """The learning-rate range test of one stage of a recipe on a data folder.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped name, or None for the defaults.
        overrides: dotted recipe keys to values, over the recipe (a ``Recipe`` too).
        stage: the stage to test; default 0 (the head). Earlier stages are trained first.
        val_dir: a validation folder; default None (the recipe's split; only the split's
            training part is used).
        min_lr, max_lr: the range of rates; default 1e-7 .. 10.
        steps: steps over the range; default 8 passes over the training batches, at least
            50 and at most 200.
        output: where to draw the plot (PNG); default None (no plot).
        force: replace an existing plot file; default False.
        verbose: 0 silent, 1 progress; default 0.

    Returns:
        A ``RangeTest`` with the suggestion and the usable range.

    Raises:
        RecipeError: a bad recipe, stage or range. RunError: the plot cannot be written
            there (``check_plot_output``). TransferkitError: what ``finetune`` raises for
            the data.
    """
    recipe = load_recipe(recipe, overrides)  # a Recipe too: the overrides go over it
    _check_range(min_lr, max_lr, steps)
    if output is not None:
        check_plot_output(output, [data_dir, val_dir], force)
    with prepare_stage(data_dir, recipe, stage, val_dir=val_dir, verbose=verbose) as setup:
        if verbose:
            log.info(f"learning-rate range test of {stage_label(stage, setup.stage.name)}: "
                     f"{setup.stage.optimizer}{', on cached features' if setup.cached else ''}")
        result = range_test(setup, min_lr=min_lr, max_lr=max_lr, steps=steps)
        result.stage_index, result.stage_name = stage, setup.stage.name
    if output is not None:
        result.figure = plot_range_test(result, output)
    return result


def range_test(setup: StageSetup, *, min_lr: float = MIN_LR, max_lr: float = MAX_LR,
               steps: int | None = None) -> RangeTest:
    """Run the range test on a set-up stage; its weights are put back afterwards.

    Args:
        setup: from ``prepare_stage`` (or any ``StageSetup``: a model, its batches, the
            recipe giving the optimizer and loss).
        min_lr, max_lr: the range of rates; default 1e-7 .. 10.
        steps: default 8 passes over the batches, within 50..200.

    Returns:
        A ``RangeTest`` (``stage_index`` is the set-up's stage).
    """
    _check_range(min_lr, max_lr, steps)
    batches = setup.train
    steps = steps or int(np.clip(STEPS_PER_BATCH * len(batches), MIN_STEPS, MAX_STEPS))
    planned = min_lr * (max_lr / min_lr) ** (np.arange(steps) / max(steps - 1, 1))
    setup.compile(float(planned[0]))
    model = setup.model
    rates, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    try:
        for step, rate in enumerate(planned):
            epoch, index = divmod(step, len(batches))
            if index == 0 and hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            x, y, *weights = batches[index]
            model.optimizer.learning_rate = float(rate)
            loss = float(np.asarray(model.train_on_batch(x, y, sample_weight=weights[0] if weights else None)
                                    ).reshape(-1)[0])
            rates.append(float(rate))
            losses.append(loss)
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            value = average / (1 - SMOOTHING ** (step + 1))
            smoothed.append(value)
            if not math.isfinite(value) or value > DIVERGED * best:
                break
            best = min(best, value)
    finally:
        setup.reset()
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(0)
    result = RangeTest(np.asarray(rates), np.asarray(losses), np.asarray(smoothed), min_lr, max_lr, steps,
                       stage_index=setup.stage_index)
    result.suggestion, result.usable = suggest(result.learning_rates, result.smoothed)
    return result


def suggest(learning_rates: np.ndarray, smoothed: np.ndarray) -> tuple[float | None, tuple[float, float] | None]:
    """The suggestion and the usable range from a range test's smoothed loss (the rules
    are in the module's docstring). The start is the median smoothed loss of the first
    tenth of the steps (at least 3): one batch's loss alone is too noisy a start.

    Returns:
        (suggestion, (lowest, highest) usable rate), or (None, None) when the loss never fell
        below its start after it.
    """
    values = np.where(np.isfinite(smoothed), smoothed, np.inf)
    head = _start_steps(len(values))
    if len(values) <= head:
        return None, None
    start = float(np.median(values[:head]))
    lowest = head + int(np.argmin(values[head:]))  # one noisy batch within the start is no minimum
    fall = start - float(values[lowest])
    if fall <= MIN_FALL * abs(start):
        return None, None
    # From where on the loss stays below the threshold until the minimum (noise before it
    # may dip below once).
    above = np.flatnonzero(values[: lowest + 1] > start - FALL_SHOWN * fall)
    shown = int(above[-1]) + 1 if len(above) else 0
    r_min, r_fall = float(learning_rates[lowest]), float(learning_rates[shown])
    # The usable range starts a tenth below where learning showed, but not below the range tested.
    return max(math.sqrt(r_fall * r_min / 10), r_fall), (max(r_fall / 10, float(learning_rates[0])), r_min)


def _start_steps(taken: int) -> int:
    """How many of a range test's first steps make its start: a tenth, at least 3."""
    return max(3, taken // 10)


def check_plot_output(path: str | os.PathLike, data_folders=(), force: bool = False) -> None:
    """Fail before the range test where its plot could not be written, would land among
    the images read, or would replace an earlier plot unasked.

    Raises:
        RunError: not a .png name, a folder, a file that exists (without ``force``), inside
            a data folder (it would be read as an image of a class) or a run folder, or its
            folder cannot be created or written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise RunError(f"--output {path}: the plot is a PNG; use a .png file name")
    if path.is_dir():
        raise RunError(f"--output {path} is a folder; name a .png file in it")
    require_outside_runs(path, "plot")
    require_new_file(path, force, "plot")
    require_apart(path, data_folders, "plot")
    require_writable_place(path.parent)


def plot_range_test(result: RangeTest, path: str | os.PathLike) -> Path:
    """Draw the smoothed loss against the learning rate (log scale), the usable range shaded
    and the suggestion marked; written atomically as PNG, its folder made if missing.

    Returns:
        The path written.

    Raises:
        RunError: the plot cannot be written (a full disk, no permission), in one line.
    """
    from matplotlib.figure import Figure

    from transferkit.evaluation.figures import DPI

    figure = Figure(figsize=FIGURE_SIZE)
    axes = figure.subplots()
    rates, smoothed = result.learning_rates, result.smoothed
    axes.plot(rates, result.losses, color="0.75", linewidth=0.8, label="loss per step")
    axes.plot(rates, smoothed, color="C0", linewidth=2, label="smoothed loss")
    if result.usable is not None:
        axes.axvspan(*result.usable, color="C2", alpha=0.12, label="usable range")
    if result.suggestion is not None:
        at = float(np.interp(np.log(result.suggestion), np.log(rates), smoothed))
        axes.axvline(result.suggestion, color="C3", linestyle="--", linewidth=1)
        axes.plot([result.suggestion], [at], "o", color="C3", label=f"suggestion {result.suggestion:.2g}")
    finite = smoothed[np.isfinite(smoothed)]
    if len(finite):
        # Up to the minimum and a little beyond: the diverging tail would flatten the rest.
        low = float(finite.min())
        high = float(finite[: int(np.argmin(finite)) + 1].max())
        margin = 0.1 * (high - low) + 1e-3
        axes.set_ylim(low - margin, high + 3 * margin)
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("training loss")
    stage = "range test" if result.stage_index is None else stage_label(result.stage_index, result.stage_name)
    axes.set_title(f"learning-rate range test, {stage}" + (" (stopped: the loss diverged)" if result.diverged else ""))
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="best")
    figure.set_layout_engine("constrained")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=DPI, format="png")
    except OSError as error:
        raise RunError(f"cannot write the plot {path}: {write_failure(error)}; choose another -o") from error
    return path


def _check_range(min_lr: float, max_lr: float, steps: int | None) -> None:
    if not 0 < min_lr < max_lr:
        raise RecipeError(f"learning-rate range {min_lr:g}..{max_lr:g}: need 0 < min_lr < max_lr, e.g. 1e-7..10")
    if steps is not None and steps < 2:
        raise RecipeError(f"steps {steps}: the range test needs at least 2 steps")
