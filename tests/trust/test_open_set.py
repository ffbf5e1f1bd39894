"""Rejecting unknown images and prediction sets, end to end on the shared tiny runs: what
finetune records, what predict and evaluate do with it (library and CLI), and the errors of
runs trained before there was a threshold."""

import csv
import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.data.synthetic import write_unknown_images
from transferkit.errors import RecipeError, RunError
from transferkit.evaluation import figures
from transferkit.evaluation.evaluate import evaluate_folder, write_evaluation
from transferkit.inference.predict import engine_for, predict_folder
from transferkit.inference.uncertainty import images_for_coverage, load_rejection, load_set_rule
from transferkit.recipe import RejectConfig, load_recipe
from transferkit.runs import load_run
from transferkit.trust.record import STORED_REFERENCE
from transferkit.trust.rejection import SCORE_TOLERANCE, below_the_score, fit_rejection, fpr_at_tpr, reference_rows

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def copy_run(run, folder, **labels_changes):
    """A copy of a run folder (its model linked, not copied) whose labels.json entries are
    replaced (None: removed)."""
    shutil.copytree(run.path, folder, ignore=shutil.ignore_patterns("model.keras"))
    (folder / "model.keras").symlink_to(run.path / "model.keras")
    labels = json.loads((folder / "labels.json").read_text())
    for key, value in labels_changes.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


@pytest.fixture(scope="module")
def labelled_with_unknown(shapes_dir, tmp_path_factory):
    """The three shape classes and unknown/: nine images of no shape (noise, colour fields, checkers)."""
    folder = tmp_path_factory.mktemp("open-set") / "labelled"
    shutil.copytree(shapes_dir, folder)
    write_unknown_images(folder / "unknown", 9, size=40, seed=5)
    return folder


def test_finetune_records_the_threshold_its_reference_and_the_set_scores(shapes_run):
    labels = json.loads((shapes_run.path / "labels.json").read_text())
    rejection, sets = labels["rejection"], labels["prediction_sets"]
    assert rejection["score"] == "knn" and rejection["target_coverage"] == 0.95 and rejection["neighbours"] == 1
    assert rejection["n_validation"] == 6 == sets["n_validation"] == len(sets["scores"])
    # Six validation images cannot promise 95%: the threshold is their lowest score, keeping all six.
    assert rejection["validation_coverage"] == 1.0
    with np.load(shapes_run.path / rejection["reference_file"]) as archive:
        reference = archive["embeddings"].astype("float32")
    width = shapes_run.model.get_layer("backbone").output.shape[-1]  # the embedding: the backbone's channels
    assert reference.shape == (24, width) == (rejection["n_reference"], width)
    assert np.linalg.norm(reference, axis=1) == pytest.approx(np.ones(24), abs=2e-3)
    # The last stage trained on cached features: the reference images took only the layers above them.
    assert rejection["reference_passes"] == STORED_REFERENCE
    assert sets["method"] == "LAC" and sets["scores"] == sorted(sets["scores"])
    assert all(0 <= score <= 1 for score in sets["scores"])
    assert load_run(shapes_run.path, with_model=False).rejection == rejection


def test_fit_keeps_its_coverage_of_validation_images_for_either_score(shapes_run, monkeypatch):
    import transferkit.trust.rejection

    monkeypatch.setattr(transferkit.trust.rejection, "REFERENCE_LIMIT", 12)
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    # Validated on the training images themselves: the 12 in the reference score ~1.
    prepared = SimpleNamespace(train_images=images, val_images=images)
    for score in ("knn", "max_probability"):
        fit = fit_rejection(shapes_run.model, prepared, RejectConfig(coverage=0.8, score=score), image_size=32,
                            batch_size=8, engine="keras")
        # floor(21 * 0.2) = 4: the 4th smallest of 20 scores, which keeps 17 of them; the threshold just
        # below it (below_the_score), so that predict keeps that image too
        fourth = np.sort(fit.val_scores)[3]
        assert fourth - SCORE_TOLERANCE <= fit.record["threshold"] < fourth
        assert fit.record["validation_coverage"] == 17 / 20 and fit.record["score"] == score
        assert (fit.reference is None) == (score == "max_probability")
    knn = fit_rejection(shapes_run.model, prepared, RejectConfig(coverage=0.8), image_size=32, batch_size=8)
    width = shapes_run.model.get_layer("backbone").output.shape[-1]
    assert knn.reference.shape == (12, width) and knn.record["n_reference"] == 12  # REFERENCE_LIMIT
    assert knn.val_scores[reference_rows(20, seed=0)] == pytest.approx(np.ones(12), abs=2e-3)
    chosen = reference_rows(100, limit=20, seed=3)
    assert len(set(chosen)) == 20 and chosen.tolist() == sorted(chosen) == reference_rows(100, 20, 3).tolist()


