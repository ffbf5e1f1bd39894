"""transferkit tune: a tiny search end to end, continuing and sharing a study, pruning, failures
and Ctrl-C (with training swapped for a stub where only the search loop is under test), and
the errors a user can make."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

optuna = pytest.importorskip("optuna")

from typer.testing import CliRunner  # noqa: E402

import transferkit  # noqa: E402
from tests import forked  # noqa: E402
from tests.conftest import SUBPROCESS_PATH, TINY  # noqa: E402
from transferkit.cli import app  # noqa: E402
from transferkit.errors import RecipeError, TransferkitError  # noqa: E402
from transferkit.recipe import load_recipe  # noqa: E402
from transferkit.tuning import search  # noqa: E402
from transferkit.tuning.search import open_storage, tune  # noqa: E402
from transferkit.tuning.space import build_space, default_space  # noqa: E402

SPACE = """
[tune]
"stages.0.learning_rate" = {low = 1e-4, high = 1e-1, log = true}
"head.units" = {choices = [[8], [16]]}
"""
# One epoch in the head stage, one fine-tuning epoch: two pruning steps per trial.
SEARCH = TINY
# Everything a tune folder holds after a call, each named in docs/tune.md.
OUTPUTS = {"best_recipe.toml", "trials.csv", "history.png", "importance.png", "study.db", "lock"}


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def read_trials(output: Path) -> list[dict]:
    with open(output / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def stored(output: Path, name: str):
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{output / 'study.db'}"))


# The feature caches of the studies the ``searched`` fixture ran.
CACHES: list = []


@pytest.fixture(scope="module")
def searched(shapes_dir, tmp_path_factory, request):
    """Two real trials on the tiny shapes: (summary, output folder), tracked in an MLflow
    store named by MLFLOW_TRACKING_URI (where the mlflow extra is installed: ``tracked_study``)."""
    import importlib.util

    from transferkit.training.features import FeatureCache

    class Recorded(FeatureCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            CACHES.append(self)

    folder = tmp_path_factory.mktemp("tune")
    output = folder / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("transferkit.training.features.FeatureCache", Recorded)
        if importlib.util.find_spec("mlflow") is not None:
            patch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("mlflow_store")(folder / "mlflow"))
        summary = tune(shapes_dir, write_recipe(folder, SPACE), SEARCH, trials=2, output=output, verbose=0)
    return summary, output


def test_each_trial_is_a_nested_mlflow_run_under_the_call(searched):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    summary, output = searched
    client = mlflow.MlflowClient(f"sqlite:///{output.parent / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    trials = sorted((run for run in runs if run is not parent), key=lambda run: run.info.run_name)
    assert parent.info.run_name == "tune-data" and parent.info.status == "FINISHED"
    assert parent.data.tags["transferkit.tune.study"] == "data"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(summary.best_value)
    assert {"trials.csv", "best_recipe.toml", "history.png"} <= {item.path for item in
                                                                 client.list_artifacts(parent.info.run_id)}
    assert [run.info.run_name for run in trials] == ["trial-0", "trial-1"]
    for run, row, stored_trial in zip(trials, read_trials(output), stored(output, "data").trials, strict=True):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        sampled = stored_trial.params["stages.0.learning_rate"]
        assert float(run.data.params["stages.0.learning_rate"]) == pytest.approx(sampled)
        assert run.data.params["head.units"] == row["head.units"]
        # Every epoch across the two stages, as the pruner saw them.
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert {metric.step: metric.value for metric in history} == pytest.approx(stored_trial.intermediate_values)
        assert run.data.metrics["final_val_accuracy"] == pytest.approx(stored_trial.value)
    # The environment's URI stays out of the recipe: finetune on it tracks wherever its own environment says.
    assert tomllib.loads((output / "best_recipe.toml").read_text())["mlflow"] == ""


def test_trials_with_the_same_frozen_part_share_its_features(searched):
    # The space varies the head's rate and width only: the first trial computes the features
    # of both stages' boundaries, the second takes both from the study's cache.
    (cache,) = CACHES
    assert (cache.misses, cache.hits) == (2, 2)
    assert len(cache) == 0  # released when the study's call ended


def test_a_tiny_search_writes_every_output(searched, shapes_dir):
    summary, output = searched
    assert OUTPUTS == {path.name for path in output.iterdir()}
    guide = (Path(__file__).parents[2] / "docs" / "tune.md").read_text(encoding="utf-8")
    assert [name for name in sorted(OUTPUTS) if f"`{name}`" not in guide] == []  # the lock file was left out
    assert summary.counts == {"complete": 2} and summary.new_trials == 2
    assert summary.study == "data" and summary.metric == "val_accuracy"
    for figure in ("history.png", "importance.png"):
        assert (output / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_trials(output)
    assert [row["number"] for row in rows] == ["0", "1"]
    assert list(rows[0]) == ["number", "state", "val_accuracy", "duration_s", "epochs", "head.units",
                             "stages.0.learning_rate", "fail_reason"]
    assert {row["state"] for row in rows} == {"complete"} and all(row["epochs"] == "2" for row in rows)
    # One report per epoch, counted across the two stages.
    assert [sorted(trial.intermediate_values) for trial in stored(output, "data").trials] == [[1, 2], [1, 2]]
    assert not [path for path in output.iterdir() if path.name.startswith(".")]  # no run folders, no temporaries
    # the command to train the best recipe, ready to paste: the data folder named
    assert summary.data_dir == shapes_dir
    assert f"train it: transferkit finetune {shapes_dir} --recipe {output / 'best_recipe.toml'}" in summary.describe()


def test_the_first_trial_is_the_recipe_as_given(searched):
    _, output = searched
    first = read_trials(output)[0]
    assert float(first["stages.0.learning_rate"]) == pytest.approx(1e-3) and first["head.units"] == "[16]"


def test_the_best_recipe_is_complete_and_finetune_reproduces_its_score(searched, shapes_dir, tmp_path):
    summary, output = searched
    best = stored(output, "data").best_trial
    recipe = load_recipe(output / "best_recipe.toml")
    assert recipe == summary.best_recipe
    assert recipe.head.units == tuple(int(u) for u in best.params["head.units"].strip("[]").split(","))
    assert recipe.stages[0].learning_rate == best.params["stages.0.learning_rate"]
    assert "tune" in tomllib.loads((output / "best_recipe.toml").read_text())  # the space comes along
    run = transferkit.finetune(shapes_dir, output / "best_recipe.toml", output=tmp_path / "run", verbose=0)
    # Same seed, same split, same training: the same score.
    assert run.metrics["final"]["val_accuracy"] == pytest.approx(best.value, abs=1e-6)
    assert run.metrics["final"]["val_loss"] == pytest.approx(best.user_attrs["val_loss"], rel=1e-4)


def test_a_call_with_other_fixed_settings_is_refused_before_any_trial(searched, shapes_dir):
    summary, output = searched
    before = len(stored(output, "data").trials)
    recipe = output.parent / "recipe.toml"
    with pytest.raises(TransferkitError, match=r"study 'data' in .* was run with other settings \(image_size '32' -> "
                                               r"'48'\).*--study NAME"):
        tune(shapes_dir, recipe, {**SEARCH, "image_size": 48}, trials=1, output=output, verbose=0)
    assert len(stored(output, "data").trials) == before
    # How a trial runs, not what it trains to, may differ (another machine's worker), and so may
    # a searched key's starting value: --trials 0 only summarises the study.
    again = tune(shapes_dir, recipe, {**SEARCH, "cache.memory_mb": 64.0, "tensorboard": True, "head.units": [8]},
                 trials=0, output=output, verbose=0)
    assert again.new_trials == 0 and len(stored(output, "data").trials) == before


def test_a_study_whose_first_trial_failed_on_its_set_up_takes_the_fixed_settings_again(shapes_dir, tmp_path):
    """The failure says "fix it and run the same command": the fix is often a setting."""
    wrong = tmp_path / "wrong.weights.h5"
    wrong.write_bytes(b"not weights")
    output = tmp_path / "out"
    with pytest.raises(TransferkitError, match="trial 0 failed: .*fix it and run the same command"):
        tune(shapes_dir, None, {**SEARCH, "weights": str(wrong), "stages.1:.epochs": 0}, trials=1, output=output,
             verbose=0)
    summary = tune(shapes_dir, None, {**SEARCH, "stages.1:.epochs": 0}, trials=1, output=output, verbose=0)
    assert summary.counts == {"fail": 1, "complete": 1}


def test_running_the_same_command_again_continues_the_study(searched, shapes_dir):
    summary, output = searched
    recipe = output.parent / "recipe.toml"
    again = tune(shapes_dir, recipe, SEARCH, trials=1, output=output, verbose=0)
    assert again.trials == 3 and again.new_trials == 1
    assert len(read_trials(output)) == 3 and len(stored(output, "data").trials) == 3


def test_two_processes_on_one_journal_file_add_trials_to_one_study(shapes_dir, tmp_path):
    journal = tmp_path / "shared" / "study.log"
    journal.parent.mkdir()
    command = [sys.executable, "-m", "transferkit", "tune", str(shapes_dir), "--trials", "1", "--study", "shared",
               "--storage", f"journal://{journal}", "-o", str(tmp_path / "out"), "--backbone", "tinyvgg",
               "--weights", "none",
               "--image-size", "32", "--batch-size", "8", "--set", "head.units=[8]", "--set", "stages.0.epochs=1",
               "--set", "stages.1:.epochs=0", "--quiet"]
    env = {**os.environ, "PYTHONPATH": SUBPROCESS_PATH}
    # One worker in a process of its own, the other in this one (one TensorFlow start-up less),
    # both at once on the journal file.
    other = forked.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    here = CliRunner().invoke(app, command[3:])
    results = [other.communicate(timeout=300)]
    assert (other.returncode, here.exit_code) == (0, 0), (results, here.output)
    study = optuna.load_study(study_name="shared", storage=open_storage(f"journal://{journal}"))
    assert [trial.state.name for trial in study.trials] == ["COMPLETE", "COMPLETE"]
    assert "study 'shared'" in results[0][0] and (tmp_path / "out" / "best_recipe.toml").is_file()


def test_pruning_stops_a_trial_made_hopeless_on_purpose(shapes_dir, tmp_path):
    # A learning rate of 1.0 throws the head off at once: its validation loss after the first
    # epoch is far above that of the sound trial before it, and the median pruner stops it.
    url = f"journal://{tmp_path / 'study.log'}"
    study = optuna.create_study(storage=open_storage(url), study_name="prune", direction="minimize")
    for rate in (1e-3, 1.0):
        study.enqueue_trial({"stages.0.learning_rate": rate})
    recipe = write_recipe(tmp_path, '[tune]\n"stages.0.learning_rate" = {choices = [1e-3, 1.0]}\n')
    summary = tune(shapes_dir, recipe, {**TINY, "stages.0.epochs": 3, "stages.1:.epochs": 0}, trials=2, storage=url,
                   study="prune", metric="val_loss", output=tmp_path / "out", verbose=0,
                   pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    trials = optuna.load_study(study_name="prune", storage=open_storage(url)).trials
    assert [trial.state.name for trial in trials] == ["COMPLETE", "PRUNED"]
    assert sorted(trials[0].intermediate_values) == [1, 2, 3]  # one report per epoch
    assert list(trials[1].intermediate_values) == [1]  # stopped after its first epoch
    assert summary.counts == {"complete": 1, "pruned": 1} and summary.best_trial == 0
    assert [row["state"] for row in read_trials(tmp_path / "out")] == ["complete", "pruned"]


# A SIGINT the tune process sends itself as its second trial's training ends (its signal
# handlers still on): a real signal, through the console script's ``main``.
SIGINT_IN_SECOND_TRIAL = """
import os, signal, sys
import transferkit.workflow as workflow
from transferkit.cli import main
real, calls = workflow.run_stages, []
def interrupted_there(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return result
workflow.run_stages = interrupted_there
sys.argv = ["transferkit", "tune", *sys.argv[1:]]
main()
"""


def test_a_sigint_in_a_trial_says_the_trial_is_failed_and_the_finished_ones_summarised(shapes_dir, tmp_path):
    """The warning said "stopping after this batch and writing nothing", and then the tune
    folder was written (finetune's "writing nothing", with no run folder, stays)."""
    output = tmp_path / "out"
    command = [sys.executable, "-c", SIGINT_IN_SECOND_TRIAL, str(shapes_dir), "--trials", "3", "-o", str(output),
               "--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
               "--set", "head.units=[8]", "--set", "stages.0.epochs=1", "--set", "stages.1:.epochs=0", "--quiet"]
    done = forked.run(command, capture_output=True, text=True, timeout=300,
                      env={**os.environ, "PYTHONPATH": SUBPROCESS_PATH})
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [warning] = [line for line in done.stderr.splitlines() if "SIGINT received" in line]
    assert warning == (f"warning: SIGINT received: stopping after this batch and recording this trial as failed; the "
                       f"study keeps its finished trials, summarised in {output} (trials.csv, best_recipe.toml, "
                       "figures) (press Ctrl-C again to stop at once)")
    assert [(row["state"], row["fail_reason"]) for row in read_trials(output)] == [
        ("complete", ""), ("fail", "interrupted (Ctrl-C or SIGTERM)")]
    assert {"best_recipe.toml", "trials.csv", "history.png"} <= {path.name for path in output.iterdir()}


# --- the search loop around a stub training --------------------------------------------


@pytest.fixture()
def stub_training(monkeypatch):
    """Training swapped for a stub: the score is the head stage's learning rate; a batch of
    32 runs out of memory; ``calls["interrupt_at"]`` presses Ctrl-C in that call."""
    from transferkit import workflow

    calls = {"count": 0, "interrupt_at": None}

    def train_prepared(prepared, recipe, output=None, *, callbacks=(), calibrate=None, verbose=1, **_):
        calls["count"] += 1
        calls.setdefault("recipes", []).append(recipe)
        if calls["count"] == calls["interrupt_at"]:
            raise KeyboardInterrupt
        if recipe.batch_size == 32:
            raise RuntimeError("ResourceExhaustedError: OOM when allocating tensor with shape [32,64,64,512]")
        score = recipe.stages[0].learning_rate
        return SimpleNamespace(metrics={"final": {"val_accuracy": score, "val_loss": 1 - score}}, history=[{}])

    monkeypatch.setattr(workflow, "train_prepared", train_prepared)
    return calls


STUB_SPACE = '[tune]\n"stages.0.learning_rate" = {low = 0.01, high = 0.5}\nbatch_size = {choices = [8, 32]}\n'


def test_a_failing_trial_is_recorded_with_its_reason_and_the_search_goes_on(stub_training, binary_dir, tmp_path):
    recipe = write_recipe(tmp_path, STUB_SPACE)
    summary = tune(binary_dir, recipe, {**TINY, "batch_size": 32}, trials=4, output=tmp_path / "out", verbose=0)
    rows = read_trials(tmp_path / "out")
    assert len(rows) == 4 and stub_training["count"] == 4
    failed = [row for row in rows if row["batch_size"] == "32"]
    assert failed and all(row["state"] == "fail" and "OOM when allocating" in row["fail_reason"] for row in failed)
    assert all(row["state"] == "complete" for row in rows if row["batch_size"] == "8")
    assert summary.counts.get("fail") == len(failed)


def test_ctrl_c_ends_the_trial_keeps_the_study_and_exits_130(stub_training, binary_dir, tmp_path):
    stub_training["interrupt_at"] = 2
    recipe = write_recipe(tmp_path, STUB_SPACE)
    arguments = ["tune", str(binary_dir), "-r", str(recipe), "--trials", "5", "-o", str(tmp_path / "out"),
                 "--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "1 complete" in result.output
    rows = read_trials(tmp_path / "out")
    assert [(row["state"], row["fail_reason"]) for row in rows] == [("complete", ""),
                                                                     ("fail", "interrupted (Ctrl-C or SIGTERM)")]
    assert (tmp_path / "out" / "best_recipe.toml").is_file() and (tmp_path / "out" / "history.png").is_file()
    stub_training["interrupt_at"] = None
    result = CliRunner().invoke(app, [*arguments[:5], "1", *arguments[6:]])  # the same study goes on
    assert result.exit_code == 0, result.output
    assert len(read_trials(tmp_path / "out")) == 3


def test_tune_takes_finetunes_epoch_and_time_budget_flags(stub_training, binary_dir, tmp_path):
    arguments = ["tune", str(binary_dir), "-r", str(write_recipe(tmp_path, STUB_SPACE)), "--trials", "1", "-o",
                 str(tmp_path / "out"), "--backbone", "tinyvgg", "--weights", "none", "--image-size", "32",
                 "--batch-size", "8",
                 "--head-epochs", "3", "--fine-epochs", "0", "--time-budget", "90s", "-q"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    [trained] = stub_training["recipes"]
    assert [stage.epochs for stage in trained.stages] == [3] + [0] * (len(trained.stages) - 1)
    assert trained.time_budget == "90s"  # as the recipe keeps it (parsed where training plans)


def test_importance_needs_two_complete_trials_and_says_so(stub_training, binary_dir, tmp_path):
    summary = tune(binary_dir, write_recipe(tmp_path, STUB_SPACE), {**TINY, "batch_size": 8}, trials=1,
                   output=tmp_path / "out", verbose=0)
    assert summary.counts == {"complete": 1}
    assert (tmp_path / "out" / "importance.png").is_file()  # drawn with the note instead of bars


def test_a_study_of_another_metric_is_refused(stub_training, binary_dir, tmp_path):
    recipe = write_recipe(tmp_path, STUB_SPACE)
    tune(binary_dir, recipe, {**TINY, "batch_size": 8}, trials=1, output=tmp_path / "out", verbose=0)
    with pytest.raises(TransferkitError, match="optimizes val_accuracy, not val_loss; use --metric val_accuracy"):
        tune(binary_dir, recipe, {**TINY, "batch_size": 8}, trials=1, output=tmp_path / "out", metric="val_loss")


# --- the space and the errors a user can make --------------------------------------------


def test_without_a_tune_section_the_default_space_is_searched():
    recipe = load_recipe(None)
    space = default_space(recipe)
    assert set(space) == {"stages.0.learning_rate", "stages.1.learning_rate", "head.dropout", "head.units",
                          "stages.1.unfreeze"}
    assert space["stages.0.learning_rate"].log and space["stages.1.learning_rate"].log
    built = build_space(None, {}, recipe)
    # The recipe as given lies in it: the first trial of a new study is the recipe itself.
    assert built.recipe_params(recipe) == {"stages.0.learning_rate": 1e-3, "stages.1.learning_rate": 3e-5,
                                           "head.dropout": 0.3, "head.units": "[256]", "stages.1.unfreeze": 1}
    assert "stages.1.unfreeze" not in default_space(load_recipe(None, {"stages.1:.epochs": 0}))
    # Each later stage is searched on its own (vgg16: block5, then block4 too).
    vgg16 = load_recipe("vgg16")
    space = build_space("vgg16", {}, vgg16)
    sampled = space.recipe_params(vgg16)
    assert {"stages.1.unfreeze": 1, "stages.2.unfreeze": 2}.items() <= sampled.items()
    assert space.recipe({p.key: p.recipe_value(sampled[p.key]) for p in space.parameters}) == vgg16


def test_keys_the_user_set_are_left_out_of_the_default_space_and_values_outside_a_space_are_named(tmp_path):
    overrides = {"head.units": [16], "stages.1:.learning_rate": 1e-4, "image_size": 32}
    base = load_recipe(None, overrides)
    space = build_space(None, overrides, base)
    assert space.fixed == ("head.units", "stages.1.learning_rate")
    assert {parameter.key for parameter in space.parameters} == {"stages.0.learning_rate", "head.dropout",
                                                                 "stages.1.unfreeze"}
    assert space.outside(base) == []  # the first trial is the recipe as given, whole
    # A [tune] section searches what it names, whatever the overrides set; a value of the
    # recipe's that the space does not hold is named (the first trial samples it).
    path = write_recipe(tmp_path, SPACE)
    base = load_recipe(path, {"head.units": [32]})
    space = build_space(path, {"head.units": [32]}, base)
    assert space.fixed == () and "head.units" in {parameter.key for parameter in space.parameters}
    assert space.outside(base) == ["head.units [32]"]
    # A float range on a grid holds the values on it (0.3 is 0.1 * 3 only to float rounding).
    path = write_recipe(tmp_path, '[tune]\n"head.dropout" = {low = 0.0, high = 0.5, step = 0.1}\n'
                                  '"augment.rotation" = {low = 0.0, high = 30.0, step = 5.0}\n')
    for dropout, rotation, outside in ((0.3, 15.0, []), (0.25, 12.0, ["head.dropout 0.25", "augment.rotation 12.0"])):
        base = load_recipe(path, {"head.dropout": dropout, "augment.rotation": rotation})
        space = build_space(path, {}, base)
        assert space.outside(base) == outside
        if not outside:
            assert space.recipe_params(base) == {"head.dropout": 0.3, "augment.rotation": 15.0}


def test_sampled_values_become_recipe_values(tmp_path):
    path = write_recipe(tmp_path, '[tune]\n"head.units" = {low = 8, high = 64, log = true}\n'
                                  '"augment.rotation" = {low = 0, high = 90, step = 15}\n'
                                  '"head.batchnorm" = {choices = [true, false]}\n')
    base = load_recipe(path, {"head.units": [32, 32]})
    space = build_space(path, {"head.units": [32, 32]}, base)
    kinds = {parameter.key: (parameter.kind, parameter.repeat) for parameter in space.parameters}
    # A range on a list key sets every entry; integer ends on a float key give a float range.
    assert kinds == {"head.units": ("int", 2), "augment.rotation": ("float", None), "head.batchnorm": ("choice", None)}
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    recipe = space.recipe(space.suggest(trial))
    assert len(set(recipe.head.units)) == 1 and 8 <= recipe.head.units[0] <= 64 and len(recipe.head.units) == 2
    assert recipe.augment.rotation in (0.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0)


@pytest.mark.parametrize(("section", "expected"), [
    ('"head.dropout" = {low = 0.1, high = 1.5}', "[tune] head.dropout: the value 1.5 does not fit the recipe"),
    ('"head.dropuot" = {low = 0.1, high = 0.5}', "unknown recipe key 'head.dropuot'; valid keys in head:"),
    ('"stages.0.learning_rate" = {low = 1e-2, high = 1e-4}', "low 0.01 must be below high 0.0001"),
    ('"stages.5.epochs" = {low = 1, high = 3}', "stages.5.epochs: the recipe has 2 stage(s)"),
    ('batch_size = {choices = []}', "choices is empty"),
    # a dotted key split into tables, as --set tune.head.dropout={...} splits it
    ('head = {dropout = {low = 0.1, high = 0.5}}', "'dropout' is not a spec key: a tuned recipe key is one quoted"),
])
def test_a_bad_tune_section_is_one_line_error(section, expected, binary_dir, tmp_path):
    recipe = write_recipe(tmp_path, f"[tune]\n{section}\n")
    result = CliRunner().invoke(app, ["tune", str(binary_dir), "-r", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "out" / "trials.csv").exists()


def test_without_optuna_tune_gives_the_install_command(monkeypatch, binary_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    result = CliRunner().invoke(app, ["tune", str(binary_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: transferkit tune needs optuna, which is not installed; run: pip install 'transferkit[tune]'  "
        "(or: pip install optuna)"
    )


def test_storage_urls_and_paths(tmp_path):
    from optuna.storages import JournalStorage, RDBStorage

    for url in (f"journal://{tmp_path / 'a' / 'study.log'}", f"sqlite:///{tmp_path / 'a' / 'study.db'}"):
        with pytest.raises(TransferkitError, match=f"storage {url}: the folder {tmp_path / 'a'} does not exist"):
            open_storage(url)  # a mistyped path, or a shared disk not mounted: no private study is started
    assert not (tmp_path / "a").exists()
    (tmp_path / "a").mkdir()
    assert isinstance(open_storage(f"journal://{tmp_path / 'a' / 'study.log'}"), JournalStorage)
    assert isinstance(open_storage(str(tmp_path / "b.log")), JournalStorage)
    assert isinstance(open_storage(str(tmp_path / "c.db")), RDBStorage)
    with pytest.raises(TransferkitError, match="storage 'study.txt': give an Optuna storage URL"):
        open_storage("study.txt")


def test_tune_is_public():
    assert transferkit.tune is search.tune and "tune" in transferkit.__all__
    assert "Returns" in transferkit.tune.__doc__
    with pytest.raises(RecipeError):
        load_recipe(None, {"tune": {"head.dropout": {"low": 0.5, "high": 0.1}}})


def test_trials_0_on_a_new_study_is_one_line_and_leaves_no_folder(binary_dir, tmp_path):
    result = CliRunner().invoke(app, ["tune", str(binary_dir), "--backbone", "tinyvgg", "--weights", "none",
                                      "--trials", "0", "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == ("error: --trials 0 runs no trial, and study 'data' holds none yet; give --trials "
                                     "1 or more")
    assert not (tmp_path / "out").exists()
