import csv
import dataclasses
import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

import transferkit
from tests.tuning.learning_data import LEARNING, write_stripe_classes
from transferkit.cli import app
from transferkit.evaluation.evaluate import evaluate_folder
from transferkit.evaluation.tta import (
    SHIFTS,
    TTAEngine,
    choose_transforms,
    transform_batch,
    tta_engine,
    tta_variants,
)
from transferkit.inference.engines import ForwardEngine, inference_engine
from transferkit.inference.predict import predict_folder

# Diagonal stripes, trained on unflipped views only (cache.views 1: the head stage's one
# cached view is the image itself; the recipe still flips, so "hflip" is tried), with
# "hflip" the only transform beside the image. Ten head epochs at a cosine-decayed rate
# (the head's BatchNorm statistics settle as the rate falls), no fine stage.
STRIPES = {**LEARNING, "data.val_split": 0.3, "cache.views": 1, "stages.0.epochs": 10, "stages.0.patience": 10,
           "stages.0.schedule": "cosine", "stages.1:.epochs": 0,
           "tta.transforms": ["identity", "hflip"], "augment.hflip": True}


class CountingEngine(ForwardEngine):
    name = "counting"

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def predict(self, batch):
        self.batches.append(len(batch))
        return self.inner.predict(batch)


def test_variants_follow_the_recipe():
    assert tta_variants({"augment": {"hflip": True}}) == ("identity", "hflip", *SHIFTS)
    assert tta_variants({"augment": {"hflip": False}}) == ("identity", *SHIFTS)
    assert tta_variants({"augment": {"hflip": True}, "tta": {"transforms": ["identity"]}}) == ("identity",)
    batch = np.arange(2 * 20 * 20 * 3, dtype="uint8").reshape(2, 20, 20, 3)
    left = transform_batch(batch, "shift_left", 0.05)
    assert left.shape == batch.shape and (left[:, :, :-1] == batch[:, :, 1:]).all()
    assert (left[:, :, -1] == batch[:, :, -2]).all()  # the edge is reflected
    assert (transform_batch(batch, "hflip") == batch[:, :, ::-1]).all()


def test_identity_only_equals_plain_predict_and_variants_go_in_one_call(shapes_run, shapes_dir):
    plain = predict_folder(shapes_run, shapes_dir, engine="keras", top_k=3).rows
    counting = CountingEngine(inference_engine(shapes_run.model, "keras", shapes_run.image_size, input_dtype="uint8"))
    identity = evaluate_folder(shapes_run, shapes_dir, engine=TTAEngine(counting, ("identity",)), batch_size=8)
    for row, expected in zip(identity.rows, plain, strict=False):
        assert row.predicted == expected.label
        assert row.confidence == pytest.approx(expected.confidence, abs=1e-6)
    variants = ("identity", "hflip", *SHIFTS)
    counting.batches.clear()
    engine = TTAEngine(counting, variants, 0.05)
    evaluate_folder(shapes_run, shapes_dir, engine=engine, batch_size=8)
    assert counting.batches == [8 * 6, 8 * 6, 8 * 6, 6 * 6] and engine.calls == 4


@pytest.mark.parametrize("engine", ["keras", "openvino"])
def test_tta_runs_on_each_engine(shapes_run, shapes_dir, engine):
    pytest.importorskip("openvino") if engine == "openvino" else None
    forward = tta_engine(shapes_run, engine, precision="float32")
    assert forward.inner.name == engine
    result = evaluate_folder(shapes_run, shapes_dir, engine=forward)
    assert result.metrics["n_images"] == 30 and result.engine == engine
    assert np.allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    """(run, data folder, the warnings its finetune logged) of a run on "rising" and
    "falling" stripes: a horizontal flip turns one class into the other."""
    folder = tmp_path_factory.mktemp("stripes")
    data = write_stripe_classes(folder / "data", per_class=34)  # 20 validation images: enough to judge on
    collect = _Collect()
    logging.getLogger("transferkit").addHandler(collect)
    try:
        run = transferkit.finetune(data, None, STRIPES, output=folder / "run", verbose=0)
    finally:
        logging.getLogger("transferkit").removeHandler(collect)
    return run, data, collect.lines


def test_a_flip_that_changes_the_class_is_dropped_recorded_and_warned_about(stripes):
    run, _, warnings = stripes
    assert run.metrics["final"]["val_accuracy"] >= 0.75  # it learnt the stripes' direction
    record = json.loads((run.path / "metrics.json").read_text())["tta"]
    assert record == run.metrics["tta"]
    assert record["judged"] and record["kept"] == ["identity"] and record["log_loss"] == record["plain_log_loss"]
    [hflip] = record["transforms"]
    assert hflip["transform"] == "hflip" and not hflip["kept"]
    assert hflip["log_loss"] > hflip["compared_with"] == record["plain_log_loss"]
    flip = record["flip"]
    assert flip["changes_class"] and flip["flipped_accuracy"] <= flip["accuracy"] - 0.5
    assert flip["made_wrong"] - flip["made_right"] >= 10 and flip["n_images"] == record["n_images"] >= 20
    [warning] = [line for line in warnings if "flips seem to change the class" in line]
    assert "--set augment.hflip=false" in warning and "\n" not in warning