def test_the_threshold_lies_just_below_the_validation_score_it_is_and_above_the_next():
    """A few 1e-5 between the fit's and predict's score of the image on the threshold (another
    engine or precision) rejected it: 1 of 32 validation images of a run that recorded 100%."""
    scores = np.array([0.2, 0.9, 0.97579, 0.99])
    assert below_the_score(0.97579, scores) == pytest.approx(0.97579 - SCORE_TOLERANCE)
    assert below_the_score(0.9, np.array([0.89999, 0.9, 0.95])) == pytest.approx(0.899995)
    assert below_the_score(0.2, scores) == pytest.approx(0.2 - SCORE_TOLERANCE)  # the lowest: nothing below
    assert below_the_score(5.0, np.array([5.0, 7.0])) == pytest.approx(5.0 - 5 * SCORE_TOLERANCE)


def test_predict_reject_and_sets_rows_follow_the_threshold_and_keep_the_top_class(shapes_run, shapes_dir, tmp_path):
    plain = predict_folder(shapes_run, shapes_dir, engine="keras")
    result = predict_folder(shapes_run, shapes_dir, engine="keras", reject=True, sets=0.5)
    rule = load_rejection(shapes_run)
    assert [row.top_class for row in result.rows] == [row.label for row in plain.rows]
    for row in result.rows:
        assert row.unknown == (row.score < rule.threshold)
        assert row.label == ("unknown" if row.unknown else row.top_class)
        assert row.prediction_set[0] == row.top_class and len(set(row.prediction_set)) == len(row.prediction_set)
    # The 24 training images are the reference: each is its own nearest neighbour, and kept.
    own = [row for row in result.rows if row.score > 0.999]
    assert len(own) >= 24 and not any(row.unknown for row in own)
    # A threshold at the median score labels the lower half unknown, through the CLI.
    median = float(np.median([row.score for row in result.rows]))
    copied = copy_run(shapes_run, tmp_path / "run", rejection=dict(shapes_run.rejection, threshold=median))
    done = invoke("predict", copied, shapes_dir, "--engine", "keras", "--reject", "--sets", "0.5",
                  "-o", tmp_path / "p.csv")
    assert done.exit_code == 0, done.output
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "label", "confidence", "top_k", "unknown", "top_class", "score", "set", "set_size"]
    unknown = [row for row in rows if row["unknown"] == "true"]
    assert 0 < len(unknown) <= 15 and all(row["label"] == "unknown" for row in unknown)
    assert all(float(row["score"]) < median for row in unknown)
    assert [row["top_class"] for row in rows] == [row.label for row in plain.rows]
    assert all(len(row["set"].split("|")) == int(row["set_size"]) for row in rows)
    assert f"{len(unknown)} unknown" in done.output


def test_a_coverage_the_validation_split_cannot_reach_is_told_once_with_what_it_needs(shapes_run, shapes_dir,
                                                                                      tmp_path, caplog):
    n = shapes_run.prediction_sets["n_validation"]
    assert n == 6  # reaches 6/7 = 0.857 at most
    assert images_for_coverage(0.857) == 6 and images_for_coverage(0.9) == 9 and images_for_coverage(0.99) == 99
    assert images_for_coverage(0.9999) == 9999 and images_for_coverage(0.5) == 1
    copied = copy_run(shapes_run, tmp_path / "run")
    with caplog.at_level("WARNING", logger="transferkit"):
        assert not np.isinf(load_set_rule(load_run(copied), 0.85).quantile)
        assert not caplog.records
        for coverage in (0.9, 0.9, 0.95):  # once per run: serve asks per request
            assert np.isinf(load_set_rule(load_run(copied), coverage).quantile)
    [record] = caplog.records
    assert record.getMessage() == (f"prediction sets at coverage 0.9 need at least 9 validation images; {copied} "
                                   "was calibrated on 6, so above 0.857 every set holds every class: ask for 0.857 "
                                   "or less (--sets, serve's ?sets=), or train with more validation images")
    other = copy_run(shapes_run, tmp_path / "other")
    done = invoke("predict", other, shapes_dir, "--engine", "keras", "--sets", "0.95", "-o", tmp_path / "p.csv")
    assert done.exit_code == 0, done.output
    assert [line for line in done.output.splitlines() if "coverage 0.95 need at least 19" in line], done.output
    with open(tmp_path / "p.csv", newline="") as handle:
        assert {int(row["set_size"]) for row in csv.DictReader(handle)} == {3}  # every class, as it said


