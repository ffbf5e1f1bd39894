"""augment.hflip = "auto": the first stage trains without flips, mirrored validation images
are judged a round at a time, and the later stages train with flips unless they change the
class (cached views, computed with flips, read mirrored images as the image itself where a
stage trains without them)."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from transferkit.backbones import get_spec, load_backbone
from transferkit.data.augment import augmenter_factory
from transferkit.data.batches import ImageBatches
from transferkit.model.classifier import build_classifier
from transferkit.outputs import encode_targets
from transferkit.recipe import AugmentConfig, CacheConfig, HeadConfig, StageConfig
from transferkit.training import flips
from transferkit.training.features import FeatureBatches, FeaturePass, FeaturePlan, compute_feature_stores
from transferkit.training.flips import JUDGE_ROUND, AutoFlips, judge_flips
from transferkit.training.stages import StageOptions, run_stages

# The suite's VGG-shaped backbone (tests/plugins): what is tested is the flips, not the network.
BACKBONE = "tinyvgg"
HEAD_AND_FINE = [StageConfig(name="head", epochs=3, unfreeze=0),
                 StageConfig(name="fine", epochs=2, unfreeze=1, learning_rate=1e-5)]
AUGMENT = AugmentConfig(hflip="auto")


# --- judging, on constructed probabilities ---------------------------------------------


def constructed(n, made_wrong_share, seed=0):
    """Two-class probabilities: every image right (0.9) as it is; mirrored, a share of
    them wrong (0.2) and the rest right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    plain = np.where(np.eye(2)[labels] == 1, 0.9, 0.1)
    wrong = rng.random(n) < made_wrong_share
    mirrored = np.where(wrong[:, None], np.where(np.eye(2)[labels] == 1, 0.2, 0.8), plain)
    calls = []

    def probabilities(rows):
        calls.append(len(rows))
        return plain[rows], mirrored[rows]

    return probabilities, labels, calls


def test_flips_that_change_the_class_are_judged_on_the_first_round():
    probabilities, labels, calls = constructed(400, 0.6)
    check = judge_flips(probabilities, labels)
    assert calls == [JUDGE_ROUND]
    assert check.changes_class and check.n_images == JUDGE_ROUND
    assert check.made_right == 0 and check.made_wrong > 0.4 * JUDGE_ROUND


def test_flips_that_keep_the_class_are_judged_on_the_first_round_too():
    probabilities, labels, calls = constructed(400, 0.0)
    check = judge_flips(probabilities, labels)
    assert calls == [JUDGE_ROUND]
    assert not check.changes_class and check.clearly_keeps_class()


def test_an_unclear_effect_is_judged_on_more_images():
    """About the rule's own line (a 5% drop): no round makes it clear, every image is judged
    (at most MAX_JUDGED_IMAGES)."""
    probabilities, labels, calls = constructed(300, 0.05, seed=3)
    check = judge_flips(probabilities, labels)
    assert len(calls) > 1 and sum(calls) == check.n_images
    assert check.n_images == 300


def test_too_few_validation_images_are_not_judged():
    probabilities, labels, calls = constructed(19, 1.0)
    assert judge_flips(probabilities, labels) is None
    assert calls == []


# --- the feature cache: which views are mirrored, read without them ---------------------


def pictures(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype="uint8")


def test_a_feature_pass_notes_which_stored_views_are_mirrored():
    """With flips as the only augmentation and the images themselves as features, view v of
    an image is its mirror image exactly where the store says so."""
    images = pictures(40)
    stores = compute_feature_stores(lambda batch: [batch.astype("float32")], images, [(8, 8, 3)], FeaturePass(
        views=[3], augmenter_factory=augmenter_factory(AugmentConfig(shift=0, contrast=0, rotation=0, hflip=True)),
        batch_size=16))
    store = stores[0]
    assert store.flipped.shape == (3, 40) and not store.flipped[0].any()
    assert 0 < store.flipped[1:].mean() < 1
    for view in (1, 2):
        for index in range(40):
            expected = images[index][:, ::-1] if store.flipped[view, index] else images[index]
            np.testing.assert_array_equal(store.array[view, index], expected)


def test_a_pass_without_flips_notes_none():
    stores = compute_feature_stores(lambda batch: [batch.astype("float32")], pictures(8), [(8, 8, 3)], FeaturePass(
        views=[2], augmenter_factory=augmenter_factory(AugmentConfig(hflip=False)), batch_size=8))
    assert stores[0].flipped is None


