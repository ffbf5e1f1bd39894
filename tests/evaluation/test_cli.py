import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli import app

runner = CliRunner()


def test_evaluate_prints_a_summary_and_writes_the_folder(binary_run, binary_dir, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(binary_run.path), str(binary_dir), "-o", str(out), "-q",
                                 "--engine", "keras"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "ECE" in result.output and str(out) in result.output
    assert (out / "metrics.json").is_file() and (out / "roc.png").is_file()
    again = runner.invoke(app, ["evaluate", str(binary_run.path), str(binary_dir), "-o", str(out), "-q"])
    assert again.exit_code == 1 and "--force" in again.output


def test_evaluate_unknown_class_is_one_error_line(binary_run, tmp_path):
    (tmp_path / "zebra").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "zebra" / "z.png")
    result = runner.invoke(app, ["evaluate", str(binary_run.path), str(tmp_path), "-q"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "zebra" in lines[0]
    assert "Traceback" not in result.output


def test_explain_writes_png_npy_and_grid_and_report_redraws(shapes_run, shapes_dir, tmp_path):
    out = tmp_path / "explain"
    name = shapes_run.class_names[1]
    result = runner.invoke(app, ["explain", str(shapes_run.path), str(shapes_dir / name), "-o", str(out),
                                 "--top", "2"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "heatmaps.json").read_text())
    assert len(index) == 10 and (out / "gradcam_grid.png").is_file()
    first = index[0]
    assert [h["class"] for h in first["heatmaps"]] and len(first["heatmaps"]) == 2
    heat = np.load(out / first["heatmaps"][0]["npy"])
    with Image.open(first["file"]) as image:
        assert heat.shape == (image.height, image.width) and heat.dtype == np.float32
    assert 0 <= heat.min() and heat.max() <= 1
    with Image.open(out / first["png"]) as png:
        png.verify()
    both = runner.invoke(app, ["explain", str(shapes_run.path), str(shapes_dir / name), "--class", name, "--top", "2"])
    assert both.exit_code == 2 and f"--class {name} explains one class and --top 2" in both.output
    # Beside the class explained, in the folder the run was trained on: its PNGs would be a class.
    inside = runner.invoke(app, ["explain", str(shapes_run.path), str(shapes_dir / name), "-o",
                                 str(shapes_dir / "explained")])
    assert inside.exit_code == 1 and "is inside the data folder" in inside.output
    assert not (shapes_dir / "explained").exists()
    report = runner.invoke(app, ["report", str(shapes_run.path)])
    assert report.exit_code == 0 and "history.png" in report.output and "confusion.png" in report.output


def test_explain_a_class_the_run_lacks_is_a_usage_error(shapes_run, shapes_dir, tmp_path):
    """--class names a class of the run: another name is a bad flag value (exit 2, as --top 0)."""
    out = tmp_path / "explain"
    bad = runner.invoke(app, ["explain", str(shapes_run.path), str(shapes_dir), "--class", "hexagon", "-o", str(out)])
    assert bad.exit_code == 2, bad.output
    assert bad.output == (f"error: class 'hexagon' (--class, or /explain's ?class=) is not one of the run's classes: "
                          f"{', '.join(shapes_run.class_names)}\n")
    assert not out.exists()
    missing = runner.invoke(app, ["explain", str(tmp_path / "no-run"), str(shapes_dir), "--class", "hexagon"])
    assert missing.exit_code == 1 and "does not exist" in missing.output  # the run itself: an input failure


def test_explain_stopped_while_writing_leaves_no_folder_and_the_retry_needs_no_force(shapes_run, shapes_dir,
                                                                                      tmp_path, monkeypatch):
    from transferkit.evaluation import gradcam

    out = tmp_path / "explain"
    images = shapes_dir / shapes_run.class_names[0]
    plot_grid = gradcam.plot_grid

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C once the per-image files are written, before the grid

    monkeypatch.setattr(gradcam, "plot_grid", stopped)
    result = runner.invoke(app, ["explain", str(shapes_run.path), str(images), "-o", str(out)])
    assert result.exit_code == 130 and result.output.strip().endswith("error: interrupted")
    assert sorted(tmp_path.iterdir()) == []  # neither the folder nor its work folder
    monkeypatch.setattr(gradcam, "plot_grid", plot_grid)
    again = runner.invoke(app, ["explain", str(shapes_run.path), str(images), "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "heatmaps.json").is_file() and (out / "gradcam_grid.png").is_file()