def test_predict_tta_on_a_run_that_kept_nothing_says_so_and_predicts_plainly(stripes, tmp_path):
    run, data, _ = stripes
    runner = CliRunner()
    outputs = {}
    for name, flags in (("plain", []), ("tta", ["--tta"])):
        result = runner.invoke(app, ["predict", str(run.path), str(data / "rising"), "-q", "--engine", "keras", "-o",
                                     str(tmp_path / f"{name}.csv"), *flags])
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
        with open(tmp_path / f"{name}.csv", newline="") as file:
            outputs[name + " rows"] = list(csv.DictReader(file))
    told = [line for line in outputs["tta"].splitlines() if "--tta" in line]
    assert len(told) == 1 and "predicts without test-time augmentation" in told[0]
    assert "--tta" not in outputs["plain"]
    assert len(outputs["tta rows"]) == 34 and outputs["tta rows"] == outputs["plain rows"]


def test_a_harmless_flip_is_kept_a_tie_included(stripes):
    run, _, _ = stripes
    # Mirror-symmetric images: the flip gives the very same image, so the same log loss.
    rng = np.random.default_rng(3)
    half = rng.integers(0, 256, (12, 32, 16, 3), dtype="uint8")
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)
    labels = np.arange(12) % 2
    choice = choose_transforms(run.model, images, labels, {**run.recipe, "tta": {"transforms": ["identity", "hflip",
                                                                                                "shift"]}})
    assert choice.kept[:2] == ("identity", "hflip")
    hflip, shift = choice.trials
    assert hflip.kept and hflip.log_loss == pytest.approx(choice.plain_log_loss, abs=1e-6)
    assert shift.compared_with == hflip.log_loss and shift.variants == SHIFTS
    assert choice.log_loss <= choice.plain_log_loss + 1e-6  # the kept set never scores worse than plain
    assert choice.flip is not None and not choice.flip.changes_class


def test_tta_averages_the_kept_variants_and_older_or_unjudged_runs_all_of_their_recipes(shapes_run, shapes_dir):
    # 6 validation images: too few to judge on, so --tta averages all of the recipe's variants.
    assert shapes_run.metrics["tta"] == {"judged": False, "n_images": 6}
    assert tta_engine(shapes_run, "keras").variants == ("identity", "hflip", *SHIFTS)
    older = dataclasses.replace(shapes_run, metrics={key: value for key, value in shapes_run.metrics.items()
                                                     if key != "tta"})
    assert tta_engine(older, "keras").variants == ("identity", "hflip", *SHIFTS)
    flip_only = dataclasses.replace(shapes_run, metrics={**shapes_run.metrics, "tta": {"judged": True, "kept": [
        "identity", "hflip"]}})
    result = evaluate_folder(flip_only, shapes_dir, tta=True, engine="keras")
    assert result.tta == ("identity", "hflip") and result.metrics["tta"] == ["identity", "hflip"]


def _brighter_side_model(size: int, margin: int = 0):
    """A Keras classifier of (size, size, 3) images, 0..255: class 1 the more the left half
    is brighter than the right, class 0 the reverse (a mirror image swaps them); the
    ``margin`` columns on either side of the middle do not count."""
    import keras

    weights = np.zeros((size, size, 3, 2), dtype="float32")
    weights[:, : size // 2 - margin, :, 1], weights[:, size // 2 + margin :, :, 1] = 1.0, -1.0
    weights[..., 0] = -weights[..., 1]
    inputs = keras.Input((size, size, 3))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights.reshape(-1, 2) / (size * size * 3 * 10), np.zeros(2, dtype="float32")])
    return model


