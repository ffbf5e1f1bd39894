"""MODEL_CARD.md: written with every run (Hugging Face layout: YAML front matter, then
sections), its plain-Keras lines giving predict's answer, and ``report`` on a folder that is no
run. (Exports copying the card and ``report`` listing them: tests/export/test_cli.py; the card
of a tracked run naming its MLflow run: tests/cli/test_cli.py.)"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.evaluation.card import CARD_FILE

runner = CliRunner()


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_names_the_classes_their_counts_and_the_accuracy(shapes_run):
    output = shapes_run.path
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
    rejection = labels["rejection"]
    for fact in (labels["data_fingerprint"], "## Calibration", f"{temperature:.3g}", "## Rejection of unknown images",
                 f"Images whose {rejection['score']} score falls below the threshold", "--sets 0.9",
                 "## Exports\n\nNone yet", "random weights", "keras.models.load_model"):
        assert fact in card, fact
    # (6 validation images: every class's figures are rough, said once, not as a list of them all)
    assert "validation images have rough per-class figures: every class." in card
    for section in ("## Model details", "## Classes", "## Training data", "## Evaluation", "## Uses",
                    "## Bias, risks and limitations", "## How to use"):
        assert section in card
    # hflip = "auto" with 6 validation images: not judged, the fine stage flipped.
    assert metrics["hflip"]["kept"] and metrics["hflip"]["check"] is None
    assert "horizontal flip auto (off in stage 'head', on after it: not judged" in card


@pytest.mark.parametrize("decision, words", [
    ({"judged_after": "head", "stage_index": 0, "kept": True, "check": {"changes_class": False}},
     "auto (off in stage 'head', on after it: mirrored validation images then scored not clearly worse than the "
     "originals)"),
    (None, "auto (off: the run's one stage trained without flips"),
])
def test_the_card_says_what_hflip_auto_decided(shapes_run, tmp_path, decision, words):
    import shutil

    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    if decision is None:
        del metrics["hflip"]
    else:
        metrics["hflip"] = {**metrics["hflip"], **decision}
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert f"horizontal flip {words}" in (run / CARD_FILE).read_text(encoding="utf-8")


def test_the_cards_plain_keras_snippet_gives_predicts_answer(shapes_run, shapes_dir, monkeypatch):
    output = shapes_run.path
    card = (output / CARD_FILE).read_text(encoding="utf-8")
    snippet = card.split("```python\n")[1].split("```")[0]
    photo = sorted((shapes_dir / "square").iterdir())[0]
    monkeypatch.chdir(output)
    namespace = {}
    exec(snippet.replace('"photo.jpg"', repr(str(photo))), namespace)  # noqa: S102
    [row] = transferkit.predict_folder(shapes_run, photo, engine="keras", precision="float32").rows
    assert namespace["label"] == row.label
    assert namespace["confidence"] == pytest.approx(row.confidence, abs=1e-5)


def test_the_cards_snippet_gives_predicts_keras_engine_in_the_runs_own_precision(bfloat16_run, binary_dir,
                                                                                monkeypatch):
    """The card says which predict its lines match (--engine keras: the model in its own
    precision, here mixed bfloat16) and how far the default engine's 16-bit rounding is,
    told by the near-tie margin predict's engines compute again in float32 below."""
    from transferkit.inference.engines import REFINE_MARGIN

    output = bfloat16_run.path
    card = (output / CARD_FILE).read_text(encoding="utf-8")
    assert "few thousandths" not in card
    assert "the confidences of `transferkit predict --engine keras`" in card and "precision, mixed_bfloat16" in card
    assert (f"about {REFINE_MARGIN / 2:g} (what its near-tie check allows for: an image whose top two probabilities "
            f"are closer than {REFINE_MARGIN:g} is computed again in float32") in " ".join(card.split())
    snippet = card.split("```python\n")[1].split("```")[0]
    photo = sorted(next(folder for folder in binary_dir.iterdir() if folder.is_dir()).iterdir())[0]
    monkeypatch.chdir(output)
    namespace = {}
    exec(snippet.replace('"photo.jpg"', repr(str(photo))), namespace)  # noqa: S102
    [row] = transferkit.predict_folder(bfloat16_run, photo, engine="keras").rows
    assert namespace["label"] == row.label
    assert namespace["confidence"] == pytest.approx(row.confidence, abs=1e-6)


def test_report_keeps_the_card_when_metrics_json_is_damaged(shapes_run, tmp_path):
    import shutil

    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    card = (run / CARD_FILE).read_text(encoding="utf-8")
    (run / "metrics.json").write_text("{not json", encoding="utf-8")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {run / 'metrics.json'} is damaged" in result.output and "nothing was rewritten" in result.output
    assert len(result.output.strip().splitlines()) == 1  # the error alone, no warning about the same file before it
    by_model = runner.invoke(app, ["report", str(run / "model.keras")])  # the run named by its model file
    assert by_model.exit_code == 1 and by_model.output == result.output
    assert (run / CARD_FILE).read_text(encoding="utf-8") == card


def test_the_card_marks_an_evaluation_that_held_training_images(shapes_run, tmp_path):
    import shutil

    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    for name, trained in (("eval-held-out", 0), ("eval-mixed", 22)):
        (run / name).mkdir()
        (run / name / "metrics.json").write_text(json.dumps({"n_images": 30, "accuracy": 0.5, "ece": 0.1,
                                                              "n_training_images": trained}))
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    card = (run / CARD_FILE).read_text(encoding="utf-8")
    assert "| eval-held-out | 30 | 50.0% |" in card and "| eval-mixed* | 30 | 50.0% |" in card
    assert "\\* Not held out: these include images the run trained on (eval-mixed: 22)" in card


def test_report_warns_once_about_a_damaged_history_and_writes_the_rest(shapes_run, tmp_path):
    import shutil

    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    (run / "history.csv").write_text("garbage\n,,,\n", encoding="utf-8")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {run / 'history.csv'} is damaged (no epoch, stage, loss, accuracy, val_loss, "
                        "val_accuracy column); the run's history is left out"]
    assert f"wrote {run / 'confusion.png'}, {run / CARD_FILE}" in result.output


def test_report_on_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / CARD_FILE).exists()
