import csv
import errno
import json
import shutil

import numpy as np
import pytest

import transferkit
from transferkit.errors import DataError, RunError
from transferkit.runs import load_run, save_run

RUN_FILES = {
    "model.keras", "labels.json", "recipe.toml", "history.csv", "metrics.json", "split.csv",
    "rejection.npz", "history.png", "confusion.png", "MODEL_CARD.md",
}


@pytest.fixture(scope="module")
def messy_data(shapes_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "data"
    shutil.copytree(shapes_dir, root)
    (root / "circle" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def finished(messy_data, tmp_path_factory):
    from tests.conftest import TINY

    output = tmp_path_factory.mktemp("runs") / "run"
    run = transferkit.finetune(messy_data, None, TINY, output=output, verbose=0)
    return run, output


def test_run_folder_holds_everything(finished):
    run, output = finished
    assert RUN_FILES | {"skipped.txt"} == {path.name for path in output.iterdir()}
    assert not [path for path in output.parent.iterdir() if path.name.startswith(".")]
    assert "1 unreadable or non-image file(s), listed in `skipped.txt`" in (output / "MODEL_CARD.md").read_text()


def test_labels_json_describes_the_model(finished):
    _, output = finished
    labels = json.loads((output / "labels.json").read_text())
    assert labels["class_names"] == ["circle", "square", "triangle"]
    assert labels["image_size"] == 32
    assert labels["backbone"] == "tinyvgg"
    assert labels["head_activation"] == "softmax"


def test_history_is_continuous_across_stages(finished):
    run, output = finished
    # Loaded, the run's history holds what the trained run's did: ints, strings and floats.
    loaded = transferkit.load_run(output, with_model=False).history
    assert loaded == run.history and isinstance(loaded[0]["epoch"], int) and isinstance(loaded[0]["loss"], float)
    assert transferkit.load_run(output, with_model=False).class_names == run.class_names  # tuples, both
    with open(output / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert [row["stage"] for row in rows] == ["head", "fine"]
    assert float(rows[0]["learning_rate"]) > float(rows[1]["learning_rate"])


def test_metrics_and_recipe_are_saved(finished):
    run, output = finished
    metrics = json.loads((output / "metrics.json").read_text())
    assert 0 <= metrics["final"]["val_accuracy"] <= 1
    assert np.asarray(metrics["confusion_matrix"]).sum() == metrics["n_val"]
    assert metrics["n_train"] + metrics["n_val"] == 30
    recipe = transferkit.load_recipe(output / "recipe.toml")
    assert recipe.image_size == 32 and recipe.weights == "none"


def test_metrics_time_each_stage(finished):
    _, output = finished
    stages = json.loads((output / "metrics.json").read_text())["stages"]
    assert [(stage["stage"], stage["epochs"]) for stage in stages] == [("head", 1), ("fine", 1)]
    assert list(stages[0]) == ["stage", "epochs", "seconds", "caching_seconds", "cached"]
    for stage in stages:
        assert stage["seconds"] >= stage["caching_seconds"] >= 0
        assert isinstance(stage["cached"], bool)


def test_skipped_files_are_listed(finished):
    _, output = finished
    lines = (output / "skipped.txt").read_text().splitlines()
    assert len(lines) == 1 and "broken.jpg" in lines[0] and "not a readable image" in lines[0]


def test_load_run_predicts_like_the_returned_model(finished):
    run, output = finished
    loaded = load_run(output)
    images = np.random.default_rng(0).uniform(0, 255, (3, 40, 40, 3)).astype("float32")
    np.testing.assert_allclose(loaded.model.predict(images, verbose=0), run.model.predict(images, verbose=0), atol=1e-6)
    assert "validation accuracy" in loaded.describe()


def test_existing_run_is_not_overwritten_without_force(finished, messy_data):
    _, output = finished
    before = (output / "model.keras").read_bytes()
    with pytest.raises(RunError, match="--force"):
        transferkit.finetune(messy_data, None, {"weights": "none", "image_size": 32}, output=output, verbose=0)
    assert (output / "model.keras").read_bytes() == before


def test_failed_write_leaves_nothing_and_keeps_the_old_run(tmp_path):
    output = tmp_path / "run"

    def old_run(folder):
        (folder / "labels.json").write_text("{}")
        (folder / "marker").write_text("old")

    save_run(output, old_run)

    def disk_full(folder):
        (folder / "half").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunError, match="disk is full"):
        save_run(output, disk_full, force=True)
    assert (output / "marker").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["run"]

    def interrupted(folder):
        (folder / "half").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_run(tmp_path / "new", interrupted)
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_force_replaces_an_existing_run(tmp_path):
    output = tmp_path / "run"
    save_run(output, lambda folder: (folder / "labels.json").write_text("{}"))
    save_run(output, lambda folder: (folder / "new").write_text("2"), force=True)
    assert [path.name for path in output.iterdir()] == ["new"]


def test_force_replaces_run_folders_only(tmp_path, shapes_dir):
    """--force must never delete a folder that is not a run: somebody's files, the data."""
    shapes_dir = shutil.copytree(shapes_dir, tmp_path / "copy" / "data")
    notes = tmp_path / "important"
    notes.mkdir()
    (notes / "thesis.txt").write_text("precious")
    with pytest.raises(RunError, match="not a run folder"):
        transferkit.finetune(shapes_dir, None, {"weights": "none"}, output=notes, force=True, verbose=0)
    assert (notes / "thesis.txt").read_text() == "precious"
    classes = sorted(path.name for path in shapes_dir.iterdir())
    for output in (shapes_dir, shapes_dir.parent):
        with pytest.raises(RunError, match="holds the data folder|is the data folder"):
            transferkit.finetune(shapes_dir, None, {"weights": "none"}, output=output, force=True, verbose=0)
    assert sorted(path.name for path in shapes_dir.iterdir()) == classes


def test_run_inside_the_data_folder_is_refused_and_creates_nothing(tmp_path, shapes_dir):
    """A run folder inside the data would be read as a class by every later run."""
    shapes_dir = shutil.copytree(shapes_dir, tmp_path / "data")
    before = sorted(path.name for path in shapes_dir.iterdir())
    with pytest.raises(RunError, match="inside the data folder"):
        transferkit.finetune(shapes_dir, None, {"weights": "none"}, output=shapes_dir / "runs" / "first", verbose=0)
    assert sorted(path.name for path in shapes_dir.iterdir()) == before


def test_read_only_parent_is_refused_before_training(tmp_path, shapes_dir, monkeypatch):
    from transferkit import runs

    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    # Root can write anywhere, so let the permission check see what a normal user would.
    real_access = runs.os.access
    monkeypatch.setattr(runs.os, "access",
                        lambda path, mode: False if str(path) == str(parent) else real_access(path, mode))
    with pytest.raises(RunError, match="permission denied"):
        transferkit.finetune(shapes_dir, None, {"weights": "none", "image_size": 32}, output=parent / "run", verbose=0)
    assert list(parent.iterdir()) == []


def test_a_read_only_filesystem_is_named_as_such(tmp_path):
    """A real read-only mount (tmpfs, in a mount namespace of its own) where the run would go."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("util-linux's unshare is not installed")
    mount = tmp_path / "read-only"
    mount.mkdir()
    script = ("from transferkit.files import require_writable_place\n"
              f"require_writable_place({str(mount / 'runs' / 'run')!r})")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro,size=1m tmpfs "{mount}" && '
                           f'exec "{sys.executable}" -c "$0"', script], capture_output=True, text=True)
    if "mount:" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"no mount namespace here: {done.stderr.strip()[:200]}")
    assert f"RunError: cannot write into {mount} (its filesystem is read-only); choose another -o" in done.stderr


def test_val_dir_with_other_classes_is_refused(shapes_dir, binary_dir, tmp_path):
    with pytest.raises(DataError, match="same class sub-folders"):
        transferkit.finetune(shapes_dir, None, {"weights": "none", "image_size": 32}, val_dir=binary_dir,
                             output=tmp_path / "run", verbose=0)


def test_the_data_folder_as_its_own_validation_folder_is_refused(binary_dir, tmp_path):
    (tmp_path / "link").symlink_to(binary_dir, target_is_directory=True)
    for val_dir in (binary_dir, tmp_path / "link"):
        with pytest.raises(DataError, match=r"is the data folder itself; pass a folder of other images"):
            transferkit.finetune(binary_dir, None, {"weights": "none", "image_size": 32}, val_dir=val_dir,
                                 output=tmp_path / "run", verbose=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link"]


def test_binary_run_with_val_dir_uses_a_sigmoid(binary_dir, tiny, tmp_path):
    tiny["stages.1:.epochs"] = 0
    shutil.copytree(binary_dir, tmp_path / "val")
    run = transferkit.finetune(binary_dir, None, tiny, val_dir=tmp_path / "val", output=tmp_path / "run", verbose=0)
    assert run.head_activation == "sigmoid"
    assert run.metrics["n_val"] == 20 and run.metrics["n_train"] == 20
    assert run.model.output_shape == (None, 1)


def test_weights_that_cannot_be_loaded_leave_no_folder_behind(shapes_dir, tmp_path, monkeypatch):
    import urllib.error

    from keras.src.utils import file_utils

    from transferkit.errors import WeightsError

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(WeightsError, match="--weights none"):
        transferkit.finetune(shapes_dir, None, {"weights": "imagenet", "image_size": 32}, output=tmp_path / "run",
                             verbose=0)
    assert [path.name for path in tmp_path.iterdir() if path.name != "keras-home"] == []


def test_images_beyond_the_memory_budget_train_the_same(shapes_dir, shapes_run, tmp_path, monkeypatch):
    """data.memory_mb smaller than the decoded images: they go to a memory-mapped file and
    the run is the same as with everything in memory (the shared ``shapes_run``: the same
    data and recipe within the budget)."""
    from tests.conftest import TINY
    from transferkit.data import prepare as data
    from transferkit.recipe import load_recipe

    spilled = []
    original = data.image_array

    def spy(count, size, memory_budget_mb, spill_dir=None):
        array = original(count, size, memory_budget_mb, spill_dir)
        spilled.append(isinstance(array, np.memmap))
        return array

    monkeypatch.setattr(data, "image_array", spy)
    small = transferkit.finetune(shapes_dir, None, {**TINY, "data.memory_mb": 0.01}, output=tmp_path / "small",
                                 verbose=0)
    assert spilled and all(spilled)
    spilled.clear()
    data.prepare_data(shapes_dir, load_recipe(None, TINY), verbose=0)  # as shapes_run's data was prepared
    assert spilled and not any(spilled)
    large = shapes_run
    # (the shared run is read back from its folder: history.csv's figures as written, strings)
    expected = [float(row["val_loss"]) for row in large.history]
    assert [row["val_loss"] for row in small.history] == pytest.approx(expected)
    for a, b in zip(small.model.get_weights(), large.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_metrics_name_the_epoch_the_saved_model_comes_from(finished):
    """Each stage ends on its epoch of lowest validation loss, so the saved model is that
    epoch of the last stage: its figures are the final ones."""
    import numpy as np

    from transferkit.evaluation.summary import summarize

    run, _ = finished
    saved = run.metrics["saved"]
    assert (saved["epoch"], saved["stage"]) == (2, "fine")
    assert run.metrics["final"]["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-4)
    history = [{"epoch": e, "stage": s, "val_loss": v, "val_accuracy": a} for e, s, v, a in
               [(1, "head", 0.5, 0.9), (2, "head", 0.9, 0.5), (3, "fine", 0.8, 0.6), (4, "fine", 0.7, 0.6),
                (5, "fine", 0.7, 0.7), (6, "fine", 0.75, 0.8)]]
    metrics = summarize(history, np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"], 0.7, 10)
    assert metrics["saved"] == {"epoch": 4, "stage": "fine", "val_loss": 0.7}
    assert (metrics["best"]["epoch"], metrics["best"]["stage"]) == (1, "head")


def test_full_disk_at_the_final_save_keeps_the_training_for_resume(shapes_dir, tmp_path, tiny, monkeypatch):
    import errno

    import transferkit.runs
    from transferkit.workflow import resume_finetune

    output = tmp_path / "run"
    tiny["stages.1:.epochs"] = 0  # the head stage is training enough to keep
    real_write_history = transferkit.runs.write_history

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transferkit.runs, "write_history", disk_full)
    with pytest.raises(RunError, match=r"disk is full; the folder was not written; the training is kept in .*--resume"):
        transferkit.finetune(shapes_dir, None, tiny, output=output, verbose=0)
    assert not output.exists() and (tmp_path / "run.partial").is_dir()
    monkeypatch.setattr(transferkit.runs, "write_history", real_write_history)
    run = resume_finetune(output, verbose=0)
    assert (run.path / "history.csv").is_file() and not (tmp_path / "run.partial").exists()


def test_class_names_the_plot_font_lacks_give_one_line_not_a_warning_per_glyph(tmp_path, caplog):
    import logging
    import warnings

    import numpy as np

    from transferkit.evaluation.figures import plot_confusion, plot_history

    logger = logging.getLogger("transferkit")  # the CLI stops it propagating to caplog's root
    logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning escaping would fail here
            plot_confusion(np.array([[3, 1], [0, 4]]), ["Kreis 圆", "Quadrat 方"], tmp_path / "matrix.png")
            plot_history([{"epoch": 1, "stage": "頭", "loss": 1.0, "accuracy": 0.5, "val_loss": 1.1,
                           "val_accuracy": 0.4}], tmp_path / "history.png")
    finally:
        logger.removeHandler(caplog.handler)
    assert (tmp_path / "matrix.png").stat().st_size > 0
    assert {record.message for record in caplog.records} == {
        "matrix.png: some characters of the class names are not in the plot font and show as boxes",
        "history.png: some characters of the stage names are not in the plot font and show as boxes"}


def test_a_run_that_fails_early_leaves_no_folders_it_made(shapes_dir, tmp_path, tiny, monkeypatch):
    import transferkit.workflow

    def broken(*args, **kwargs):
        raise RuntimeError("weights cannot be loaded")

    monkeypatch.setattr(transferkit.workflow, "_train", broken)
    (tmp_path / "runs").mkdir()
    with pytest.raises(RuntimeError):
        transferkit.finetune(shapes_dir, None, tiny, output=tmp_path / "runs" / "new" / "deeper" / "run", verbose=0)
    assert [path.name for path in tmp_path.iterdir()] == ["runs"] and not any((tmp_path / "runs").iterdir())


def test_a_split_that_leaves_almost_nothing_to_train_on_is_warned_about(shapes_dir, tiny, monkeypatch, caplog):
    import logging

    import transferkit.workflow

    class Prepared(Exception):
        pass

    def stop(*args, **kwargs):
        raise Prepared

    monkeypatch.setattr(transferkit.workflow, "_train", stop)
    logger = logging.getLogger("transferkit")  # the CLI stops it propagating to caplog's root
    logger.addHandler(caplog.handler)
    try:
        for split in (0.2, 0.9):
            caplog.clear()
            with pytest.raises(Prepared):
                transferkit.finetune(shapes_dir, None, {**tiny, "data.val_split": split}, verbose=0,
                                     output=shapes_dir.parent / f"never-{split}")
            warned = sorted({record.message for record in caplog.records if "training image(s)" in record.message})
            assert warned == ([] if split == 0.2 else [
                "only 3 training image(s) (circle: 1) against 27 for validation (data.val_split 0.9); "
                "lower --val-split or add images"]), warned
    finally:
        logger.removeHandler(caplog.handler)


def test_the_saved_model_is_calibrated_on_the_validation_split(finished):
    """calibrate = true (default): metrics.json records the temperature and the validation
    ECE before and after; the saved model's outputs are the temperature-scaled ones."""
    from transferkit.evaluation.calibration import logits_of, probabilities_from_logits

    run, output = finished
    calibration = json.loads((output / "metrics.json").read_text())["calibration"]
    assert calibration["temperature"] > 0 and calibration["ece_after"] <= calibration["ece_before"]
    model = load_run(output).model
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype="uint8")
    np.testing.assert_allclose(model.predict(images, verbose=0),
                               probabilities_from_logits(logits_of(model, images)), rtol=1e-4, atol=1e-6)


def test_calibration_can_be_switched_off_and_tensorboard_on(shapes_dir, tmp_path):
    from tests.conftest import TINY
    from tests.training.test_tensorboard import read_scalars

    run = transferkit.finetune(shapes_dir, None, {**TINY, "calibrate": False, "tensorboard": True},
                               output=tmp_path / "run", verbose=0)
    assert "calibration" not in run.metrics
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    # one step count across the head and the fine stage
    assert [step for step, _ in scalars["val_loss"]] == [1, 2]
    assert [value for _, value in scalars["val_loss"]] == pytest.approx([row["val_loss"] for row in run.history])
