"""benchmarks/finetune_vs_keras.py with the inputs the issue's held-out checks need: weights
other than random ones (a weights file here; ImageNet's where there is a network) for both
jobs, and a folder of the user's images instead of generated ones."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCHMARKS / "finetune_vs_keras.py"), run_name="finetune_benchmark")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """VGG16 without its top, seeded weights saved as a user's weights file would be."""
    import keras

    keras.utils.set_random_seed(7)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path_factory.mktemp("weights") / "vgg16_notop.weights.h5"
    model.save_weights(path)
    return path, [w.copy() for w in model.get_weights()]


def test_the_guides_backbone_starts_from_the_weights_file_and_random_weights_differ(bench, weights_file):
    path, saved = weights_file
    loaded = bench["guide_backbone"]("vgg16", 32, str(path)).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(loaded, saved, strict=True))
    fresh = bench["guide_backbone"]("vgg16", 32, "none").get_weights()
    assert not np.array_equal(fresh[0], saved[0])


def test_weights_that_cannot_be_had_or_a_data_path_that_is_no_folder_end_in_one_line(bench, capsys, tmp_path):
    missing = tmp_path / "nowhere.h5"
    assert bench["main"](["--weights", str(missing), "--size", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nowhere.h5" in err[-1]
    note = tmp_path / "notes.txt"
    note.write_text("not a folder")
    assert bench["main"](["--data", str(note), "--size", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --data ") and "notes.txt" in err[-1]


# The hand-written guide calls fit on its tf.data datasets with Keras's default shuffle=True, as a
# user's script does; Keras warns that the dataset shuffles itself (transferkit's fits pass False).
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed:UserWarning")
def test_both_jobs_train_on_the_given_folder_from_the_given_weights(bench, weights_file, shapes_dir, capsys):
    path, _ = weights_file
    code = bench["main"](["--in-process", "--data", str(shapes_dir), "--weights", str(path), "--size", "32",
                          "--batch", "8", "--head-epochs", "1", "--fine-epochs", "1"])
    assert code == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    report = json.loads(line)
    assert report["weights"] == str(path) and report["dataset"] == str(shapes_dir)
    assert report["images"] == len(list(shapes_dir.glob("*/*.jpg"))) == 30
    assert 0 < report["train_images"] < report["images"]
    for side in ("baseline", "transferkit"):
        assert 0 <= report[side]["val_accuracy"] <= 1 and report[side]["total_seconds"] > 0
    assert report["ratios"]["total_wall"] > 0
