"""--time-budget: the duration forms, the planning rules on a clock the test turns, and real runs:
a small budget over many epochs, and a budgeted run interrupted by a real SIGINT, then resumed."""

import json
import os
import re
import signal
import time

import keras
import pytest
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.data.prepare import prepare_data
from transferkit.errors import RecipeError, TrainingInterrupted
from transferkit.recipe import StageConfig, load_recipe
from transferkit.training.budget import AFTER_TRAINING_SECONDS, TimeBudget
from transferkit.workflow import resume_finetune, train_prepared


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), (".5m", 30)])
def test_time_budget_reads_seconds_minutes_and_hours(text, seconds):
    recipe = load_recipe(None, {"time_budget": text})
    assert recipe.time_budget_seconds == seconds
    assert f'time_budget = "{text}"' in recipe.to_toml()  # written back as given
    assert "time_budget" not in load_recipe().to_toml() and load_recipe().time_budget_seconds is None


@pytest.mark.parametrize("value", ["10x", "10", 600, "0s", "5 min", "-1m"])
def test_a_bad_time_budget_fails_at_load_naming_the_key_the_value_and_the_forms(value):
    with pytest.raises(RecipeError) as raised:
        load_recipe(None, {"time_budget": value})
    message = str(raised.value)
    assert message.startswith(f"time_budget: {value!r} ") and "'90s', '10m' or '1.5h'" in message


def test_a_time_budget_is_refused_with_data_parallel():
    with pytest.raises(RecipeError, match="time_budget: '5m' does not combine with strategy 'data-parallel'"):
        load_recipe(None, {"time_budget": "5m", "strategy": "data-parallel"})


def test_a_bad_time_budget_flag_is_one_line_and_writes_nothing(shapes_dir, tmp_path):
    result = CliRunner().invoke(app, ["finetune", str(shapes_dir), "--backbone", "tinyvgg", "--weights", "none",
                                      "--time-budget", "10 minutes",
                                      "-o", str(tmp_path / "runs" / "run")])
    assert result.exit_code == RecipeError.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: time_budget: '10 minutes' is not a duration; write a number and a unit s, m or h, e.g. '90s', "
        "'10m' or '1.5h' (in the built-in recipe with your settings)"]
    assert list(tmp_path.iterdir()) == []


