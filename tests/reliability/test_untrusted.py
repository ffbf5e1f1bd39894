"""Files a run did not write itself, or that the disk damaged: told in one line each.

The runs here are small hand-made classifiers written as finetune writes a run folder (no
training): what is tested is how the folder's files are read.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit import runs
from transferkit.errors import RunError, WeightsError


def small_run(folder: Path, code: bool = False) -> Path:
    """A two-class run folder (one sigmoid unit) at 32 px; with ``code``, a Lambda layer in it."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    if code:
        x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    folder.mkdir(parents=True)
    model.save(folder / runs.MODEL_FILE)
    runs.write_labels(folder, ["circle", "square"], 32, "vgg16", "sigmoid")
    (folder / "recipe.toml").write_text('backbone = "vgg16"\nimage_size = 32\n')
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("untrusted") / "run")


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_damaged_model_is_told_as_damaged_not_missing(run_dir, tmp_path, damage):
    run = copy_of(run_dir, tmp_path)
    model = run / runs.MODEL_FILE
    data = bytearray(model.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":  # inside the weights, past the archive's headers
        for offset in range(len(data) // 2, len(data) // 2 + 64, 8):
            data[offset] ^= 0xFF
    else:
        data = b""
    model.write_bytes(bytes(data))
    with pytest.raises(RunError) as error:
        runs.load_run(run)
    message = one_line(error.value)
    assert f"{model} is damaged" in message and "re-run finetune" in message
    assert "not found" not in message.lower() and "missing" not in message


@pytest.mark.parametrize(("name", "text"), [("labels.json", '{"class_names": ["circle", "squ'),
                                            ("recipe.toml", 'backbone = "vgg16\n')])
def test_a_damaged_labels_or_recipe_file_is_told_as_damaged(run_dir, tmp_path, name, text):
    run = copy_of(run_dir, tmp_path)
    (run / name).write_text(text)
    with pytest.raises(RunError) as error:
        runs.load_run(run, with_model=False)
    assert f"{run / name} is damaged" in one_line(error.value)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"class_names": "abc"}, "class_names must list two or more different names"),
    ({"class_names": ["cat", "cat"]}, "class_names must list two or more different names"),
    ({"class_names": ["cat", "cat", "dog"]}, "class_names must list two or more different names"),
    ({"image_size": 0}, "image_size must be a size in pixels"),
    ({"image_size": 64}, "takes 32x32 images but"),
])
def test_labels_that_read_as_json_but_do_not_fit_the_run_are_one_error(run_dir, tmp_path, change, fragment):
    """Valid JSON is not enough: a string of class names would label images "a", "b", "c",
    and another image size would feed the model images it was not built for."""
    import json

    run = copy_of(run_dir, tmp_path)
    labels = json.loads((run / "labels.json").read_text())
    (run / "labels.json").write_text(json.dumps({**labels, **change}))
    with pytest.raises(RunError) as error:
        runs.load_run(run)
    assert fragment in one_line(error.value) and str(run / "labels.json") in one_line(error.value)


def test_a_damaged_checkpoint_is_told_as_damaged(run_dir, tmp_path):
    from transferkit.training.checkpoint import CHECKPOINT_FILE, STATE_FILE, WorkFolder

    work = WorkFolder.create(tmp_path / "run", {"data_dir": str(tmp_path)}, "", force=False)
    try:
        data = (run_dir / runs.MODEL_FILE).read_bytes()
        (work.path / CHECKPOINT_FILE).write_bytes(data[: len(data) - 100])
        (work.path / STATE_FILE).write_text("{}")
        with pytest.raises(RunError) as error:
            work.load_model()
        message = one_line(error.value)
        assert f"{work.path / CHECKPOINT_FILE} is damaged" in message and "--force" in message
    finally:
        work.remove()


def test_a_model_holding_code_is_refused_everywhere_it_is_loaded(tmp_path):
    from transferkit.backbones import get_spec
    from transferkit.model.transfer import load_run_backbone, source_run

    run = small_run(tmp_path / "lambda", code=True)
    with pytest.raises(RunError) as error:
        runs.load_run(run)
    assert f"refused to load {run / runs.MODEL_FILE}: it holds a Lambda layer" in one_line(error.value)
    with pytest.raises(WeightsError, match="refused to load .* Lambda layer") as error:  # --weights RUN_DIR
        load_run_backbone(source_run(str(run)), get_spec("vgg16"), (32, 32, 3))
    one_line(error.value)