def test_unflipped_feature_batches_read_a_views_mirrored_images_as_the_images_themselves():
    images = pictures(40)
    stores = compute_feature_stores(lambda batch: [batch.astype("float32")], images, [(8, 8, 3)], FeaturePass(
        views=[2], augmenter_factory=augmenter_factory(AugmentConfig(hflip="auto")), batch_size=16))
    store = stores[0]
    targets = encode_targets(np.arange(40) % 2, 2)
    batches = FeatureBatches(store, targets, 40, shuffle=False, unflipped=True)
    plain = FeatureBatches(store, targets, 40, shuffle=False)
    batches.set_epoch(1)
    plain.set_epoch(1)
    read, as_stored = batches[0][0], plain[0][0]
    mirrored = store.flipped[1]
    assert 0 < mirrored.sum() < 40
    np.testing.assert_array_equal(read[mirrored], images[mirrored].astype("float32"))
    np.testing.assert_array_equal(read[~mirrored], as_stored[~mirrored])
    assert not np.array_equal(as_stored[~mirrored], images[~mirrored].astype("float32"))  # augmented still
    np.testing.assert_array_equal(np.concatenate(list(batches.in_order())), read)


# --- in training ------------------------------------------------------------------------


def bars(n, sides, seed):
    """32 px images of one bright bar on noise: "left" / "right" put it near that edge (a
    mirrored left image is a right one), "vertical" / "horizontal" orient it (mirroring
    keeps the class)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 32, 32, 3)).astype("uint8")
    for image, label in zip(images, labels):
        kind, at = sides[label], int(rng.integers(1, 8))
        if kind == "left":
            image[:, at : at + 8] = 230
        elif kind == "right":
            image[:, 32 - at - 8 : 32 - at] = 230
        else:
            place = int(rng.integers(2, 24))
            if kind == "vertical":
                image[:, place : place + 6] = 230
            else:
                image[place : place + 6, :] = 230
    return images, encode_targets(labels, 2)


def train_auto(sides, cache=True, checkpointing=None, seed=2, stages=HEAD_AND_FINE):
    keras.utils.set_random_seed(seed)
    backbone = load_backbone(BACKBONE, weights="none", input_shape=(32, 32, 3))
    model = build_classifier(backbone, 2, HeadConfig(units=(16,)), backbone_name=BACKBONE)
    train = ImageBatches(*bars(96, sides, seed + 100), 16, shuffle=True, seed=1,
                         augmenter_factory=augmenter_factory(AUGMENT))
    val = ImageBatches(*bars(48, sides, seed + 200), 16)
    options = StageOptions(verbose=1, seed=1, cache=CacheConfig(enabled=cache),
                           auto_flips=flips.auto_flips(AUGMENT))
    return run_stages(model, get_spec(BACKBONE), stages, train, val, 2, options, checkpointing)


@pytest.fixture
def stage_inputs(monkeypatch):
    """What each cached stage read its training views as (the real method, watched)."""
    seen = {}
    real = FeaturePlan.stage_inputs

    def watched(self, index):
        inputs = real(self, index)
        if inputs is not None:
            seen[index] = inputs.train.unflipped
        return inputs

    monkeypatch.setattr(FeaturePlan, "stage_inputs", watched)
    return seen


def test_where_mirrored_images_are_another_class_no_stage_trains_with_flips(stage_inputs, caplog, tmp_path):
    from transferkit.training.checkpoint import WorkFolder
    from transferkit.training.stages import Checkpointing

    work = WorkFolder(tmp_path / "run.partial")
    work.path.mkdir()
    with caplog.at_level(logging.INFO, logger="transferkit"):
        result = train_auto(("left", "right"), checkpointing=Checkpointing(work=work))
    work.flush()
    assert work.state().hflip == result.hflip  # kept in the checkpoints after the decision
    record = result.records()["hflip"]
    assert record["kept"] is False and record["judged_after"] == "head" and record["stage_index"] == 0
    assert record["check"]["changes_class"] and record["check"]["flipped_accuracy"] < record["check"]["accuracy"]
    assert 0 < record["seconds"] < 60
    assert stage_inputs == {0: True, 1: True}
    assert any("seem to change the class" in entry.getMessage() and "'fine' train without them too"
               in entry.getMessage() for entry in caplog.records)


def test_where_mirroring_keeps_the_class_the_later_stages_flip(stage_inputs):
    result = train_auto(("vertical", "horizontal"))
    record = result.records()["hflip"]
    assert record["kept"] is True and not record["check"]["changes_class"]
    assert stage_inputs == {0: True, 1: False}


def test_without_the_cache_the_stages_without_flips_get_batches_augmented_without_them(monkeypatch):
    factories = []
    real = ImageBatches.with_augmenter

    def watched(self, factory):
        factories.append(factory)
        return real(self, factory)

    monkeypatch.setattr(ImageBatches, "with_augmenter", watched)
    short = [stage.model_copy(update={"epochs": epochs}) for stage, epochs in zip(HEAD_AND_FINE, (2, 1))]
    result = train_auto(("left", "right"), cache=False, stages=short)
    assert result.hflip["kept"] is False and result.hflip["check"]["changes_class"]
    assert len(factories) == 2  # the head stage, then the fine stage
    names = [type(transform).__name__ for transform in factories[0]().transforms]
    assert "HorizontalFlip" not in names and "Affine" in names


@pytest.mark.parametrize("kept", [False, True])
def test_a_run_resumed_after_the_decision_trains_as_it_decided(kept, stage_inputs, caplog):
    """The decision is in the checkpoint's state: a run resumed at the fine stage does not
    judge again and reads its views as the uninterrupted run did."""
    from transferkit.training.checkpoint import TrainingState
    from transferkit.training.stages import Checkpointing

    check = (flips.FlipCheck(48, 1.0, 1.0, 0.1, 0.1, 0, 0) if kept else flips.FlipCheck(48, 1.0, 0.0, 0.1, 2.0, 48, 0))
    record = flips.flip_record(check, "head", 0)
    state = TrainingState(stage_index=1, epochs_done=0, global_epoch=3, calibrated=True,
                          history=[{"epoch": e, "stage": "head"} for e in (1, 2, 3)], hflip=record)
    with caplog.at_level(logging.INFO, logger="transferkit"):
        result = train_auto(("vertical", "horizontal"), checkpointing=Checkpointing(state=state))
    assert result.hflip == record
    assert stage_inputs == {1: not kept}
    assert not [entry for entry in caplog.records if "hflip = \"auto\"" in entry.getMessage()]


def test_with_no_later_stage_nothing_is_judged_and_the_stage_trains_without_flips(stage_inputs):
    from transferkit.training.flips import describe_decision

    keras.utils.set_random_seed(0)
    backbone = load_backbone(BACKBONE, weights="none", input_shape=(32, 32, 3))
    model = build_classifier(backbone, 2, HeadConfig(units=(8,)), backbone_name=BACKBONE)
    train = ImageBatches(*bars(32, ("left", "right"), 1), 16, shuffle=True,
                         augmenter_factory=augmenter_factory(AUGMENT))
    val = ImageBatches(*bars(24, ("left", "right"), 2), 8)
    result = run_stages(model, get_spec(BACKBONE), HEAD_AND_FINE[:1], train, val, 2,
                        StageOptions(verbose=0, cache=CacheConfig(), auto_flips=flips.auto_flips(AUGMENT)))
    assert result.hflip is None and "hflip" not in result.records()
    assert stage_inputs == {0: True}
    line = describe_decision(flips.flip_record(None, "head", 0), ["head", "fine"])
    assert "fewer than 20" in line and "'fine' train with them" in line


def test_the_tta_choice_reads_the_recipe_as_trained():
    from transferkit.recipe import load_recipe

    recipe = load_recipe("quickstart")
    assert recipe.augment.hflip == "auto"
    dropped = flips.flip_record(flips.FlipCheck(48, 1.0, 0.0, 0.1, 2.0, 48, 0), "head", 0)
    kept = flips.flip_record(flips.FlipCheck(48, 1.0, 1.0, 0.1, 0.1, 0, 0), "head", 0)
    assert flips.as_trained(recipe, dropped).augment.hflip is False
    assert flips.as_trained(recipe, None).augment.hflip is False  # no later stage flipped
    assert flips.as_trained(recipe, kept) is recipe
    always = load_recipe("quickstart", {"augment.hflip": True})
    assert flips.as_trained(always, None) is always
    assert isinstance(flips.auto_flips(recipe.augment), AutoFlips)
    assert flips.auto_flips(AugmentConfig(hflip=True)) is None
    assert flips.auto_flips(AugmentConfig(hflip="auto", shift=0, contrast=0, rotation=0)).without is None
    stages = [StageConfig(epochs=0), StageConfig(epochs=2, unfreeze=1), StageConfig(epochs=2, unfreeze=2)]
    assert flips.flip_free_stages(stages, None) == {1}
    assert flips.flip_free_stages(stages, {**dropped, "stage_index": 1}) == {1, 2}
    assert flips.flip_free_stages(stages, {**kept, "stage_index": 1}) == {1}
