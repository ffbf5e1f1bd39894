import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests import forked
from transferkit import __version__, predict_folder
from transferkit.cli import app

runner = CliRunner()

# conftest.TINY as flags (float32 on every CPU, as TINY).
TINY_FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--set", "precision=\"float32\"", "--image-size", "32",
              "--batch-size", "8", "--head-epochs", "1",
              "--fine-epochs", "1", "--set", "head.units=[16]", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def cli_run(shapes_dir, tmp_path_factory, request):
    """(run folder, result) of a tiny finetune, tracked with --mlflow in a SQLite store beside
    the run (where the mlflow extra is installed: ``tracked_run``)."""
    import importlib.util

    output = tmp_path_factory.mktemp("cli") / "demo"
    tracking = []
    if importlib.util.find_spec("mlflow") is not None:
        tracking = ["--mlflow", request.getfixturevalue("mlflow_store")(output.parent)]
    result = invoke("finetune", shapes_dir, *TINY_FLAGS[:-1], "-o", output, "--save-h5", *tracking)  # not --quiet
    assert result.exit_code == 0, result.output
    return output, result


def tracked_run(output):
    """(tracking URI, the MLflow run) of ``cli_run``, read back with MLflow's own client."""
    import mlflow

    uri = f"sqlite:///{output.parent / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    return uri, run


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_finetune_end_to_end_writes_the_run(cli_run):
    output, result = cli_run
    assert "validation accuracy" in result.output
    # Its output went to no terminal (as into a log file): each epoch is one line, no bar redrawn.
    assert "\r" not in result.output and "\x1b" not in result.output and "\b" not in result.output
    epochs = [line for line in result.output.splitlines() if re.match(r"\s*\d+/\d+ - \d+s - .*val_loss", line)]
    assert len(epochs) == 2, result.output
    for name in ("model.keras", "model.h5", "labels.json", "recipe.toml", "history.csv", "metrics.json"):
        assert (output / name).is_file(), name


def test_finetune_flags_reach_the_recipe(cli_run):
    output, _ = cli_run
    import tomllib

    recipe = tomllib.loads((output / "recipe.toml").read_text())
    assert recipe["image_size"] == 32 and recipe["batch_size"] == 8 and recipe["weights"] == "none"
    assert recipe["head"]["units"] == [16]
    assert [stage["epochs"] for stage in recipe["stages"]] == [1, 1]


def test_finetune_mlflow_logs_the_recipe_and_every_epoch_across_stages(cli_run):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    output, result = cli_run
    uri, run = tracked_run(output)
    client = mlflow.MlflowClient(uri)
    # nothing said about MLflow: it just worked (a tiny run's other warnings may stand)
    assert not [line for line in result.output.lower().splitlines() if "warning" in line and "mlflow" in line]
    assert run.info.status == "FINISHED" and run.info.run_name == output.name
    params = run.data.params
    assert params["backbone"] == "tinyvgg" and params["image_size"] == "32" and params["head.units"] == "[16]"
    assert float(params["stages.1.learning_rate"]) == pytest.approx(3e-5) and params["stages.0.name"] == "head"
    assert "mlflow" not in params
    # One step per epoch, counted across the two stages (each stage is a fit of its own).
    with open(output / "history.csv", encoding="utf-8") as handle:
        history = [line.split(",") for line in handle.read().splitlines()]
    columns = history[0]
    for name in ("val_accuracy", "val_loss", "loss", "learning_rate"):
        logged = client.get_metric_history(run.info.run_id, name)
        assert [metric.step for metric in logged] == [1, 2], name
        expected = [float(row[columns.index(name)]) for row in history[1:]]
        assert [metric.value for metric in logged] == pytest.approx(expected, rel=1e-5), name
    metrics = _read_json(output / "metrics.json")
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(metrics["final"]["val_accuracy"])
    assert run.data.metrics["ece_after_calibration"] == pytest.approx(metrics["calibration"]["ece_after"])
    labels = _read_json(output / "labels.json")
    tags = run.data.tags
    assert tags["transferkit.data_fingerprint"] == labels["data_fingerprint"]
    assert tags["transferkit.run_folder"] == str(output.resolve()) and tags["transferkit.run_id"] == labels["run_id"]
    assert tags["transferkit.classes"] == "circle, square, triangle"
    assert labels["mlflow"] == {"tracking_uri": uri, "experiment_id": run.info.experiment_id,
                                "run_id": run.info.run_id}
    card = (output / "MODEL_CARD.md").read_text()
    assert f"**MLflow:** run {run.info.run_id}" in card


