"""A warm predict rebuilds its recorded engine from OpenVINO alone (inference/warm.py)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from transferkit.progress import LightBar

PREDICT = """
import json, sys
from transferkit.inference.predict import predict_folder
result = predict_folder(sys.argv[1], sys.argv[2], engine="openvino")
print(json.dumps({"rows": [[row.label, row.confidence] for row in result.rows],
                  "keras": "keras" in sys.modules, "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.fixture()
def own_run(binary_run, tmp_path):
    """A copy of the run: its engine cache (keyed by the folder) starts empty."""
    return Path(shutil.copytree(binary_run.path, tmp_path / "run"))


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, colour in enumerate([(200, 10, 10), (10, 200, 10), (20, 20, 220), (240, 240, 240)]):
        Image.new("RGB", (40, 40), colour).save(folder / f"{index}.png")
    return folder


def _predict_in_a_fresh_process(run: Path, images: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PREDICT, str(run), str(images)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_warm_predict_loads_no_keras_and_answers_as_the_first(own_run, images):
    pytest.importorskip("openvino")
    cold = _predict_in_a_fresh_process(own_run, images)
    assert cold["keras"]  # the first builds its engine from the model
    records = list((Path(_engine_cache(own_run)) / "warm").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["kind"] in ("openvino", "chained")
    warm = _predict_in_a_fresh_process(own_run, images)
    assert not warm["keras"] and not warm["tensorflow"]
    assert warm["rows"] == cold["rows"]


def test_a_record_holds_only_for_its_model_file_and_its_networks_as_converted(own_run, images):
    pytest.importorskip("openvino")
    from transferkit.inference.predict import predict_folder
    from transferkit.inference.warm import record_key, recorded_engine

    predict_folder(own_run, images, engine="openvino")
    cache = _engine_cache(own_run)
    model_file = own_run / "model.keras"
    key = record_key(model_file, 32, "openvino", "auto", False)
    assert key is not None and recorded_engine(cache, key) is not None
    # Another precision, image size or int8 choice is another key, with no record.
    assert recorded_engine(cache, record_key(model_file, 32, "openvino", "float32", False)) is None
    assert record_key(model_file, 32, "openvino", "auto", True) != key
    # Another model in the same file (a run trained again into the folder): another key.
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    assert record_key(model_file, 32, "openvino", "auto", False) != key
    # A network converted again since the record: the record is not used.
    record = json.loads(next((cache / "warm").glob("*.json")).read_text())
    network = record.get("network") or record["body"]
    Path(network["xml"]).with_suffix(".fingerprint").write_text("another\n")
    assert recorded_engine(cache, key) is None


def test_light_bar_writes_keras_s_line_or_redraws_its_bar(capsys):
    line = LightBar(3, "image", started=0.0, redrawn=False)
    line.update(2)
    assert capsys.readouterr().out == ""  # one line, at the end
    line.update(3)
    assert re.fullmatch(r"3/3 - \d+s - \d+(us|ms|s)/image\n", capsys.readouterr().out)
    bar = LightBar(4, "image", started=0.0, redrawn=True)
    bar.update(4)
    out = capsys.readouterr().out
    assert out.startswith("\r") and "4/4" in out and "━" * LightBar.WIDTH in out and out.endswith("/image\n")


def _engine_cache(run: Path) -> Path:
    from transferkit.inference.openvino import engine_cache_dir

    return engine_cache_dir(run)