def test_a_binary_run_gets_sets_and_a_max_probability_rule_needs_no_embedding(binary_run, binary_dir):
    rule = {"score": "max_probability", "threshold": 0.6, "target_coverage": 0.95}
    result = predict_folder(replace(binary_run, rejection=rule), binary_dir, engine="keras", reject=True, sets=0.7)
    for row in result.rows:
        assert row.score == pytest.approx(row.confidence) and row.unknown == (row.confidence < 0.6)
        assert set(row.prediction_set) <= set(binary_run.class_names) and row.prediction_set[0] == row.top_class
    assert json.loads(json.dumps([row.unknown for row in result.rows])) == [row.unknown for row in result.rows]


def test_evaluate_with_unknown_folder_reports_auroc_fpr_rejection_sets_and_draws_risk_coverage(
        shapes_run, labelled_with_unknown, tmp_path):
    result = evaluate_folder(shapes_run, labelled_with_unknown, engine="keras", reject=True, sets=0.5)
    known = result.known
    assert result.metrics["n_images"] == 30 and (~known).sum() == 9
    open_set = result.metrics["open_set"]
    assert open_set["score"] == "knn" and open_set["n_unknown"] == 9
    assert open_set["auroc"] == pytest.approx(roc_auc_score(known, result.scores))
    assert open_set["fpr_at_95_tpr"] == pytest.approx(fpr_at_tpr(result.scores[known], result.scores[~known]))
    plain = result.probabilities.max(axis=1)
    assert open_set["max_probability"]["auroc"] == pytest.approx(roc_auc_score(known, plain))
    rejection = result.metrics["rejection"]
    assert rejection["known_kept"] == pytest.approx(1 - result.rejected[known].mean())
    assert rejection["unknown_rejected"] == pytest.approx(result.rejected[~known].mean())
    sets = result.metrics["prediction_sets"]
    holds = result.members[np.flatnonzero(known), result.labels[known]]
    assert sets["coverage"] == pytest.approx(holds.mean()) and sets["target_coverage"] == 0.5
    assert "open set (9 unknown images)" in result.summary() and "prediction sets at 0.5" in result.summary()
    out = write_evaluation(result, tmp_path / "eval")
    with Image.open(out / "risk_coverage.png") as image:
        assert image.size == tuple(round(side * figures.DPI) for side in figures.CURVE_SIZE)
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[-5:] == ["score", "unknown", "top_class", "set", "set_size"]
    assert sum(row["true"] == "unknown" for row in rows) == 9
    assert all(row["predicted"] == ("unknown" if row["unknown"] == "true" else row["top_class"]) for row in rows)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["open_set"]["auroc"] == pytest.approx(open_set["auroc"])


def test_openvino_gives_the_same_rejection_scores_as_keras(shapes_run, shapes_dir):
    rule = load_rejection(shapes_run)
    images = np.stack([np.asarray(Image.open(path).convert("RGB").resize((32, 32)))
                       for path in sorted(shapes_dir.glob("*/*.jpg"))[:8]])
    keras_outputs = engine_for(shapes_run, "keras", "float32", rule).predict(images)
    openvino_outputs = engine_for(shapes_run, "openvino", "float32", rule).predict(images)
    assert keras_outputs.shape == (8, 3 + 1)
    np.testing.assert_allclose(openvino_outputs, keras_outputs, atol=1e-4)