def test_finetune_mlflow_logs_the_run_files_and_a_keras_flavour_model(cli_run, shapes_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    import importlib

    keras_flavour = importlib.import_module("mlflow.keras")
    output, _ = cli_run
    uri, run = tracked_run(output)
    client = mlflow.MlflowClient(uri)
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"history.png", "confusion.png", "metrics.json", "labels.json", "recipe.toml", "history.csv",
            "MODEL_CARD.md", "model.keras", "rejection.npz"} <= artifacts
    # Downloaded, they are a run that predicts as the folder does, --reject included.
    downloaded = client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded"))
    rows = [predict_folder(where, shapes_dir, engine="keras", reject=True).rows
            for where in (downloaded, output)]
    assert [(row.label, row.unknown) for row in rows[0]] == [(row.label, row.unknown) for row in rows[1]]
    # The store keeps them beside the database, not in the folder the job ran in.
    assert run.info.artifact_uri.startswith((output.parent / "mlartifacts").as_uri())
    fetched = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert _read_json(output / "metrics.json") == json.loads(open(fetched, encoding="utf-8").read())
    assert run.data.tags["mlflow.note.content"] == (output / "MODEL_CARD.md").read_text(encoding="utf-8")
    # The logged model loads with MLflow's Keras flavour and predicts as the run's model.keras.
    [logged] = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id
    # It carries the run's transferkit tags: where it came from, without its run.
    ours = {key: value for key, value in run.data.tags.items() if key.startswith("transferkit.")}
    assert {"transferkit.data_fingerprint", "transferkit.data_dir", "transferkit.run_folder"} <= ours.keys()
    assert {key: value for key, value in logged.tags.items() if key.startswith("transferkit.")} == ours
    import keras

    from transferkit.data.images import load_image

    images = np.stack([load_image(path, 32) for path in sorted((shapes_dir / "circle").iterdir())[:3]])
    images = images.astype("float32")
    expected = keras.models.load_model(output / "model.keras").predict(images, verbose=0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where models:/ URIs are looked up
    assert not mlflow.is_tracking_uri_set() or mlflow.get_tracking_uri() == uri  # logging left no URI behind
    loaded = keras_flavour.load_model(logged.model_uri)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-6)


def test_predict_prints_a_table_and_writes_csv(cli_run, shapes_dir, tmp_path):
    output, _ = cli_run
    result = invoke("predict", output, shapes_dir / "circle", "--output", tmp_path / "p.csv", "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert "10 image(s) classified" in result.output
    assert "circle_000.jpg" in result.output
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and {row["label"] for row in rows} <= {"circle", "square", "triangle"}


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_predict_output_and_summary_count_the_skipped_files(cli_run, tmp_path, suffix):
    output, _ = cli_run
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"")
    result = invoke("predict", output, tmp_path, "-o", tmp_path / f"out{suffix}", "--quiet")
    assert result.exit_code == 0, result.output
    assert "1 image(s) classified" in result.output and ", 1 skipped (unreadable)" in result.output
    if suffix == ".json":
        assert len(json.loads((tmp_path / "out.json").read_text())["predictions"]) == 1
    else:
        with open(tmp_path / "out.csv", newline="") as handle:
            assert [row["file"] for row in csv.DictReader(handle)] == [str(tmp_path / "ok.png")]


def test_existing_output_needs_force(cli_run, shapes_dir):
    output, _ = cli_run
    result = invoke("finetune", shapes_dir, *TINY_FLAGS, "-o", output)
    assert result.exit_code == 1
    assert "exists already" in result.output and "--force" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["finetune", "{missing}", "--backbone", "tinyvgg", "--weights", "none"], 1, "does not exist"),
        (["finetune", "{data}", "--backbone", "vgg17"], 2, "unknown backbone 'vgg17'"),
        (["finetune", "{data}", "--image-size", "8"], 2, "below the vgg16 minimum"),
        (["finetune", "{data}", "--set", "head.dropuot=0.1"], 2, "unknown key 'head.dropuot'"),
        (["finetune", "{data}", "--recipe", "nope"], 2, "recipe nope not found"),
        (["finetune", "{data}", "--weights", "{missing}"], 2,
         "neither 'imagenet', 'none' nor an existing file or run folder"),
        (["finetune", "{data}", "--weights", "{data}/circle/circle_000.jpg"], 2,
         "is neither a .h5 weights file nor a run's .keras model"),
        (["predict", "{missing}", "{data}"], 1, "does not exist"),
        (["predict", "{data}", "{data}"], 1, "not a transferkit run"),
        (["finetune", "{data}", "--val-split", "0.3", "--val-dir", "{data}"], 2, "pass one of them"),
        (["tune", "{data}", "--timeout", "-5", "-o", "{tmp}/study"], 2, "--timeout must be a number of seconds"),
        (["tune", "{data}", "--timeout", "nan", "-o", "{tmp}/study"], 2, "--timeout must be a number of seconds"),
        (["augment-preview", "{data}", "-o", "{tmp}/x.jpg"], 2, "x.jpg: use a .png file name"),
        (["augment-preview", "{data}", "--views", "0"], 2, "--views must be at least 1, got 0"),
        (["lr-find", "{data}", "-o", "{tmp}/lr.txt"], 2, "lr.txt: use a .png file name"),
        (["predict", "{missing}", "{data}", "-o", "{tmp}/p.txt"], 2, "p.txt: use a .csv or .json file name"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, code, fragment, shapes_dir, tmp_path):
    values = {"missing": tmp_path / "missing", "data": shapes_dir, "tmp": tmp_path}
    result = invoke(*[arg.format(**values) for arg in args])
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1


