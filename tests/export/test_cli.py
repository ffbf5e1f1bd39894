"""The export and benchmark commands, through typer's CliRunner; a missing runtime and an
existing folder are one-line errors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

import transferkit
from transferkit.cli import TENSORFLOW_COMMANDS, app
from transferkit.errors import ExportError

runner = CliRunner()


def test_export_writes_the_folder_and_needs_force_to_replace_it(shapes_run, shapes_dir, tmp_path):
    run = tmp_path / "run"  # a copy: the export goes into its exports/ folder, and report lists it there
    shutil.copytree(shapes_run.path, run)
    out = run / "exports" / "litert"
    result = runner.invoke(app, ["export", str(run), "--format", "litert", "-o", str(out), "--data", str(shapes_dir)])
    assert result.exit_code == 0, result.output
    assert "litert: " in result.output and "max |dp|" in result.output and "1 export(s) written" in result.output
    assert {path.name for path in out.iterdir()} == {"model.tflite", "labels.json", "README.txt", "export.json",
                                                     "MODEL_CARD.md"}
    # The export carries the run's model card, this export listed in it with its accuracy drop.
    copy = (out / "MODEL_CARD.md").read_text()
    assert 'classes: ["circle", "square", "triangle"]' in copy and "litert export model.tflite" in copy
    drop = json.loads((out / "export.json").read_text())["accuracy"]["drop_points"]
    assert "| `exports/litert` | none |" in copy and f"| {drop:.2f} |" in copy
    again = runner.invoke(app, ["export", str(run), "--format", "litert", "-o", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    before = (out / "export.json").stat().st_mtime_ns
    forced = runner.invoke(app, ["export", str(run), "--format", "litert", "-o", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "export.json").stat().st_mtime_ns != before
    # The run's own card lists its exports once report writes it again.
    assert not (run / "MODEL_CARD.md").exists()  # (this hand-made run had none)
    reported = runner.invoke(app, ["report", str(run)])
    assert reported.exit_code == 0 and str(run / "MODEL_CARD.md") in reported.output, reported.output
    card = (run / "MODEL_CARD.md").read_text()
    assert "| `exports/litert` | none |" in card and "None yet" not in card and "This copy travels" not in card


def test_all_over_earlier_exports_names_them_and_the_commands_for_the_rest(shapes_run, tmp_path):
    """As after an interrupted ``--format all``: the completed format folders are kept, and
    the retry says which exist and how to export the others, and writes nothing."""
    out = tmp_path / "all"
    for name in ("onnx", "keras"):
        (out / name).mkdir(parents=True)
    result = runner.invoke(app, ["export", str(shapes_run.path), "--format", "all", "-o", str(out)])
    assert result.exit_code == 1, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert f"{out / 'onnx'}" in line and f"{out / 'keras'}" in line
    assert "pass --force to export every format again" in line
    assert f"transferkit export {shapes_run.path} --format savedmodel -o {out / 'savedmodel'}" in line
    assert "--format onnx" not in line and "--quantize" not in line
    assert sorted(path.name for path in out.iterdir()) == ["keras", "onnx"]
    assert not any(any((out / name).iterdir()) for name in ("keras", "onnx"))  # nothing written
    # Quantized: the commands keep --quantize; a folder that is no export is told as such.
    (out / "litert-int8").mkdir()
    (out / "onnx-int8").mkdir()
    (out / "onnx-int8" / "notes.txt").write_text("mine")
    int8_all = ["export", str(shapes_run.path), "--format", "all", "--quantize", "int8", "-o", str(out)]
    result = runner.invoke(app, int8_all)
    assert result.exit_code == 1 and "onnx-int8 is not an export folder" in result.output, result.output
    (out / "onnx-int8" / "notes.txt").unlink()
    result = runner.invoke(app, int8_all)
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert f"--format openvino --quantize int8 -o {out / 'openvino-int8'}" in line, line


def test_force_replaces_only_export_folders(shapes_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(shapes_run.path), "--format", "keras", "-o", str(tmp_path), "--force"])
    assert result.exit_code == 1 and "not an export folder" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
    into_run = runner.invoke(app, ["export", str(shapes_run.path), "--format", "keras", "-o", str(shapes_run.path),
                                   "--force"])
    assert into_run.exit_code == 1 and "would replace the run" in into_run.output


@pytest.mark.parametrize("module, format, quantize", [("tf2onnx", "onnx", "none"), ("ai_edge_litert", "litert", "none"),
                                                      ("nncf", "openvino", "int8")])
def test_a_missing_runtime_names_the_install_command(module, format, quantize, shapes_run, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ExportError, match=rf"needs {module}, which is not installed; install it with: pip install '"):
        transferkit.export_run(shapes_run, format, quantize=quantize)
    result = runner.invoke(app, ["export", str(shapes_run.path), "--format", format, "--quantize", quantize])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "pip install 'transferkit[export]'" in lines[0]


def test_bad_choices_are_usage_errors(shapes_run):
    for flags in (["--format", "tflite"], ["--format", "savedmodel", "--quantize", "int4"]):
        result = runner.invoke(app, ["export", str(shapes_run.path), *flags])
        assert result.exit_code == 2 and result.output.startswith("error:")


def test_a_quantization_the_format_lacks_is_a_usage_error(shapes_run, tmp_path):
    """Each format's quantizations come from the formats table: one it lacks is a bad
    --quantize value (exit 2, as an unknown one), told before anything is written."""
    out = tmp_path / "h5"
    for format in ("h5", "savedmodel"):
        refused = runner.invoke(app, ["export", str(shapes_run.path), "--format", format, "--quantize", "int8",
                                      "-o", str(out)])
        assert refused.exit_code == 2, refused.output
        assert refused.output == f"error: {format} export cannot be quantized to int8; it supports none\n"
    assert not out.exists()


def test_benchmark_formats_and_output_names_are_usage_errors(shapes_run, tmp_path):
    """An unknown --formats entry (or a quantization its format lacks) and a -o that is not
    a .json name are bad flag values: exit 2, as predict's -o p.txt, before any export."""
    run = str(shapes_run.path)
    for entry in ("kerass", "keras-int8", "onnx,h5-float16"):
        refused = runner.invoke(app, ["benchmark", run, "--formats", entry, "-o", str(tmp_path / "b.json")])
        assert refused.exit_code == 2, refused.output
        assert refused.output.startswith("error: unknown benchmark format") and "choose from" in refused.output
    refused = runner.invoke(app, ["benchmark", run, "--formats", "keras", "-o", str(tmp_path / "b.txt")])
    assert refused.exit_code == 2 and refused.output == f"error: --output {tmp_path / 'b.txt'}: use a .json file name\n"
    assert not list(tmp_path.iterdir())