def test_runs_without_the_records_still_predict_and_are_told_when_asked_for_them(
        shapes_run, shapes_dir, labelled_with_unknown, tmp_path):
    old = replace(shapes_run, rejection=None, prediction_sets=None)  # as load_run reads an older run
    for option, words in (({"reject": True}, "no rejection threshold"), ({"sets": 0.9}, "no prediction-set scores")):
        with pytest.raises(RunError, match=words) as error:
            predict_folder(old, shapes_dir / "circle", engine="keras", **option)
        assert "\n" not in str(error.value) and "finetune" in str(error.value)
        with pytest.raises(RunError, match=words):
            evaluate_folder(old, labelled_with_unknown, engine="keras", **option)
    assert len(predict_folder(old, shapes_dir / "circle", engine="keras").rows) == 10
    # evaluate with unknown/ falls back to the largest probability, and says which score it used
    result = evaluate_folder(old, labelled_with_unknown, engine="keras")
    assert result.metrics["open_set"]["score"] == "max_probability" and "max_probability" not in result.metrics[
        "open_set"]
    # a damaged reference file is one line saying so
    damaged = copy_run(shapes_run, tmp_path / "damaged")
    (damaged / "rejection.npz").write_bytes(b"not an npz")
    done = invoke("predict", damaged, shapes_dir / "circle", "--engine", "keras", "--reject", "-q")
    assert done.exit_code == 1 and done.output.count("error:") == 1 and "rejection.npz is damaged" in done.output
    # evaluate on unknown/ without --reject needs no threshold: it warns and scores by the largest probability
    # (it stopped, telling of --reject, which was not asked for)
    (damaged / "rejection.npz").unlink()
    done = invoke("evaluate", damaged, labelled_with_unknown, "--engine", "keras", "-q", "-o", tmp_path / "eval")
    assert done.exit_code == 0, done.output
    assert "rejection.npz is missing" in done.output
    assert "the open-set figures use the largest probability" in done.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["open_set"]["score"] == "max_probability"


@pytest.mark.parametrize("flags, words", [
    (["--sets", "1.5"], "--sets must be between 0 and 1"),
    (["--sets", "0"], "--sets must be between 0 and 1"),
    (["--reject", "--tta"], "--reject does not combine with --tta"),
    (["--sets", "0.9", "--tta"], "--sets does not combine with --tta"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_bad_trust_flags_are_usage_errors_before_any_work(command, flags, words, tmp_path):
    done = invoke(command, tmp_path / "no-run", tmp_path, *flags)
    assert done.exit_code == 2 and done.output.count("error:") == 1 and words in done.output


def test_reject_coverage_and_score_are_checked_in_the_recipe():
    assert load_recipe(None, {"reject.coverage": 0.9}).reject.coverage == 0.9
    for key, value, words in (("reject.coverage", 1.5, "reject.coverage"), ("reject.score", "energy", "knn")):
        with pytest.raises(RecipeError, match=words):
            load_recipe(None, {key: value})


def test_the_readme_formula_for_plain_keras_gives_predicts_scores_and_sets(shapes_run, shapes_dir):
    from pathlib import Path

    from transferkit.data.images import decode_images

    readme = (Path(__file__).resolve().parents[2] / "docs" / "trust.md").read_text()
    code = readme.split("Plain Keras, from the run folder alone")[1].split("```python\n")[1].split("```")[0]
    files = sorted(shapes_dir.glob("*/*.jpg"))[::3]
    images, _, _ = decode_images(files, 32)
    namespace = {"images": images}
    exec(code.replace("runs/demo", str(shapes_run.path)).replace("0.9", "0.5"), namespace)  # noqa: S102
    result = predict_folder(shapes_run, shapes_dir, engine="keras", reject=True, sets=0.5)
    rows = {row.file: row for row in result.rows}
    assert namespace["score"] == pytest.approx([rows[path].score for path in files], abs=1e-4)
    # Images at a boundary (a validation image's own score is the threshold, or q) may fall
    # either side by float rounding: compared elsewhere.
    clear = np.abs(namespace["score"] - namespace["rule"]["threshold"]) > 1e-4
    assert namespace["unknown"][clear].tolist() == [rows[path].unknown for path, c in zip(files, clear) if c]
    names = shapes_run.class_names
    probabilities, q = namespace["probabilities"], namespace["q"]
    for path, row, members in zip(files, probabilities, namespace["in_set"]):
        sure = np.abs(row - (1 - q)) > 1e-5
        assert [names[i] for i in np.flatnonzero(members & sure)] == [
            name for name in names if name in rows[path].prediction_set and sure[names.index(name)]]