def test_usage_error_exits_2():
    result = invoke("finetune", "--no-such-flag")
    assert result.exit_code == 2


def test_backbones_lists_sizes_and_parameters():
    result = invoke("backbones")
    assert result.exit_code == 0, result.output
    assert "vgg16" in result.output and "14,714,688" in result.output
    assert "resnet50" in result.output and "23,587,712" in result.output


def test_augment_preview_writes_png(shapes_dir, tmp_path):
    result = invoke("augment-preview", shapes_dir, "-o", tmp_path / "grid.png", "--count", "2", "--views", "2")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG"


def test_augment_preview_takes_the_recipe_keys_with_set(shapes_dir, tmp_path):
    """With every strength 0 (--set), each augmented tile is the original: the grid shows the
    augmentation the --set values make, not the recipe's."""
    def grid(name, *flags):
        result = invoke("augment-preview", shapes_dir, "-o", tmp_path / name, "--count", "2", "--views", "2", *flags)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name) as image:
            return np.asarray(image.convert("RGB"))

    tile, pad, header = 128, 4, 18
    off = grid("off.png", *(arg for key in ("shift", "contrast", "rotation") for arg in ("--set", f"augment.{key}=0")),
               "--set", "augment.hflip=false")
    shown = grid("default.png")
    for row in range(2):
        top = header + pad + row * (tile + pad)
        tiles = [array[top:top + tile, pad + column * (tile + pad):(column + 1) * (tile + pad)]
                 for array in (off, shown) for column in range(3)]
        assert all(np.array_equal(tiles[0], other) for other in tiles[1:3])  # all off: the original thrice
        assert np.array_equal(tiles[0], tiles[3]) and not np.array_equal(tiles[3], tiles[4])