def _sided_images(count: int, size: int, seed: int):
    """(images, labels): class 1's left half brighter than its right, class 0's the reverse,
    by a random amount per image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    images = rng.normal(120, 25, (count, size, size, 3))
    step = rng.uniform(5, 40, count)[:, None, None, None] * np.where(labels == 1, 1, -1)[:, None, None, None]
    images[:, :, : size // 2] += step / 2
    images[:, :, size // 2 :] -= step / 2
    return np.clip(images, 0, 255).astype("uint8"), labels


def test_a_clear_effect_ends_its_trial_on_the_first_round_and_an_unclear_one_goes_on_to_every_image():
    from transferkit.evaluation.tta import DECISIVE, JUDGE_ROUND, variant_probabilities
    from transferkit.training.flips import mean_log_loss

    size, count = 16, 300
    model = _brighter_side_model(size)
    images, labels = _sided_images(count, size, seed=5)
    recipe = {"augment": {"hflip": True}, "tta": {"transforms": ["identity", "hflip", "shift"]}}
    choice = choose_transforms(model, images, labels, recipe, batch_size=32, seed=1)
    # A mirror image swaps the classes, and a shift moves a column across the halves: both
    # clearly raise the loss on the first round (96 images), where the flip check warns too.
    hflip, shift = choice.trials
    assert hflip.n_images == shift.n_images == JUDGE_ROUND == 96 == choice.n_images == choice.flip.n_images
    assert not hflip.kept and hflip.log_loss > hflip.compared_with + 0.1 and choice.flip.changes_class
    assert not shift.kept and shift.log_loss > shift.compared_with and choice.kept == ("identity",)

    # Where the middle columns do not count, a shift changes little: the flip is dropped and
    # the flip check warns on the first round, while the shift goes on to later rounds.
    choice = choose_transforms(_brighter_side_model(size, margin=2), images, labels, recipe, batch_size=32, seed=1)
    hflip, shift = choice.trials
    assert hflip.n_images == 96 == choice.flip.n_images and choice.flip.changes_class and not hflip.kept
    assert shift.n_images > 96

    # Noise with random labels: a shift changes each loss a little either way, no clear effect
    # after any round, so it is judged on every image, by the rule on all of them.
    rng = np.random.default_rng(2)
    noise, random_labels = rng.integers(0, 256, (count, size, size, 3), dtype="uint8"), rng.integers(0, 2, count)
    choice = choose_transforms(model, noise, random_labels, {"tta": {"transforms": ["identity", "shift"]}}, seed=1)
    [shift] = choice.trials
    assert shift.n_images == count == choice.n_images and choice.flip is None
    every = dict(zip(("identity", *SHIFTS), variant_probabilities(model, noise, ("identity", *SHIFTS)), strict=True))
    plain = mean_log_loss(every["identity"], random_labels)
    shifted = mean_log_loss(np.mean(list(every.values()), axis=0), random_labels)
    assert shift.compared_with == pytest.approx(plain, abs=1e-9) == choice.plain_log_loss
    assert shift.log_loss == pytest.approx(shifted, abs=1e-9) and shift.kept == (shifted <= plain + 1e-6)
    assert choice.kept == (("identity", *SHIFTS) if shift.kept else ("identity",))
    # Unclear indeed: on the first round the mean change was within DECISIVE standard errors.
    first = np.random.default_rng(1).permutation(count)[:96]
    picked = {name: values[first, random_labels[first]] for name, values in every.items()}
    change = np.log(picked["identity"]) - np.log(np.mean(list(picked.values()), axis=0))
    assert abs(change.mean()) <= DECISIVE * change.std(ddof=1) / np.sqrt(96)


def test_with_hflip_auto_a_flip_that_changes_the_class_is_never_trained_on_nor_tried(tmp_path):
    """hflip = "auto" on the stripes, with a fine stage after the head: the head stage trains
    without flips, the decision finds that mirroring changes the class, the fine stage trains
    without flips too, and so the TTA choice tries no mirror image, nothing warns, and the
    model card says what was decided."""
    from transferkit.evaluation.tta import run_variants

    data = write_stripe_classes(tmp_path / "data", per_class=34)
    collect = _Collect()
    logging.getLogger("transferkit").addHandler(collect)
    try:
        run = transferkit.finetune(data, None, {**STRIPES, "augment.hflip": "auto", "stages.0.epochs": 5,
                                                "stages.1:.epochs": 1},
                                   output=tmp_path / "run", verbose=0)
    finally:
        logging.getLogger("transferkit").removeHandler(collect)
    decision = json.loads((run.path / "metrics.json").read_text())["hflip"]
    assert decision == run.metrics["hflip"]
    assert decision["kept"] is False and decision["judged_after"] == "head" and decision["check"]["changes_class"]
    tried = run.metrics["tta"]
    assert tried["judged"] and tried["transforms"] == [] and tried["flip"] is None
    assert run_variants(run) == ("identity",)
    assert not [line for line in collect.lines if "flip" in line]
    card = (run.path / "MODEL_CARD.md").read_text()
    assert "horizontal flip auto (off in stage 'head' and after it: mirrored validation images then scored " \
           "clearly worse" in card
    unjudged = dataclasses.replace(run, metrics={key: value for key, value in run.metrics.items() if key != "tta"})
    assert run_variants(unjudged) == ("identity",)  # the recipe as trained: no mirror image