def test_benchmark_prints_one_table_and_writes_benchmark_json(shapes_run, tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["benchmark", str(shapes_run.path), "--formats", "litert,onnx-dynamic",
                                 "--batch-size", "4", "--seconds", "0.05", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "img/s b4" in result.output and "onnx-dynamic" in result.output
    payload = json.loads(out.read_text())
    assert [row["name"] for row in payload["rows"]] == ["litert", "onnx-dynamic"]
    for row in payload["rows"]:
        assert row["size_bytes"] > 0 and row["load_seconds"] > 0 and row["images_per_second_batch_n"] > 0
        assert 0 <= row["accuracy"] <= 1
    assert {"export", "benchmark"} <= TENSORFLOW_COMMANDS
    # Where it may not write, told before any export: an existing file (without --force), a
    # folder, one of the run's own files, another kind of name.
    run = shapes_run.path
    (tmp_path / "old.json").mkdir()
    for target, words in ((out, "exists already; pass --force"), (tmp_path / "old.json", "is a folder"),
                          (run / "labels.json", "is inside the run folder")):
        refused = runner.invoke(app, ["benchmark", str(run), "--formats", "onnx", "-o", str(target)])
        assert refused.exit_code == 1 and words in refused.output and "Traceback" not in refused.output, target
    assert json.loads(out.read_text()) == payload and "class_names" in json.loads((run / "labels.json").read_text())
    assert runner.invoke(app, ["benchmark", str(run), "--seconds", "0"]).exit_code == 2


def test_benchmark_skips_the_default_formats_its_backbone_cannot_hold_and_refuses_one_named(
        shapes_run, tmp_path, monkeypatch):
    """A backbone's ``unsupported_formats`` (MobileNetV3's h5): the default formats go on
    without them; one named is refused before any export. Here the run's backbone (vgg16)
    is declared unable to hold any format but keras."""
    import dataclasses

    from transferkit import backbones
    from transferkit.export.formats import FORMATS

    assert shapes_run.backbone == "vgg16"
    narrowed = dataclasses.replace(backbones.REGISTRY["vgg16"], unsupported_formats=tuple(
        (name, "not this one") for name in FORMATS if name != "keras"))
    monkeypatch.setitem(backbones.REGISTRY, "vgg16", narrowed)
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["benchmark", str(shapes_run.path), "--batch-size", "2", "--seconds", "0.05",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert [row["name"] for row in payload["rows"]] == ["keras"]
    assert "h5" in payload["skipped"] and "benchmark: skipping h5 (vgg16 cannot be written as h5: not this one" \
        in result.output
    refused = runner.invoke(app, ["benchmark", str(shapes_run.path), "--formats", "keras,onnx", "-o",
                                  str(tmp_path / "other.json")])
    assert refused.exit_code == 1 and "vgg16 cannot be written as onnx: not this one" in refused.output
    assert "benchmark keras" not in refused.output and not (tmp_path / "other.json").exists()


def test_export_needs_no_package_for_a_backbone_none_adds_any_more(shapes_run, tmp_path):
    """A run whose backbone plugin was uninstalled still exports (its file is made of Keras
    layers); only the format's own check tells whether it holds the model."""
    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    labels = json.loads((run / "labels.json").read_text())
    (run / "labels.json").write_text(json.dumps({**labels, "backbone": "gone-net"}))
    result = runner.invoke(app, ["export", str(run), "--format", "keras", "-o", str(tmp_path / "keras")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "keras" / "model.keras").is_file()


def test_the_accuracy_check_uses_the_runs_own_split_not_a_recreated_one(shapes_run, shapes_dir, tmp_path):
    """Images added to the data folder after training shift a re-created split: training
    images were then scored as validation ones."""
    from transferkit.data.split import split_table
    from transferkit.export.exporter import export_run

    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    files = [f"{name}/{path.name}" for name in shapes_run.class_names for path in sorted((shapes_dir / name).iterdir())]
    validation = sorted(files[1::4])  # the run's split, as its split.csv records it
    (run / "split.csv").write_text(split_table([(file, "validation" if file in validation else "train")
                                                for file in files]))
    data = shutil.copytree(shapes_dir, tmp_path / "data")
    for name in shapes_run.class_names:  # the folder grew since: copies of a training image
        first = sorted((data / name).iterdir())[0]
        for index in range(3):
            shutil.copy(first, data / name / f"added_{index}{first.suffix}")
    [result] = export_run(run, "keras", tmp_path / "out", data=data)
    accuracy = json.loads((result.folder / "export.json").read_text())["accuracy"]
    assert sorted(accuracy["files"]) == validation
