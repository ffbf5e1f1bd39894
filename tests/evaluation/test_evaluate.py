import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from transferkit.errors import DataError, RunError
from transferkit.evaluation import figures
from transferkit.evaluation.evaluate import evaluate_folder, write_evaluation
from transferkit.inference.predict import predict_folder


def test_accuracy_equals_a_count_from_predicts_own_rows(shapes_run, shapes_dir):
    result = evaluate_folder(shapes_run, shapes_dir, engine="keras")
    rows = predict_folder(shapes_run, shapes_dir, engine="keras").rows
    right = sum(row.label == row.file.parent.name for row in rows)
    assert result.metrics["n_images"] == len(rows) == 30
    assert result.metrics["accuracy"] == pytest.approx(right / len(rows))
    assert [r.predicted for r in result.rows] == [row.label for row in rows]
    per_class = {name: sum(r.file.parent.name == name for r in rows) for name in shapes_run.class_names}
    assert {n: v["support"] for n, v in result.metrics["per_class"].items()} == per_class


def test_evaluating_the_runs_own_training_images_is_warned(shapes_run, shapes_dir, tmp_path, caplog, monkeypatch):
    import logging

    with open(shapes_run.path / "split.csv", newline="") as handle:
        subsets = {row["file"]: row["subset"] for row in csv.DictReader(handle)}
    trained = sum(subset == "train" for subset in subsets.values())
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result = evaluate_folder(shapes_run, shapes_dir, engine="keras")
    assert f"{trained} of the 30 images were training images of this run (its split.csv)" in caplog.text
    assert result.metrics["n_training_images"] == trained
    # A copy of every image elsewhere, given as "." from inside it: other files, though their
    # names relative to the folder are the training images' (before, 'trained on' was warned).
    caplog.clear()
    shutil.copytree(shapes_dir, tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result = evaluate_folder(shapes_run, ".", engine="keras")
    assert "training images of this run" not in caplog.text and result.metrics["n_training_images"] == 0
    # Its validation images alone (a copy of them elsewhere is not compared): no warning.
    caplog.clear()
    held_out = tmp_path / "held_out"
    for file, subset in subsets.items():
        if subset == "validation":
            (held_out / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shapes_dir / file, held_out / file)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        evaluate_folder(shapes_run, held_out, engine="keras")
    assert "training images of this run" not in caplog.text


def test_unknown_class_folder_is_a_one_line_error_and_absent_classes_are_told(shapes_run, shapes_dir, tmp_path):
    folder = tmp_path / "labelled"
    shutil.copytree(shapes_dir / shapes_run.class_names[0], folder / shapes_run.class_names[0])
    (folder / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra") as error:
        evaluate_folder(shapes_run, folder, engine="keras")
    assert "\n" not in str(error.value) and all(name in str(error.value) for name in shapes_run.class_names)
    (folder / "zebra").rmdir()
    (folder / shapes_run.class_names[0] / "broken.png").write_bytes(b"not a png")
    result = evaluate_folder(shapes_run, folder, engine="keras")
    assert result.metrics["absent_classes"] == list(shapes_run.class_names[1:])
    assert [path.name for path, _ in result.skipped] == ["broken.png"]
    assert "absent from the folder" in result.summary()


def _size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_every_file_is_written_and_each_png_opens_at_its_size(binary_run, binary_dir, tmp_path):
    result = evaluate_folder(binary_run, binary_dir, engine="keras")
    out = write_evaluation(result, tmp_path / "eval")
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.png", "metrics.json", "pr.png", "predictions.csv", "reliability.png", "roc.png", "top_losses.png"]
    px = lambda inches: (round(inches[0] * figures.DPI), round(inches[1] * figures.DPI))  # noqa: E731
    assert _size(out / "confusion.png") == px(figures.confusion_size(2, 6))
    assert _size(out / "reliability.png") == px(figures.RELIABILITY_SIZE)
    assert _size(out / "roc.png") == _size(out / "pr.png") == px(figures.CURVE_SIZE)
    assert _size(out / "top_losses.png") == px(figures.top_losses_size(len(result.top_losses())))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"roc_auc", "average_precision", "threshold", "ece", "brier", "log_loss"} <= set(metrics)
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "true", "predicted", "confidence", *binary_run.class_names]
    assert len(rows) == 20
    # Never over an earlier evaluation without force; with force it is replaced.
    with pytest.raises(RunError, match="--force"):
        write_evaluation(result, out)
    assert write_evaluation(result, out, force=True) == out


def test_class_columns_named_as_the_files_own_columns_are_named_p_colon_class(binary_run, binary_dir, tmp_path,
                                                                              caplog):
    """A class called "score" or "confidence": a CSV reader would take its column for the
    file's own (csv.DictReader keeps the last of two, pandas renames one)."""
    import dataclasses

    result = evaluate_folder(binary_run, binary_dir, engine="keras")
    renamed = dataclasses.replace(result, class_names=("confidence", "dog"))
    with caplog.at_level("WARNING", logger="transferkit"):
        out = write_evaluation(renamed, tmp_path / "eval")
    with open(out / "predictions.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["file", "true", "predicted", "confidence", "p:confidence", "p:dog"]
    assert "class name(s) confidence are predictions.csv columns of its own" in caplog.text


def test_confusion_of_fifty_classes_scales_and_history_marks_the_saved_epoch(tmp_path, shapes_run):
    names = [f"class {i}" for i in range(50)]
    matrix = np.random.default_rng(0).integers(0, 9, (50, 50))
    path = figures.plot_confusion(matrix, names, tmp_path / "confusion.png")
    width, height = _size(path)
    assert width > 2 * 1000 and height > 1000
    # The names keep a readable size as the classes grow, and still fit their cells.
    for n in (2, 10, 40, 50):
        size = figures.confusion_size(n, 12)
        font = figures.confusion_font(n, size)
        assert font >= (8 if n <= 40 else 6) and font <= 72 * size[1] / n / 2
    shares = figures.row_shares(np.array([[0, 0], [2, 6]]))
    assert np.isnan(shares[0]).all() and shares[1].tolist() == [0.25, 0.75]  # no images: blank, not 0.00
    written = figures.write_run_figures(shapes_run.path)
    assert [p.name for p in written] == ["history.png", "confusion.png"]
    width, height = figures.HISTORY_SIZE
    assert _size(written[0]) == (round(width * figures.DPI), round(height * figures.DPI))


def test_a_top_loss_is_titled_by_its_file_and_classes_each_cut_to_its_column():
    from pathlib import Path

    title = figures.top_loss_title(Path("/data/ring_7/t_img_0.png"), "an extraordinarily long class name here",
                                   "ring_1", 0.2449)
    assert title.splitlines() == ["ring_7/t_img_0.png", "true: an extraor\u2026name here", "ring_1: 0.24"]
    assert all(len(line) <= 26 for line in title.splitlines())


def test_a_labelled_folder_of_unknown_images_alone_is_told_as_such(tmp_path):
    from transferkit.errors import DataError
    from transferkit.evaluation.evaluate import labelled_files

    (tmp_path / "unknown").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "unknown" / "a.png")
    with pytest.raises(DataError, match=r"holds only unknown/ \(images of no known class\); evaluate needs a "
                                        r"sub-folder per class, named as the run's classes \(cat, dog\)"):
        labelled_files(tmp_path, ("cat", "dog"))
    (tmp_path / "unknown" / "a.png").unlink()
    (tmp_path / "unknown").rmdir()
    with pytest.raises(DataError, match="has no class sub-folders; evaluate needs"):
        labelled_files(tmp_path, ("cat", "dog"))
