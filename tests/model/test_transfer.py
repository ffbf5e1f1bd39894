"""Transfer from your own runs: --weights RUN_DIR starts from that run's backbone."""

import json

import numpy as np
import pytest

import transferkit
from transferkit.backbones import REGISTRY, get_spec
from transferkit.errors import WeightsError
from transferkit.model.transfer import load_run_backbone, source_run


@pytest.fixture(scope="module")
def source(shapes_run):
    return shapes_run


def test_a_run_folder_or_its_model_file_names_the_source(source):
    assert source_run(source.path).folder == source.path
    assert source_run(source.path / "model.keras").model_path == source.path / "model.keras"
    assert source_run("imagenet") is None and source_run(source.path / "labels.json") is None


def test_the_backbone_starts_equal_to_the_source_runs(source):
    backbone = load_run_backbone(source_run(source.path), get_spec("tinyvgg"), (32, 32, 3))
    expected = source.model.get_layer("backbone").get_weights()
    assert len(expected) == len(backbone.get_weights())
    for a, b in zip(expected, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_from_a_run_keeps_its_frozen_blocks_and_records_its_lineage(source, binary_dir, tmp_path):
    from tests.conftest import TINY

    run = transferkit.finetune(binary_dir, None, {**TINY, "weights": str(source.path)}, output=tmp_path / "new",
                               verbose=0)
    assert run.model.output_shape[-1] == 1  # a new head for the new (two) classes
    old = source.model.get_layer("backbone")
    new = run.model.get_layer("backbone")
    for layer in old.layers:
        if layer.weights and layer.name.startswith(("block1", "block2", "block3", "block4")):
            for a, b in zip(layer.get_weights(), new.get_layer(layer.name).get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)
    labels = json.loads((run.path / "labels.json").read_text())
    lineage = labels["lineage"]
    assert lineage["source_run"] == str(source.path.resolve())
    assert lineage["data_fingerprint"] == json.loads((source.path / "labels.json").read_text())["data_fingerprint"]
    assert lineage["recipe"]["image_size"] == 32 and lineage["class_names"] == ["circle", "square", "triangle"]
    lineage_comment = f"# lineage: the backbone started from the run {source.path.resolve()}"
    assert (run.path / "recipe.toml").read_text().startswith(lineage_comment)
    assert transferkit.load_recipe(run.path / "recipe.toml").weights == str(source.path)


def test_a_run_of_another_image_size_or_backbone_is_refused(source, binary_dir, tmp_path):
    from tests.conftest import TINY

    with pytest.raises(WeightsError, match="that run has a tinyvgg backbone at 32 px, this run is tinyvgg at 48 px"):
        transferkit.finetune(binary_dir, None, {**TINY, "weights": str(source.path), "image_size": 48},
                             output=tmp_path / "bigger", verbose=0)
    with pytest.raises(WeightsError, match="use --backbone tinyvgg --image-size 32"):
        load_run_backbone(source_run(source.path), REGISTRY["vgg19"], (32, 32, 3))
    assert not (tmp_path / "bigger").exists() and not (tmp_path / "bigger.partial").exists()


def test_the_cli_refuses_a_run_of_another_size_before_reading_any_image(source, binary_dir, tmp_path, caplog):
    from typer.testing import CliRunner

    from transferkit.cli import app

    with caplog.at_level("INFO", logger="transferkit"):
        result = CliRunner().invoke(app, ["finetune", str(binary_dir), "--backbone", "tinyvgg", "--weights",
                                          str(source.path), "--image-size", "48", "-o", str(tmp_path / "bigger")])
    assert result.exit_code == 1
    assert "that run has a tinyvgg backbone at 32 px, this run is tinyvgg at 48 px" in result.output
    assert "reading images" not in caplog.text + result.output  # told before the data is read
    assert not (tmp_path / "bigger").exists()
