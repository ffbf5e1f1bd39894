import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.tuning.learning_data import LEARNING, write_colour_classes, write_stripe_classes
from transferkit.cli import app
from transferkit.recipe import load_recipe
from transferkit.tuning import diagnostics
from transferkit.tuning.lr_find import prepare_stage

CHECK = {check.__name__.strip("_"): check for check in diagnostics.CHECKS}
NAMES = ["initial loss", "input", "gradients", "overfit one batch", "learning rate", "validation loss falls",
         "horizontal flip"]


@pytest.fixture(scope="module")
def colour_dir(tmp_path_factory):
    return write_colour_classes(tmp_path_factory.mktemp("colours") / "data")


@pytest.fixture(scope="module")
def sound(colour_dir):
    with prepare_stage(colour_dir, load_recipe(None, LEARNING)) as setup:
        yield setup


def run(setup, *names):
    report = diagnostics.run_checks(setup, checks=tuple(CHECK[name] for name in names))
    return {check.name: check for check in report.checks}


@pytest.fixture()
def broken(sound):
    """The sound set-up, its starting weights put back after a test broke them on purpose."""
    weights = sound.initial_weights
    yield sound
    sound.initial_weights = weights
    sound.reset()


def test_doctor_model_passes_a_sound_set_up_with_every_check(colour_dir):
    flags = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
             "--set", "head.units=[16]", "--set", "precision=\"float32\""]
    result = CliRunner().invoke(app, ["doctor", str(colour_dir), "--model", *flags, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["cached"] and report["stage"] == 0
    assert [check["name"] for check in report["checks"]] == NAMES
    assert all(check["passed"] and check["figure"] and not check["advice"] for check in report["checks"])


def test_a_tiny_learning_rate_fails_overfitting_the_rate_check_and_the_validation_loss(sound):
    # The recipe refuses a rate of 0; 1e-12 is as good as none.
    recipe = load_recipe(None, {**LEARNING, "stages.0.learning_rate": 1e-12})
    checks = run(dataclasses.replace(sound, recipe=recipe), "overfit_one_batch", "learning_rate",
                 "validation_loss_falls")
    assert not any(check.passed for check in checks.values())
    assert "(too low)" in checks["learning rate"].figure
    assert "--set stages.0.learning_rate=" in checks["learning rate"].advice
    assert "after 100 steps" in checks["overfit one batch"].figure


def test_shuffled_labels_fail_the_validation_check_that_colour_labels_pass(sound, tmp_path):
    assert run(sound, "validation_loss_falls")["validation loss falls"].passed
    shuffled = write_colour_classes(tmp_path / "shuffled", shuffle_labels=True)
    with prepare_stage(shuffled, load_recipe(None, LEARNING)) as setup:
        check = run(setup, "validation_loss_falls")["validation loss falls"]
    assert not check.passed
    assert "labels that do not follow the images" in check.advice


def test_classes_a_flip_turns_into_each_other_fail_the_flip_check_whose_advice_names_the_recipe_key(tmp_path):
    # The colour classes pass it (test_doctor_model_passes_a_sound_set_up_with_every_check).
    # A low constant rate without dropout: the short run learns the stripes' direction.
    learns = {**LEARNING, "head.dropout": 0.0, "data.val_split": 0.3, "stages.0.learning_rate": 3e-4,
              "augment.hflip": True}
    stripes = write_stripe_classes(tmp_path / "stripes", per_class=34)  # 20 validation images: enough to judge on
    with prepare_stage(stripes, load_recipe(None, learns)) as setup:
        check = run(setup, "horizontal_flip")["horizontal flip"]
        auto = run(dataclasses.replace(setup, recipe=load_recipe(None, {**learns, "augment.hflip": "auto"})),
                   "horizontal_flip")["horizontal flip"]
        unflipped = run(dataclasses.replace(setup, recipe=load_recipe(None, {**learns, "augment.hflip": False})),
                        "horizontal_flip")["horizontal flip"]
    assert not check.passed and check.value <= -0.5
    assert "mirrored validation images: accuracy" in check.figure
    assert "--set augment.hflip=false" in check.advice
    # Under "auto" finetune judges the same and flips in no stage: the check passes and says why.
    assert auto.passed and auto.value == check.value and "flips in no stage" in auto.figure and not auto.advice
    assert unflipped.passed and "does not flip" in unflipped.figure


def test_a_frozen_head_fails_the_gradient_and_overfit_checks(sound):
    head = sound.classifier.get_layer("head")
    head.trainable = False
    try:
        checks = run(sound, "gradients", "overfit_one_batch")
    finally:
        head.trainable = True
    assert not checks["gradients"].passed and "head has no trainable weights" in checks["gradients"].figure
    assert not checks["overfit one batch"].passed
    assert run(sound, "gradients")["gradients"].passed


def test_exploding_gradients_fail_the_gradient_check(broken):
    output = broken.classifier.get_layer("head").get_layer("output")
    output.kernel.assign(np.asarray(output.kernel) * 1e6)
    broken.initial_weights = broken.model.get_weights()
    check = run(broken, "gradients")["gradients"]
    assert not check.passed and "explodes" in check.figure


def test_a_confident_start_fails_the_initial_loss_check(broken):
    assert run(broken, "initial_loss")["initial loss"].passed
    output = broken.classifier.get_layer("head").get_layer("output")
    output.bias.assign(np.array([12.0, 0.0, 0.0], dtype="float32"))
    broken.initial_weights = broken.model.get_weights()
    check = run(broken, "initial_loss")["initial loss"]
    assert not check.passed and "ln 3" in check.figure and check.value > 2 * np.log(3)


def test_images_scaled_to_0_1_fail_the_input_check(tmp_path):
    dim = write_colour_classes(tmp_path / "dim", per_class=8, scale=1 / 255)
    with prepare_stage(dim, load_recipe(None, LEARNING)) as setup:
        check = run(setup, "input")["input"]
    assert not check.passed
    assert "pixels 0..1 of 0..255" in check.figure and "scaled to 0..1" in check.advice


def test_preprocessing_without_the_channel_swap_fails_the_input_check(sound):
    convert = sound.classifier.get_layer("preprocessing").get_layer("rgb_to_bgr_minus_mean")
    kernel, bias = convert.get_weights()
    convert.set_weights([np.eye(3, dtype="float32").reshape(1, 1, 3, 3), bias])  # RGB kept: no swap
    try:
        check = run(sound, "input")["input"]
    finally:
        convert.set_weights([kernel, bias])
    assert not check.passed and "BGR" in check.advice
    assert run(sound, "input")["input"].passed


def test_report_text_says_pass_or_fail_with_what_to_try(sound):
    recipe = load_recipe(None, {**LEARNING, "stages.0.learning_rate": 1e-12})
    report = diagnostics.run_checks(dataclasses.replace(sound, recipe=recipe),
                                    checks=(CHECK["initial_loss"], CHECK["overfit_one_batch"]))
    text = report.format_text()
    assert text.startswith("learning checks of stage 'head' (--stage 0): ")  # as --stage counts, not "stage 1"
    assert text.splitlines()[1].startswith("pass  initial loss")
    assert "FAIL  overfit one batch" in text and "try: " in text
    assert not report.passed and text.endswith("1 of 2 checks failed")


def test_doctor_model_json_keeps_stdout_for_the_json_alone(shapes_dir, monkeypatch):
    from typer.testing import CliRunner

    from transferkit.cli import app
    from transferkit.errors import WeightsError
    from transferkit.tuning import diagnostics

    def downloading(*args, **kwargs):
        print("Downloading data from https://storage.googleapis.com/...")  # as Keras's get_file prints it
        raise WeightsError("could not download the ImageNet weights for vgg16")

    monkeypatch.setattr(diagnostics, "check_learning", downloading)
    result = CliRunner().invoke(app, ["doctor", str(shapes_dir), "--model", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"error": "could not download the ImageNet weights for vgg16"}
    assert "Downloading data from" in result.stderr