def test_version_and_help_on_every_option():
    assert invoke("--version").output.strip() == f"transferkit {__version__}"
    for command in ("finetune", "predict", "augment-preview", "backbones"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
    import typer.main

    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        for param in sub.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{name} --{param.name} has no help"


def test_predict_accepts_a_model_file_with_labels_beside_it(cli_run, shapes_dir):
    output, _ = cli_run
    result = invoke("predict", output / "model.keras", shapes_dir / "square", "--quiet", "--engine", "keras")
    assert result.exit_code == 0, result.output
    assert "10 image(s) classified (keras engine)" in result.output
    # -q without --output: the table is the result, so it stays (only the progress goes)
    assert "square_000.jpg" in result.output


def test_predict_table_columns_line_up_with_long_and_wide_class_names(tmp_path):
    from transferkit.cli.predict import _columns, _print_table
    from transferkit.inference.predict import Prediction, PredictionResult

    names = ("an extraordinarily long class name here", "日本")
    rows = [Prediction(Path(f"x/{name}.png"), name, 0.5, ((name, 0.5), (names[0], 0.25))) for name in names]
    runner_output = []
    import typer

    original, typer.echo = typer.echo, runner_output.append
    try:
        _print_table(PredictionResult(rows, [], engine="openvino"), top_k=2)
    finally:
        typer.echo = original
    header, *lines = runner_output
    # every column starts at the same terminal column on every line (CJK letters are two wide)
    starts = [_columns(header[: header.index(word)]) for word in ("label", "confidence", "top 2")]
    for line, name in zip(lines, names, strict=True):
        after = len(f"x/{name}.png")  # past the file column, which holds the name too
        assert [_columns(line[: line.index(text, after)]) for text in (name, "0.500", f"{name} 0.500, ")] == starts


def test_resume_without_data_dir_or_run_is_a_usage_error():
    result = invoke("finetune")
    assert result.exit_code == 2 and "needs DATA_DIR" in result.output


def test_predict_with_no_readable_image_fails_and_writes_nothing(cli_run, tmp_path):
    output, _ = cli_run
    images = tmp_path / "images"
    images.mkdir()
    (images / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (images / "empty.png").write_bytes(b"")
    for target, named in ((images, "empty.png"), (images / "trunc.jpg", "trunc.jpg")):
        result = invoke("predict", output, target, "-o", tmp_path / "out" / "p.csv")
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and named in errors[0]
        assert "image(s) classified" not in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()
    # one image file that cannot be read is that one line, told before the run loads
    result = invoke("predict", tmp_path / "no-run", images / "trunc.jpg")
    assert result.exit_code == 1 and result.output.startswith("error:") and len(result.output.splitlines()) == 1
    assert "trunc.jpg" in result.output and "pass a readable image file" in result.output
    result = invoke("predict", output, images, "-q")
    assert "all 2 image files" in result.output
    # each unreadable file is warned about once
    assert sorted(line.split(":")[0] for line in result.output.splitlines() if "skipping" in line) == ["warning"] * 2


@pytest.mark.parametrize(
    "target, code, fragment",
    [
        ("{tmp}/afile.txt/x.csv", 1, "afile.txt is a file, not a folder"),
        ("{tmp}/x.xlsx", 2, "use a .csv or .json file name"),
        ("/proc/x.csv", 1, "cannot write in /proc"),
    ],
)
def test_predict_checks_the_output_before_any_work(target, code, fragment, shapes_dir, tmp_path):
    import os

    if target.startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc")
    (tmp_path / "afile.txt").write_text("keep me")
    # The run does not exist: an error about the output shows it was checked first.
    result = invoke("predict", tmp_path / "no-run", shapes_dir, "-o", target.format(tmp=tmp_path))
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and "no-run" not in errors[0]
    assert (tmp_path / "afile.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--top-k", "0", "--top-k must be at least 1, got 0"),
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("--batch-size", "-3", "--batch-size must be at least 1, got -3"),
        ("--engine", "tensorrt", "--engine 'tensorrt'"),
        ("--precision", "int4", "--precision 'int4'"),
    ],
)
def test_predict_bad_flag_values_are_usage_errors_before_loading(flag, value, fragment, shapes_dir, tmp_path):
    result = invoke("predict", tmp_path / "no-run", shapes_dir, flag, value)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]


@pytest.mark.parametrize("count", ["0", "-1"])
def test_augment_preview_count_below_one_is_a_usage_error(count, shapes_dir, tmp_path):
    result = invoke("augment-preview", shapes_dir, "-o", tmp_path / "grid.png", "--count", count)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: --count must be at least 1, got {count}"
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("command", ["doctor", "lr-find"])
def test_a_json_command_reports_an_error_as_json(command, tmp_path):
    result = invoke(command, "--json", tmp_path / "missing")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert list(payload) == ["error"] and "does not exist" in payload["error"]
    # a bad flag value too (the command's own check): JSON with --json, the line without
    bad = ("-o", tmp_path / "lr.jpg") if command == "lr-find" else ("--val-split", "1.5")
    answered = invoke(command, tmp_path, "--json", *bad)
    assert answered.exit_code == 2 and list(json.loads(answered.stdout)) == ["error"], answered.output
    plain = invoke(command, tmp_path / "missing")
    assert plain.exit_code == 1 and plain.output.startswith("error: ") and "does not exist" in plain.output


def test_predict_keras_engine_tells_when_it_keeps_the_model_precision(cli_run, shapes_dir):
    output, _ = cli_run
    policy = json.loads((output / "labels.json").read_text())["precision"]
    other = "float16" if policy != "mixed_float16" else "bfloat16"
    result = invoke("predict", output, shapes_dir / "circle", "--engine", "keras", "--precision", other, "-q")
    assert result.exit_code == 0, result.output
    notices = [line for line in result.output.splitlines() if "Keras engine" in line]
    assert len(notices) == 1 and notices[0].startswith("warning: ") and f"not {other}" in notices[0]