# Spaces, quotes, commas, a newline, a semicolon and bytes that are not UTF-8.
AWKWARD = ["two words.png", 'say "cheese".png', "a,b;c.png", "it's.png", "line\nbreak.png", "ünï.png",
           os.fsdecode(b"latin-\xe9\xff.png")]


def test_awkward_file_names_round_trip_through_predict_csv_and_json_and_a_bomb_is_skipped(run_dir, tmp_path):
    from transferkit.inference.predict import predict_folder, write_predictions

    folder = tmp_path / "images"
    folder.mkdir()
    for index, name in enumerate(AWKWARD):
        Image.fromarray(np.full((40, 40, 3), 30 * index, dtype="uint8")).save(folder / name, format="PNG")
    # Pillow's default limit, no test switch: 196 million pixels in a 24 kB file
    Image.new("1", (14000, 14000)).save(folder / "bomb.png")
    result = predict_folder(run_dir, folder, engine="keras")
    expected = {os.fsencode(folder / name) for name in AWKWARD}
    assert {os.fsencode(row.file) for row in result.rows} == expected
    (skipped, reason), = result.skipped
    assert skipped.name == "bomb.png" and "decompression-bomb" in reason

    write_predictions(result, tmp_path / "out.csv")
    with open(tmp_path / "out.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert {os.fsencode(row["file"]) for row in rows} == expected

    write_predictions(result, tmp_path / "out.json")
    payload = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))  # valid UTF-8 JSON
    assert {os.fsencode(row["file"]) for row in payload["predictions"]} == expected
    assert [Path(row["file"]).name for row in payload["skipped"]] == ["bomb.png"]


def test_a_decompression_bomb_is_a_finding_of_the_doctor(tmp_path):
    from transferkit.data.doctor import check_data

    for name in ("circle", "square"):
        (tmp_path / name).mkdir()
        for index in range(3):
            Image.fromarray(np.full((40, 40, 3), 40 * index, dtype="uint8")).save(tmp_path / name / f"{index}.png")
    Image.new("1", (14000, 14000)).save(tmp_path / "circle" / "bomb.png")
    report = check_data(tmp_path, image_size=32)
    assert any("bomb.png" in str(path) and "decompression-bomb" in reason for path, reason in report.unreadable)


@pytest.mark.parametrize("damaged", [".xml", ".bin"])
def test_a_damaged_network_in_the_engine_cache_is_converted_again_with_a_notice(run_dir, tmp_path, caplog, damaged):
    pytest.importorskip("openvino")
    from transferkit.inference.openvino import load_or_convert

    model = runs.load_run(run_dir).model
    network, xml = load_or_convert(model, (32, 32, 3), tmp_path)
    file = xml.with_suffix(damaged)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    with caplog.at_level("WARNING", logger="transferkit"):
        again, same = load_or_convert(model, (32, 32, 3), tmp_path)
    assert same == xml and f"{xml} in the engine cache is damaged" in caplog.text
    with caplog.at_level("WARNING", logger="transferkit"):
        caplog.clear()
        load_or_convert(model, (32, 32, 3), tmp_path)
    assert "damaged" not in caplog.text  # rebuilt: the next one reuses it quietly


def test_report_on_a_run_with_damaged_records_warns_or_says_so_in_one_line(run_dir, tmp_path, caplog):
    from transferkit.evaluation.card import write_run_report

    run = copy_of(run_dir, tmp_path)
    (run / "history.csv").write_text("epoch,loss\n1,abc\n")  # no stage column
    (run / "metrics.json").write_text("[1, 2]")  # JSON, not an object
    written = write_run_report(run)
    assert [path.name for path in written] == ["MODEL_CARD.md"]  # no figure to draw from them
    assert "history.csv is damaged (no stage, accuracy, val_loss, val_accuracy column)" in caplog.text
    assert "metrics.json is damaged (a JSON object was expected, not a list)" in caplog.text
    (run / "MODEL_CARD.md").unlink()
    (run / "MODEL_CARD.md").mkdir()  # a folder where the card goes
    with pytest.raises(RunError) as error:
        write_run_report(run)
    assert one_line(error.value).startswith(f"cannot write the report into {run}")
