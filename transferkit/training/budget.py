"""Time budget: the stages' epochs, and the feature cache's views, planned to fit a wall-clock budget.

``finetune --time-budget 10m`` (recipe key ``time_budget``) bounds a training from the start
of its stages to the end of the work after them (validation metrics, calibration, the
rejection threshold); before it, the data's decoding and the model's building, and after it,
the final save of the run folder, are outside the budget. The rules:

1. The recipe's epochs are caps: the budget shortens a stage, never lengthens one.
2. Speed is timed, not guessed: a stage's epoch costs its steps, timed after the first
   (traced) call (3 steps, or a whole epoch when an epoch holds fewer), plus what follows
   each epoch (validation, the checkpoint), timed at each epoch's end; a whole epoch timed
   without the trace replaces the estimate. Until a stage is timed, its epochs are taken to
   cost as much as the slowest epoch timed so far (a later stage trains more of the network),
   and its start (compile, trace) as much as the slowest start so far.
3. The split: the time left for training (the budget left, less what the work after training
   needs) is shared among the stages still to run in proportion to their epochs left
   weighted by their epochs' cost, so that each keeps the same fraction of its epochs. A stage
   is planned, and the plan printed, when its speed is timed; each stage starts with the time
   the earlier ones left. The epoch under way when a stage is planned is always finished (so
   the run's first stage has at least one); a later stage that cannot be expected to start
   and finish one epoch in the time left is skipped.
4. Stops: at an epoch's end once the stage's planned epochs are done, or when one more epoch
   would end past the stage's share (the time left less what the later stages are planned
   to take); after any step, when the budget itself would run out before the epoch's
   validation ends. An epoch cut so keeps its (partial) row in the history and is weighed
   by early stopping like any other; early stopping still ends a stage first where it fires.
5. The work after training is kept from the budget: its image passes (calibration's over the
   validation images; for a run written to a folder, the TTA choice's variants and the
   rejection fit's passes: ``trust.record.after_training_passes``), at the speed the feature
   cache's pass measured (without a cache, the last epoch's validation), plus
   ``AFTER_TRAINING_SECONDS``.
6. Cached views: once the validation images' features are computed (their time per image
   known), the views after the first are computed only while they take at most half the
   training time left (a stage's epoch ``e`` waits for view ``e``).
7. A resumed run (``--resume``) has the whole budget again for the epochs it has left: a
   budget bounds one command on one machine, and the time an interrupted process spent is
   not charged to the next.
8. ``transferkit tune``: each trial trains within the recipe's budget.

A stage shortened by the budget keeps its learning-rate schedule's length (the schedule is
built when the stage is compiled, before its speed is timed): a cosine or one-cycle schedule
ends before its end.

``TimeBudget`` is the plan and its clock; ``training.stages`` asks it whether a stage starts
(``allows``), hands ``fit`` its ``callback`` and the feature cache its ``cache_views``, and
returns its ``record`` (metrics.json "time_budget").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import keras

from transferkit.recipe import StageConfig
from transferkit.runs import stage_epochs

log = logging.getLogger("transferkit")

# Besides the forward passes: engines built and figures drawn after training.
AFTER_TRAINING_SECONDS = 2.0
# Steps timed after the first (traced) call before a stage is planned.
TIMED_STEPS = 3
# At most this share of the training time left goes to computing cached views after the first.
VIEWS_SHARE = 0.5


@dataclass
class StagePlan:
    """One stage under the budget: its cap, its plan, and how it ended.

    Attributes:
        stage: the stage's name.
        recipe_epochs: the recipe's epochs (the cap).
        done_before: epochs done before this process (a resumed run), counted in the others.
        planned_epochs: the epochs planned (counting ``done_before``); None until timed.
        epochs: the epochs it has done (counting ``done_before``; one cut short included).
        epoch_seconds: an epoch's cost, timed (None until then).
        start_seconds: from the stage's start to the end of its first call, less the feature
            cache's pass (compiling, tracing); None until then.
        ended_by: "recipe epochs", "plan", "budget" (the time ran out), "early stopping",
            "skipped" (no time for an epoch), "before resume", or None (not run).
        cut_mid_epoch: its last epoch was stopped after a step by the budget.
    """

    stage: str
    recipe_epochs: int
    done_before: int = 0
    planned_epochs: int | None = None
    epochs: int = 0
    epoch_seconds: float | None = None
    start_seconds: float | None = None
    ended_by: str | None = None
    cut_mid_epoch: bool = False

    def left(self) -> int:
        """Epochs of the cap not done."""
        return max(0, self.recipe_epochs - self.epochs)


class TimeBudget:
    """The budget's clock and plan over a run of stages (see the module's rules).

    Args:
        seconds: the budget.
        stages: the recipe's stages.
        train_images, val_images: how many images train and validate.
        after_training_passes: the image passes of the work after training (each image, or
            variant of one, once); default None (the training images once and the validation
            images three times).
        first_stage: the stage the run starts at (a resumed run's); default 0.
        done_before: epochs done in that stage before (a resumed run's); default 0.
        verbose: print the plan through the ``transferkit`` logger; default 0.
        clock: seconds, monotonic; default ``time.perf_counter`` (the clock ``training.stages``
            times a stage's start with).
    """

    def __init__(self, seconds: float, stages: Sequence[StageConfig], *, train_images: int, val_images: int,
                 first_stage: int = 0, done_before: int = 0, verbose: int | str = 0,
                 clock: Callable[[], float] = time.perf_counter, after_training_passes: int | None = None,
                 history_stages: Sequence[str] = ()):
        self.seconds, self.clock, self.verbose = seconds, clock, verbose
        self.started = clock()
        self.train_images, self.val_images = train_images, val_images
        self.after_training_passes = (train_images + 3 * val_images if after_training_passes is None
                                      else after_training_passes)
        self.plans = [StagePlan(stage.name, stage.epochs) for stage in stages]
        # The stages done before a resume: their epochs as the history has them.
        groups = stage_epochs(history_stages)
        for plan in self.plans[:first_stage]:
            trained = groups.pop(0)[1] if groups and groups[0][0] == plan.stage else 0
            plan.ended_by, plan.epochs = "before resume", trained
        if first_stage < len(self.plans):
            self.plans[first_stage].done_before = self.plans[first_stage].epochs = done_before
        self.resumed_at = first_stage if first_stage or done_before else None
        # The run's first stage to train starts whatever the time (rule 3).
        self.first_stage = next((j for j in range(first_stage, len(self.plans)) if self.plans[j].left() > 0), None)
        self.forward_seconds: float | None = None  # one image's forward pass, once measured
        self.views: list[dict] = []  # per feature pass: the views asked for and those computed
        self._allowed: dict[int, bool] = {}
        self._later_seconds: dict[int, float] = {}  # per planned stage: what the later ones are planned to take
        caps = ", ".join(f"'{plan.stage}' {plan.left()}" for plan in self.plans if plan.left())
        self._say(f"time budget {_seconds(seconds)}: the stages' epochs (at most the recipe's: {caps}) are planned "
                  "once their first steps are timed")

    # --- the clock -------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return self.clock() - self.started

    def after_training_seconds(self) -> float:
        """What the work after training is expected to take (rule 5)."""
        forward = self.forward_seconds or 0.0
        return AFTER_TRAINING_SECONDS + forward * self.after_training_passes

    def training_left(self) -> float:
        """Seconds left for training (may be negative)."""
        return self.seconds - self.elapsed() - self.after_training_seconds()

    # --- the plan --------------------------------------------------------------------------

    def allows(self, index: int) -> bool:
        """Whether stage ``index`` starts (decided once; a skipped stage is recorded). A stage
        whose epochs are all done (resumed after its last) starts: it only restores its best
        weights."""
        if index not in self._allowed:
            plan = self.plans[index]
            needed = self._start_estimate() + (self._epoch_estimate(index) or 0.0)
            allowed = plan.left() == 0 or index == self.first_stage or self.training_left() >= needed
            if not allowed:
                plan.ended_by = "skipped"
                self._say(f"time budget: stage '{plan.stage}' skipped: {max(0.0, self.training_left()):.1f} s left "
                          f"for training, its start and one epoch take about {needed:.1f} s")
            self._allowed[index] = allowed
        return self._allowed[index]

    def callback(self, index: int, *, began: float, caching_seconds: float, steps_per_epoch: int,
                 cached: bool) -> keras.callbacks.Callback:
        """The callback that times stage ``index``'s fit, plans it and stops it (rules 2-4).

        Args:
            index: the stage.
            began: ``clock()`` when the stage began (before its feature cache and compile).
            caching_seconds: the feature cache's pass in its start, not a cost of the stage.
            steps_per_epoch: steps in one of its epochs.
            cached: it trains on cached features (its validation is then a few milliseconds).

        Returns:
            A Keras callback, to come after those that validate and checkpoint.
        """
        return _BudgetCallback(self, index, began, caching_seconds, steps_per_epoch, cached)

    def cache_views(self, views: int, seconds_per_image: float) -> int:
        """The views a feature pass computes (rule 6), once its validation images timed one
        image's forward pass (which also prices the work after training, rule 5).

        Args:
            views: the views the stages would train on.
            seconds_per_image: the frozen part's forward pass of one image.

        Returns:
            The views to compute: at least 1, at most ``views``.
        """
        self.forward_seconds = seconds_per_image
        view_seconds = max(seconds_per_image * self.train_images, 1e-9)
        extra = math.floor(VIEWS_SHARE * max(0.0, self.training_left()) / view_seconds)
        chosen = max(1, min(views, 1 + extra))
        self.views.append({"views": views, "computed": chosen, "seconds_per_view": round(view_seconds, 3)})
        if chosen < views:
            self._say(f"time budget: {chosen} of {views} cached view(s), {view_seconds:.1f} s each")
        return chosen

    def plan(self, index: int, under_way: bool) -> None:
        """Plan stage ``index`` from its timed epoch cost (rule 3), and print the plan.

        Args:
            index: the stage, its ``epoch_seconds`` timed.
            under_way: an epoch of it is under way (it is finished whatever the plan).
        """
        current = self.plans[index]
        later = [j for j in range(index + 1, len(self.plans)) if self.plans[j].left() > 0
                 and self.plans[j].ended_by is None]
        costs = {j: self.plans[j].left() * (self._epoch_estimate(j) or 0.0) for j in [index, *later]}
        left = self.training_left() - len(later) * self._start_estimate()
        total = sum(costs.values())
        fraction = 1.0 if total <= 0 else min(1.0, max(0.0, left) / total)
        current.planned_epochs = min(current.recipe_epochs, current.epochs + max(
            int(under_way), math.floor(fraction * current.left())))
        self._later_seconds[index] = fraction * sum(costs[j] for j in later) + len(later) * self._start_estimate()
        parts = [f"'{current.stage}' {current.planned_epochs} of {current.recipe_epochs} epochs "
                 f"({current.epoch_seconds:.2f} s each)"]
        for j in later:
            plan = self.plans[j]
            guess = min(plan.recipe_epochs, plan.epochs + math.floor(fraction * plan.left()))
            parts.append(f"'{plan.stage}' about {guess} of {plan.recipe_epochs} "
                         f"(guessed {self._epoch_estimate(j):.2f} s each until timed)")
        self._say(f"time budget {_seconds(self.seconds)}: {max(0.0, self.training_left()):.1f} s left for training: "
                  f"{'; '.join(parts)}; {self.after_training_seconds():.1f} s kept for the work after training")

    def stage_deadline_left(self, index: int) -> float:
        """Seconds left before stage ``index``'s share runs out."""
        return self.training_left() - self._later_seconds.get(index, 0.0)

    def _epoch_estimate(self, index: int) -> float | None:
        """Stage ``index``'s epoch cost: timed, else the slowest timed so far (rule 2)."""
        own = self.plans[index].epoch_seconds
        if own is not None:
            return own
        timed = [plan.epoch_seconds for plan in self.plans if plan.epoch_seconds is not None]
        return max(timed, default=None)

    def _start_estimate(self) -> float:
        return max((plan.start_seconds for plan in self.plans if plan.start_seconds is not None), default=0.0)

    # --- the record ------------------------------------------------------------------------

    def record(self) -> dict:
        """What the budget planned and what came of it (metrics.json "time_budget")."""
        return {
            "seconds": self.seconds,
            "training_seconds": round(self.elapsed(), 3),
            "after_training_seconds": round(self.after_training_seconds(), 3),
            "resumed_at_stage": self.resumed_at,
            "cache_views": self.views,
            "stages": [asdict(plan) for plan in self.plans],
        }

    def finish(self) -> dict:
        """Print how training went under the budget; return ``record()``."""
        for plan in self.plans:
            if plan.ended_by is None and plan.recipe_epochs and not plan.left():
                plan.ended_by = "recipe epochs"  # resumed after its last epoch
        parts = [f"'{plan.stage}' {plan.epochs}/{plan.recipe_epochs} epochs ({plan.ended_by or 'not run'})"
                 for plan in self.plans]
        self._say(f"time budget {_seconds(self.seconds)}: trained in {self.elapsed():.1f} s: {', '.join(parts)}")
        return self.record()

    def _say(self, message: str) -> None:
        if self.verbose:
            log.info(message)


def _seconds(seconds: float) -> str:
    return f"{seconds:g} s"


class _BudgetCallback(keras.callbacks.Callback):
    """Times a stage's fit, has it planned once timed, and stops it (rules 2-4)."""

    def __init__(self, budget: TimeBudget, index: int, began: float, caching_seconds: float,
                 steps_per_epoch: int, cached: bool):
        super().__init__()
        self.budget, self.index, self.plan = budget, index, budget.plans[index]
        self.began, self.caching_seconds = began, caching_seconds
        self.steps_per_epoch, self.cached = max(1, steps_per_epoch), cached
        self.first_call_done = False
        self.busy, self.steps_timed = 0.0, 0  # calls after the first: seconds and steps
        self.after_epoch: float | None = None  # what follows an epoch's last step, timed
        self.traced_epoch = True  # the epoch under way holds the first (traced) call

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_began = self.budget.clock()
        self.steps_in_epoch = 0

    def on_test_begin(self, logs=None):  # fit's validation of an epoch (not on cached features)
        self.test_began = self.budget.clock()

    def on_test_end(self, logs=None):
        if self.budget.val_images:  # one image's forward pass, for the work after training (rule 5)
            self.budget.forward_seconds = (self.budget.clock() - self.test_began) / self.budget.val_images

    def on_train_batch_begin(self, batch, logs=None):
        self.batch_began, self.first_step = self.budget.clock(), batch

    def on_train_batch_end(self, batch, logs=None):
        now = self.budget.clock()
        self.last_step_end = now
        self.steps_in_epoch = batch + 1
        if not self.first_call_done:
            self.first_call_done = True
            self.plan.start_seconds = now - self.began - self.caching_seconds
        else:
            self.busy += now - self.batch_began
            self.steps_timed += batch - self.first_step + 1
            if self.plan.planned_epochs is None and self.steps_timed >= TIMED_STEPS:
                self.plan.epoch_seconds = self._epoch_from_steps()
                self.budget.plan(self.index, under_way=True)
        if self.budget.training_left() < self._after_epoch_estimate() and self.steps_in_epoch < self.steps_per_epoch:
            self.plan.cut_mid_epoch = True
            self._stop("budget")

    def on_epoch_end(self, epoch, logs=None):
        now = self.budget.clock()
        self.plan.epochs = epoch + 1
        if self.steps_in_epoch:
            self.after_epoch = now - self.last_step_end
        if not self.traced_epoch and not self.plan.cut_mid_epoch:
            self.plan.epoch_seconds = now - self.epoch_began  # a whole epoch, timed
        elif self.plan.planned_epochs is None:
            # From the steps after the first call, else the traced epoch's (an upper bound until
            # the next epoch is timed).
            self.plan.epoch_seconds = self._epoch_from_steps() if self.steps_timed else now - self.epoch_began
        self.traced_epoch = False
        if self.plan.planned_epochs is None and self.steps_timed:
            self.budget.plan(self.index, under_way=False)
        if self.model.stop_training:
            self.plan.ended_by = self.plan.ended_by or "early stopping"
        elif self.plan.epochs >= self.plan.recipe_epochs:
            self.plan.ended_by = "recipe epochs"
        elif self.plan.planned_epochs is not None and self.plan.epochs >= self.plan.planned_epochs:
            self._stop("plan")
        elif self.budget.training_left() <= 0 or (self.plan.planned_epochs is not None
                                                  and self.budget.stage_deadline_left(self.index)
                                                  < self.plan.epoch_seconds):
            self._stop("budget")

    def _stop(self, reason: str) -> None:
        self.plan.ended_by = reason
        self.model.stop_training = True

    def _epoch_from_steps(self) -> float:
        return self.busy / self.steps_timed * self.steps_per_epoch + self._after_epoch_estimate()

    def _after_epoch_estimate(self) -> float:
        """Validation and the checkpoint after an epoch: timed, else the validation images'
        forward passes (a few milliseconds on cached features)."""
        if self.after_epoch is not None:
            return self.after_epoch
        if self.cached:
            return 0.0
        return (self.budget.forward_seconds or 0.0) * self.budget.val_images