class Clock:
    """A clock the test turns."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def budget(seconds, epochs=(8, 4), val_images=20):
    stages = [StageConfig(name=name, epochs=count) for name, count in zip(("head", "fine"), epochs)]
    clock = Clock()
    return TimeBudget(seconds, stages, train_images=100, val_images=val_images, clock=clock), clock


def test_the_budget_shares_the_time_by_epochs_weighted_by_cost_and_skips_a_stage_without_time_for_one():
    # 8 s for training (10 less the 2 s kept for the work after it) and 12 epochs of 1 s:
    # every stage keeps 2/3 of its epochs.
    shared, _ = budget(10)
    shared.plans[0].epoch_seconds = 1.0
    shared.plan(0, under_way=True)
    assert shared.plans[0].planned_epochs == 5  # floor(8 * 2/3)
    assert shared.stage_deadline_left(0) == pytest.approx(8 - 4 * 2 / 3)  # the fine stage's share kept
    # A generous budget leaves the recipe's epochs as they are.
    generous, _ = budget(3600)
    generous.plans[0].epoch_seconds = 1.0
    generous.plan(0, under_way=True)
    assert generous.plans[0].planned_epochs == 8
    # A tight one: the epoch under way is finished all the same; then no time for a fine epoch.
    tight, clock = budget(AFTER_TRAINING_SECONDS + 1)
    tight.plans[0].epoch_seconds = 5.0
    tight.plan(0, under_way=True)
    assert tight.plans[0].planned_epochs == 1
    clock.now = 5.0
    assert not tight.allows(1) and tight.plans[1].ended_by == "skipped"
    assert tight.record()["stages"][1]["ended_by"] == "skipped"


def test_the_budget_computes_the_cached_views_that_fit_half_the_training_time_left():
    views, _ = budget(AFTER_TRAINING_SECONDS + 30, val_images=0)
    # 100 training images at 0.1 s each: 10 s a view, and 10 s kept for the forward passes after
    # training; half of the 20 s left for training pays for one more view.
    assert views.cache_views(4, 0.1) == 2
    assert views.after_training_seconds() == pytest.approx(AFTER_TRAINING_SECONDS + 0.1 * 100)
    assert budget(3600)[0].cache_views(4, 0.1) == 4


def test_the_time_kept_for_the_work_after_training_counts_its_image_passes(tmp_path):
    from transferkit.data.synthetic import write_shapes_dataset
    from transferkit.trust.record import after_training_passes

    data = write_shapes_dataset(tmp_path / "data", 3, 40, size=36, seed=5)
    recipe = load_recipe(None, {"image_size": 32, "data.val_split": 0.3})
    prepared = prepare_data(data, recipe, verbose=0)
    val, train = len(prepared.val_images), len(prepared.train_images)
    assert (val, train) == (36, 84)
    # Calibration's pass and the shared plain pass over the validation images; the TTA choice's
    # other variants (four shifts, and the flip the recipe trains with); the knn score's
    # reference: every training image.
    assert after_training_passes(prepared, recipe) == val + val + 5 * val + train
    assert after_training_passes(prepared, recipe, with_trust=False) == val  # calibration alone
    plain = load_recipe(None, {"image_size": 32, "data.val_split": 0.3, "reject.score": "max_probability"})
    assert after_training_passes(prepared, plain) == val + val + 5 * val  # no reference images
    kept = TimeBudget(100, [StageConfig(epochs=1)], train_images=train, val_images=val,
                      after_training_passes=after_training_passes(prepared, recipe))
    kept.forward_seconds = 0.01
    assert kept.after_training_seconds() == pytest.approx(AFTER_TRAINING_SECONDS + 0.01 * (7 * val + train))


def test_a_small_budget_stops_many_epochs_early_prints_its_plan_and_records_it(shapes_dir, tmp_path):
    output = tmp_path / "run"
    started = time.monotonic()
    # Without the cache each step is a call of its own: the head is timed in its first epoch.
    result = CliRunner().invoke(app, [
        "finetune", str(shapes_dir), "--backbone", "tinyvgg", "--weights", "none", "--image-size", "32",
        "--batch-size", "4",
        "--set", "head.units=[16]", "--head-epochs", "200", "--fine-epochs", "200", "--no-cache",
        "--set", "stages.0:.patience=1000", "--time-budget", "8s", "-o", str(output)])
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output[-3000:]
    assert "time budget 8 s: the stages' epochs (at most the recipe's: 'head' 200, 'fine' 200)" in result.output
    record = json.loads((output / "metrics.json").read_text())["time_budget"]
    head, fine = record["stages"]
    assert re.search(r"time budget 8 s: trained in [\d.]+ s: 'head' (\d+)/200 epochs \((plan|budget)\)",
                     result.output).groups() == (str(head["epochs"]), head["ended_by"])
    # Timed after its first (traced) steps, unless the budget ran out before: on a loaded machine the
    # trace alone can take most of 8 s.
    planned = re.search(r"time budget 8 s: [\d.]+ s left for training: 'head' (\d+) of 200 epochs", result.output)
    assert (planned[1] if planned else None) == (str(head["planned_epochs"]) if head["planned_epochs"] else None)
    assert head["epochs"] < 200 and head["ended_by"] in ("plan", "budget")
    assert fine["ended_by"] in ("skipped", "plan", "budget") and fine["epochs"] < 200
    history = (output / "history.csv").read_text().splitlines()[1:]
    assert len(history) == head["epochs"] + fine["epochs"]
    # Beyond the budget only what cannot be cut: the first call (compile, trace), and the first
    # epoch's end (validation, checkpoint) before it is timed.
    assert record["training_seconds"] < max(8, head["start_seconds"]) + 4
    assert took < 8 + 60  # 400 epochs would take minutes


class InterruptOnce(keras.callbacks.Callback):
    """Ctrl-C, as a user presses it, at the end of the first epoch (here the head stage's last)."""

    def __init__(self):
        super().__init__()
        self.sent = False

    def on_epoch_end(self, epoch, logs=None):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_a_budgeted_run_resumes_with_the_whole_budget_and_a_generous_one_keeps_the_recipes_epochs(
        shapes_dir, tmp_path, tiny):
    recipe = load_recipe(None, {**tiny, "stages.1:.epochs": 2, "time_budget": "1h"})
    output = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_prepared(prepare_data(shapes_dir, recipe, verbose=0), recipe, output, callbacks=[InterruptOnce()],
                       verbose=0)
    assert json.loads((tmp_path / "run.partial" / "state.json").read_text())["global_epoch"] == 1
    run = resume_finetune(output, verbose=0)
    record = run.metrics["time_budget"]
    head, fine = record["stages"]
    assert record["seconds"] == 3600 and record["resumed_at_stage"] == 0
    assert (head["done_before"], head["epochs"], head["ended_by"]) == (1, 1, "recipe epochs")
    assert (fine["planned_epochs"], fine["epochs"], fine["ended_by"]) == (2, 2, "recipe epochs")
    assert [row["stage"] for row in run.history] == ["head", "fine", "fine"]
    assert json.loads((output / "metrics.json").read_text())["time_budget"] == record
    assert all(views["computed"] == views["views"] for views in record["cache_views"])


def test_a_resumed_budget_records_the_epochs_its_earlier_stages_trained():
    """A run resumed in its fine stage recorded the head's recipe cap (200) as trained."""
    stages = [StageConfig(name="head", epochs=200), StageConfig(name="skipped", epochs=5),
              StageConfig(name="fine", epochs=100, unfreeze=1)]
    resumed = TimeBudget(60, stages, train_images=100, val_images=20, first_stage=2, done_before=3,
                         history_stages=["head"] * 71 + ["fine"] * 3)
    head, skipped, fine = resumed.record()["stages"]
    assert (head["epochs"], head["ended_by"]) == (71, "before resume")
    assert (skipped["epochs"], skipped["ended_by"]) == (0, "before resume")
    assert fine["epochs"] == fine["done_before"] == 3
