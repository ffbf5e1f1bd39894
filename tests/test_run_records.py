"""What a finished run leaves for people and for experiment trackers: its MODEL_CARD.md and its
MLflow run (params, per-epoch metrics across stages, files, the logged model), read back from a
real SQLite store with MLflow's own client. One tiny ``finetune --mlflow`` serves every test
here. (Exports copying the card and ``report`` listing them: tests/export/test_cli.py.)"""

from __future__ import annotations

import json
import logging
import socket
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.evaluation.card import CARD_FILE
from transferkit.training import tracking

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")

runner = CliRunner()

# Two stages of one epoch each, at 32 px, from random weights (conftest's TINY as flags).
TINY_FLAGS = ["--weights", "none", "--image-size", "32", "--batch-size", "8", "--head-epochs", "1",
              "--fine-epochs", "1", "--set", "head.units=[16]", "--quiet"]


@pytest.fixture(scope="module")
def tracked(shapes_dir, tmp_path_factory, mlflow_store):
    """(run folder, tracking URI, the MLflow run) of one tiny two-stage finetune --mlflow."""
    folder = tmp_path_factory.mktemp("tracked")
    uri = mlflow_store(folder / "store")
    output = folder / "run"
    result = runner.invoke(app, ["finetune", str(shapes_dir), *TINY_FLAGS, "--mlflow", uri, "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # nothing said about MLflow: it just worked
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    return output, uri, run


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --- MLflow ------------------------------------------------------------------------------------


def test_finetune_logs_the_recipe_and_every_epoch_across_stages(tracked):
    output, uri, run = tracked
    client = mlflow.MlflowClient(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == output.name
    params = run.data.params
    assert params["backbone"] == "vgg16" and params["image_size"] == "32" and params["head.units"] == "[16]"
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
    metrics = read_json(output / "metrics.json")
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(metrics["final"]["val_accuracy"])
    assert run.data.metrics["ece_after_calibration"] == pytest.approx(metrics["calibration"]["ece_after"])
    labels = read_json(output / "labels.json")
    tags = run.data.tags
    assert tags["transferkit.data_fingerprint"] == labels["data_fingerprint"]
    assert tags["transferkit.run_folder"] == str(output.resolve()) and tags["transferkit.run_id"] == labels["run_id"]
    assert tags["transferkit.classes"] == "circle, square, triangle"
    assert labels["mlflow"] == {"tracking_uri": uri, "experiment_id": run.info.experiment_id,
                                "run_id": run.info.run_id}


def test_the_run_files_and_a_keras_flavour_model_are_logged(tracked, shapes_dir, tmp_path, monkeypatch):
    output, uri, run = tracked
    client = mlflow.MlflowClient(uri)
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"history.png", "confusion.png", "metrics.json", "labels.json", "recipe.toml", "history.csv",
            CARD_FILE, "model.keras"} <= artifacts
    # The store keeps them beside the database, not in the folder the job ran in.
    assert run.info.artifact_uri.startswith((output.parent / "store" / "mlartifacts").as_uri())
    fetched = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert read_json(output / "metrics.json") == json.loads(open(fetched, encoding="utf-8").read())
    assert run.data.tags["mlflow.note.content"] == (output / CARD_FILE).read_text(encoding="utf-8")
    # The logged model loads with MLflow's Keras flavour and predicts as the run's model.keras.
    [logged] = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id
    import keras

    from transferkit.data.images import load_image

    images = np.stack([load_image(path, 32) for path in sorted((shapes_dir / "circle").iterdir())[:3]])
    images = images.astype("float32")
    expected = keras.models.load_model(output / "model.keras").predict(images, verbose=0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where models:/ URIs are looked up
    assert not mlflow.is_tracking_uri_set() or mlflow.get_tracking_uri() == uri  # logging left no URI behind
    loaded = mlflow.keras.load_model(logged.model_uri)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-6)


def test_tracking_uri_comes_from_the_recipe_then_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking.tracking_uri("") == "sqlite:///from-env.db"
    assert tracking.tracking_uri("http://tracker:5000") == "http://tracker:5000"
    assert tracking.tracking_uri("off") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri("") is None
    assert tracking.public_uri("https://me:secret@tracker:5000/") == "https://tracker:5000/"


def test_without_mlflow_a_named_uri_is_an_error_and_the_environment_alone_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(transferkit.TransferkitError, match=r"pip install 'transferkit\[mlflow\]'"):
        tracking.require_mlflow("sqlite:///runs.db")
    tracking.require_mlflow("")  # nothing named: nothing needed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs.db")
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        assert tracking.check_tracking("") is None
    assert [record.getMessage() for record in caplog.records] == [
        "MLFLOW_TRACKING_URI is set but MLflow is not installed, so this job is not tracked; run: "
        + tracking.INSTALL]


def test_a_tracking_server_that_cannot_be_reached_is_one_warning(caplog):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        tracker = tracking.Tracker.open(f"http://127.0.0.1:{port}", run_name="run", params={"a": "1"})
    assert tracker is None
    [record] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    message = record.getMessage()
    assert f"MLflow tracking at http://127.0.0.1:{port} is off" in message and "training goes on" in message
    assert "\n" not in message


def test_a_store_failing_mid_run_is_one_warning_and_the_epochs_go_on(mlflow_store, tmp_path, caplog):
    uri = mlflow_store(tmp_path)
    tracker = tracking.Tracker.open(uri, run_name="run", params={"a": "1"})
    logger = tracker.epoch_logger()
    logger.on_epoch_end(0, {"loss": 1.0, "learning_rate": 1e-3})
    with open(tmp_path / "mlflow.db", "r+b") as database:  # the store breaks under the run
        database.write(b"not a database any more" * 100)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        for epoch in (1, 2):
            logger.on_epoch_end(epoch, {"loss": 0.5, "learning_rate": 1e-3})
        tracker.end()
    assert tracker.failed and logger.epoch == 3
    [record] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert "stopped" in record.getMessage() and "training goes on" in record.getMessage()


# --- the model card ----------------------------------------------------------------------------


def test_the_card_names_the_classes_their_counts_and_the_accuracy(tracked):
    output, _, run = tracked
    card = (output / CARD_FILE).read_text(encoding="utf-8")
    metrics = read_json(output / "metrics.json")
    accuracy = metrics["final"]["val_accuracy"]
    meta = front_matter(card)
    assert meta["library_name"] == "keras" and meta["pipeline_tag"] == "image-classification"
    assert meta["transferkit"]["classes"] == ["circle", "square", "triangle"]
    [result] = meta["model-index"][0]["results"]
    assert result["metrics"][0] == {"type": "accuracy", "value": pytest.approx(accuracy, abs=1e-4),
                                    "name": "Validation accuracy"}
    assert f"Validation accuracy: **{100 * accuracy:.1f}%** on {metrics['n_val']} images" in card
    counts = metrics["class_counts"]
    for index, name in enumerate(("circle", "square", "triangle")):
        assert f"| {index} | {name} | {counts['train'][name]} | {counts['val'][name]} |" in card
    assert sum(counts["train"].values()) == metrics["n_train"] and sum(counts["val"].values()) == metrics["n_val"]
    labels = read_json(output / "labels.json")
    temperature = metrics["calibration"]["temperature"]
    for fact in (labels["data_fingerprint"], "## Calibration", f"{temperature:.3g}", "no rejection threshold",
                 "## Exports\n\nNone yet", run.info.run_id, "random weights", "keras.models.load_model"):
        assert fact in card, fact
    for section in ("## Model details", "## Classes", "## Training data", "## Evaluation", "## Uses",
                    "## Bias, risks and limitations", "## How to use"):
        assert section in card


def test_the_cards_plain_keras_snippet_runs(tracked, shapes_dir, monkeypatch):
    output, _, _ = tracked
    card = (output / CARD_FILE).read_text(encoding="utf-8")
    snippet = card.split("```python\n")[1].split("```")[0]
    photo = sorted((shapes_dir / "square").iterdir())[0]
    monkeypatch.chdir(output)
    namespace = {}
    exec(snippet.replace('"photo.jpg"', repr(str(photo))), namespace)  # noqa: S102
    [row] = transferkit.predict_folder(transferkit.load_run(output), photo, engine="keras",
                                       precision="float32").rows
    assert namespace["label"] == row.label
    assert namespace["confidence"] == pytest.approx(row.confidence, abs=1e-5)


def test_report_on_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / CARD_FILE).exists()