def test_set_reaches_keys_that_also_have_a_flag_and_a_flag_that_disagrees_is_refused(shapes_dir, monkeypatch):
    """--set image_size=... must not be dropped because --image-size was not given, a bad
    value behind such a key is refused like any other, and so is a flag that gives the key
    another value (the flag used to win without a word)."""
    import transferkit.workflow

    received = {}

    def fake_finetune(data_dir, recipe, **options):
        received["recipe"] = recipe
        raise transferkit.workflow.DataError("stop here")

    monkeypatch.setattr(transferkit.workflow, "finetune", fake_finetune)
    invoke("finetune", shapes_dir, "--set", "image_size=40", "--set", "batch_size=4", "--set", "seed=7",
           "--set", "data.val_split=0.5", "--set", "stages.0.epochs=1", "--set", "cache.views=3")
    recipe = received.pop("recipe")
    assert (recipe.image_size, recipe.batch_size, recipe.seed) == (40, 4, 7)
    assert (recipe.data.val_split, recipe.stages[0].epochs, recipe.cache.views) == (0.5, 1, 3)
    invoke("finetune", shapes_dir, "--set", "image_size=48", "--image-size", "48")
    assert received.pop("recipe").image_size == 48
    result = invoke("finetune", shapes_dir, "--set", "image_size=40", "--image-size", "48")
    assert result.exit_code == 2 and "--set image_size=40 and --image-size 48 both set image_size" in result.output
    assert "recipe" not in received
    for assignment in ("batch_size=0", "precision=float64", "engine=cuda", "data.val_split=1"):
        result = invoke("finetune", shapes_dir, "--set", assignment)
        assert result.exit_code == 2 and assignment.split("=")[0] in result.output, (assignment, result.output)
        assert "recipe" not in received


@pytest.mark.parametrize("args, fragment", [
    (["finetune", "data", "--image-size", "abc"], "Invalid value for '--image-size'"),
    (["predict", "--bogus"], "No such option: --bogus"),
])
def test_parser_errors_are_one_line_from_the_console_script(args, fragment):
    """Typer's own parse errors come as one `error:` line too (not a box), exit 2."""
    import sys

    done = forked.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0] and "--help" in lines[0]


def test_predict_with_tta_on_a_run_without_the_tta_record_averages_over_all_the_recipes_variants(
        cli_run, shapes_dir, tmp_path):
    import os
    import shutil

    # A run trained before finetune chose the transforms: its metrics.json has no "tta".
    output = tmp_path / "older"
    shutil.copytree(cli_run[0], output, copy_function=os.link)
    metrics = json.loads((output / "metrics.json").read_text())
    del metrics["tta"]
    (output / "metrics.json").unlink()  # a link to the shared run's file: not written through
    (output / "metrics.json").write_text(json.dumps(metrics))
    plain = invoke("predict", output, shapes_dir / "circle", "-q", "-o", tmp_path / "plain.csv", "--engine", "keras")
    tta = invoke("predict", output, shapes_dir / "circle", "-q", "-o", tmp_path / "tta.csv", "--engine", "keras",
                 "--tta")
    assert plain.exit_code == 0 and tta.exit_code == 0, tta.output
    with open(tmp_path / "plain.csv", newline="") as a, open(tmp_path / "tta.csv", newline="") as b:
        plain_rows, tta_rows = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [row["file"] for row in plain_rows] == [row["file"] for row in tta_rows] and len(tta_rows) == 10
    # the average over six variants is not the plain image's output
    assert any(p["confidence"] != t["confidence"] for p, t in zip(plain_rows, tta_rows))


def test_every_command_is_listed_with_a_one_line_summary():
    """The command list shows each docstring's first paragraph as written: a line break in it
    breaks the list's row mid-sentence."""
    import inspect

    import typer.main

    commands = typer.main.get_command(app).commands
    assert {"finetune", "predict", "tune", "report", "backbones"} <= set(commands)
    for name, command in commands.items():
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert first and "\n" not in first, f"{name}: {first!r}"


def test_a_finetune_with_no_epoch_in_any_stage_is_refused_before_anything_is_read(shapes_dir, tmp_path):
    result = invoke("finetune", shapes_dir, *TINY_FLAGS, "--head-epochs", "0", "--fine-epochs", "0", "-o",
                    tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == ("error: stages.*.epochs: every stage has 0 epochs, so nothing would train; give "
                                     "the first stage 1 or more (--head-epochs, or --set stages.0.epochs=N)")
    assert not any(tmp_path.iterdir())
    # a stage with epochs is enough: the head alone trains
    assert invoke("finetune", shapes_dir, *TINY_FLAGS, "--fine-epochs", "0", "-o", tmp_path / "run").exit_code == 0


def test_benchmark_formats_naming_nothing_is_a_usage_error(shapes_run):
    for value in (",", " , ", ""):
        result = invoke("benchmark", shapes_run.path, "--formats", value)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == ("error: --formats names no format; give e.g. keras,onnx, or leave it out "
                                         "for every installed one")
