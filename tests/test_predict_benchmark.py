"""benchmarks/predict.py on a run and a folder of the user's own (``--run RUN --photos FOLDER``:
the issue's held-out predict check on real photos), against plain Keras on the same decoded
images and reading the folder itself."""

import json
import runpy
from pathlib import Path

import pytest

from tests import forked

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The benchmark's functions, its child processes (``python predict.py --child...``)
    forked from the suite's preloaded server (tests/forked.py) instead of each importing
    TensorFlow and Keras."""
    namespace = runpy.run_path(str(BENCHMARKS / "predict.py"), run_name="predict_benchmark")
    namespace["main"].__globals__["subprocess"] = forked  # the module's globals, which its functions read
    return namespace


def test_a_given_run_is_measured_on_every_image_of_the_given_folder(bench, shapes_run, shapes_dir, capsys,
                                                                    tmp_path):
    import shutil

    # A copy: its engine cache (keyed by the run's path) is its own, so the shared run's int8
    # network is not quantized here for the tests that watch it being quantized.
    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    code = bench["main"](["--run", str(run), "--photos", str(shapes_dir), "--batch", "8", "--precisions", "int8"])
    assert code == 0
    report = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert report["images"] == len(list(shapes_dir.glob("*/*.jpg"))) == 30
    assert report["backbone"] == shapes_run.backbone and report["size"] == shapes_run.image_size
    for key in ("keras_float32_predict_images_per_s", "keras_float32_reading_the_folder_images_per_s",
                "transferkit_predict_images_per_s"):
        assert report[key] > 0
    # The same images, the same model: the engines agree with plain Keras on the labels.
    assert report["top1_agreement_with_keras_float32"] >= 0.9
    assert 0 <= report["keras_float32_accuracy_on_these_images"] <= 1  # class-named folders: scored
    assert "with_precision_float32" not in report  # only those asked for
    int8 = report["with_precision_int8"]
    assert int8["ratio_to_keras_reading_the_folder"] > 0 and int8["top1_agreement_with_keras_float32"] >= 0.9


def test_run_and_photos_go_together_and_a_folder_without_images_ends_in_one_line(bench, shapes_run, capsys,
                                                                                 tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench["main"](["--run", str(shapes_run.path)])
    assert exit_info.value.code == 2 and "--run and --photos go together" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench["main"](["--run", str(shapes_run.path), "--photos", str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --photos ") and "no images" in err[-1]
