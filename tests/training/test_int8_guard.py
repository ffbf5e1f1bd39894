"""The head-loss guard of int8 features: after the first stage trained on them, its head's
validation loss on int8 features is compared with float32's, recorded, and where int8 falls
short the later stages' features are computed in float32, with a one-line notice."""

from __future__ import annotations

import importlib.util
import logging

import keras
import numpy as np
import pytest

from transferkit.backbones import REGISTRY, load_backbone
from transferkit.data.batches import ImageBatches
from transferkit.data.synthetic import SHAPES, draw_shape
from transferkit.model.classifier import build_classifier
from transferkit.outputs import encode_targets
from transferkit.recipe import CacheConfig, HeadConfig, StageConfig
from transferkit.training import int8_guard
from transferkit.training.features import engine_forward
from transferkit.training.stages import StageOptions, run_stages

pytest.importorskip("openvino")
# Looked up, not imported: NNCF imported whole brings PyTorch into the worker, which transferkit keeps
# out (inference/openvino.py imports NNCF without its PyTorch parts).
if importlib.util.find_spec("nncf") is None:
    pytest.skip("the openvino extra (NNCF) is not installed", allow_module_level=True)

HEAD_AND_FINE = [StageConfig(name="head", epochs=2, unfreeze=0),
                 StageConfig(name="fine", epochs=1, unfreeze=1, learning_rate=1e-5)]


def shapes(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    pictures = np.stack([np.asarray(draw_shape(SHAPES[label], 32, rng)) for label in labels])
    return pictures.astype("uint8"), encode_targets(labels, 3)


def classifier(seed=2):
    keras.utils.set_random_seed(seed)
    backbone = load_backbone("vgg16", weights="none", input_shape=(32, 32, 3))
    return build_classifier(backbone, 3, HeadConfig(units=(16,)), backbone_name="vgg16")


def train_on_int8(stages=HEAD_AND_FINE, model=None, seed=2, checkpointing=None):
    """VGG16 (random weights, 32 px; default a new one) trained on features from
    ``--precision int8``; returns the result and the precision of each engine the feature
    cache ran."""
    model = model or classifier(seed)
    train = ImageBatches(*shapes(48, seed + 100), 8, shuffle=True, seed=1)
    val = ImageBatches(*shapes(24, seed + 200), 8)
    factory, engines = engine_forward("openvino", "int8"), []

    def recorded(extractor, work):
        engine = factory(extractor, work)
        engines.append(engine.precision_hint)
        return engine

    options = StageOptions(verbose=0, seed=1, cache=CacheConfig(), forward_factory=recorded)
    return run_stages(model, REGISTRY["vgg16"], stages, train, val, 3, options, checkpointing), engines


def test_a_head_trained_on_int8_features_is_compared_with_float32_recorded_and_kept(caplog):
    from transferkit.model.surgery import readout_at

    model = classifier()
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result, engines = train_on_int8(model=model)
    assert engines == ["int8"]  # one pass served both stages, its features kept for the fine stage
    check = result.int8_guard
    assert check.passed and check.stage == "head" and check.images == 24
    assert abs(check.int8_loss - check.float32_loss) <= check.tolerance == int8_guard.tolerance(check.float32_loss)
    assert check.int8_loss != check.float32_loss  # two precisions' features, not one twice
    assert "feature error" in check.feature_check
    recorded = result.records()["int8_features"]
    assert recorded["passed"] and recorded["float32_loss"] == check.float32_loss
    assert not [record for record in caplog.records if "head's validation loss" in record.getMessage()]
    # The validation features are float32's, though int8 computed the training ones: the
    # fine stage's readout of them is the saved (float32) model's own, which calibration, the
    # TTA choice and the rejection fit then read instead of a pass of their own.
    val = ImageBatches(*shapes(24, 2 + 200), 8)
    for got, exact in zip((result.validation.outputs, result.validation.dense_inputs, result.validation.embeddings),
                          readout_at(model).predict(val, verbose=0)):
        np.testing.assert_allclose(got, exact, rtol=1e-3, atol=1e-4)


def test_int8_that_falls_short_on_the_heads_loss_leaves_the_later_stages_to_float32(monkeypatch, caplog):
    """A tolerance of 0 fails any difference: the later stage's features come from a float32
    engine, and the run's validation outputs with them."""
    monkeypatch.setattr(int8_guard, "LOSS_TOLERANCE", 0.0)
    monkeypatch.setattr(int8_guard, "RELATIVE_TOLERANCE", 0.0)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result, engines = train_on_int8()
    assert engines == ["int8", "f32"]
    notice = [record.getMessage() for record in caplog.records if "head's validation loss" in record.getMessage()]
    assert len(notice) == 1 and "\n" not in notice[0]
    assert "on 24 images" in notice[0] and notice[0].endswith("the later stages' features are computed in float32")
    assert not result.int8_guard.passed and result.records()["int8_features"]["passed"] is False
    fine = result.timings[1]
    assert fine.cached and fine.caching_seconds > 0  # computed again for the fine stage
    assert result.validation is not None  # the fine stage's, on float32 features


def test_a_cached_int8_network_is_guarded_again_in_each_run(monkeypatch, caplog):
    """The second run on the same frozen weights takes the int8 network and its feature check
    from the engine cache; the head-loss guard still runs on its own head. Falling short in
    the last stage leaves the validation figures to the model (float32)."""
    model = classifier()
    first, _ = train_on_int8(stages=HEAD_AND_FINE[:1], model=model)
    assert first.int8_guard.passed and first.val_outputs is not None
    monkeypatch.setattr(int8_guard, "LOSS_TOLERANCE", 0.0)
    monkeypatch.setattr(int8_guard, "RELATIVE_TOLERANCE", 0.0)
    caplog.clear()  # the first run's records, where an earlier test left the logger at INFO
    with caplog.at_level(logging.INFO, logger="transferkit"):
        result, engines = train_on_int8(stages=HEAD_AND_FINE[:1], model=model)  # its head trains on
    assert not any("quantizing" in record.getMessage() for record in caplog.records)  # from the cache
    assert engines == ["int8"] and result.int8_guard.feature_check == first.int8_guard.feature_check
    assert not result.int8_guard.passed and result.val_outputs is None  # summary predicts with the model
    notice = [record.getMessage() for record in caplog.records if "head's validation loss" in record.getMessage()]
    assert len(notice) == 1 and notice[0].endswith("the validation figures are computed in float32")


@pytest.mark.parametrize("passed", [False, True])
def test_a_run_resumed_after_the_guard_computes_its_later_stages_as_the_guard_decided(passed, caplog):
    """The guard's record is in every checkpoint's state after it ran: a run resumed at the
    fine stage neither guards again nor tries int8 where the guard had turned it off, and
    keeps int8 where it had passed (as the uninterrupted run did)."""
    from transferkit.training.checkpoint import TrainingState
    from transferkit.training.stages import Checkpointing

    record = int8_guard.HeadLossCheck("head", 24, 0.9, 0.9 if passed else 1.2, 0.02, "feature error 0.03").record()
    state = TrainingState(stage_index=1, epochs_done=0, global_epoch=2, calibrated=True,
                          history=[{"epoch": 1}, {"epoch": 2}], int8_guard=record)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result, engines = train_on_int8(checkpointing=Checkpointing(state=state))
    assert engines == (["int8"] if passed else ["f32"])
    assert result.int8_guard.record() == record  # not guarded again
    assert not [entry for entry in caplog.records if "head's validation loss" in entry.getMessage()]


def keras_above(model, first_open, features):
    """The Keras layers above a block boundary (the backbone's open blocks, the head) on the
    boundary's features: (n, units + d), the outputs then the mean-pooled feature maps."""
    from transferkit.model.surgery import trainable_at

    maps = trainable_at(model, REGISTRY["vgg16"], first_open)[0].get_layer("open_part")(features, training=False)
    outputs = model.get_layer("head")(maps, training=False)
    embeddings = keras.ops.mean(maps, axis=(1, 2))
    return np.concatenate([keras.ops.convert_to_numpy(outputs), keras.ops.convert_to_numpy(embeddings)], axis=1)


def test_the_tta_choice_and_the_knn_reference_go_through_the_int8_frozen_part_while_validation_stays_float32(
        tmp_path, monkeypatch, caplog):
    """Where the last stage trained on int8 features, the TTA choice's variants (and its
    "identity") and the knn score's reference images go through that int8 network and the
    layers above it in float32: no float32 pass of the whole network for them. The validation
    images that set the rejection threshold are the float32 readout's, as predict embeds.
    Those approximate passes are checked against float32 on first use; where they fall short,
    their work runs in float32, with a one-line notice."""
    from types import SimpleNamespace

    from transferkit.evaluation.tta import fit_tta
    from transferkit.inference import passes
    from transferkit.inference.embedding import KerasEmbedding
    from transferkit.inference.uncertainty import unit_rows
    from transferkit.recipe import load_recipe
    from transferkit.trust.record import INT8_REFERENCE, STORED_REFERENCE, after_training_forward, fit_trust

    model = classifier()
    result, _ = train_on_int8(model=model)
    frozen = result.int8_frozen
    assert frozen is not None and frozen.first_open == len(REGISTRY["vgg16"].blocks) - 1  # the fine stage's
    val_images, val_targets = shapes(24, 2 + 200)
    train_images, train_targets = shapes(48, 2 + 100)
    prepared = SimpleNamespace(val_images=val_images, val_labels=val_targets.argmax(axis=1),
                               train_images=train_images, train_labels=train_targets.argmax(axis=1))
    recipe = load_recipe(None, {"weights": "none", "image_size": 32, "precision": "int8", "engine": "openvino",
                                "augment.hflip": True})
    # How far int8's rounding moves this random-weight network's probabilities depends on the
    # CPU's int8 kernels: the check passes here whatever it measures (its failing is below).
    monkeypatch.setattr(passes, "APPROXIMATE_TOLERANCE", 1.0)
    forward = after_training_forward(model, prepared, recipe, tmp_path / "run", result.validation, frozen)
    assert forward.approximate is not forward
    choice = fit_tta(model, prepared, recipe, forward=forward)
    assert choice["judged"] and choice["n_images"] == 24 and "hflip" in {t["transform"] for t in choice["transforms"]}
    record = fit_trust(model, prepared, recipe, forward=forward)
    # One engine, the int8 one, took every pass; the validation images' float32 outputs came
    # from the readout.
    assert forward.approximate.builds == 1 and forward.builds == 0 and forward.validation_passes == 0
    # Its outputs are the int8 network's features (the ones the last stage trained on) through
    # the layers above them, in float32.
    exact = KerasEmbedding(model).predict(val_images)
    through_int8 = forward.approximate.validation_outputs()
    assert through_int8.shape == exact.shape and not np.array_equal(through_int8, exact)
    np.testing.assert_allclose(through_int8, keras_above(model, frozen.first_open, frozen.features(val_images)),
                               atol=2e-4)
    # The check compared them with the readout's float32 outputs, on the 24 validation images.
    check = forward.approximate_check
    assert check["passed"] and check["images"] == 24 and record.rejection.record["approximate_check"] == check
    assert check["difference"] == pytest.approx(np.abs(through_int8[:, :3] - exact[:, :3]).mean(), rel=1e-4)
    # The reference embeddings: the training images' through int8.
    reference = record.rejection.reference
    exact_reference = unit_rows(KerasEmbedding(model).predict(train_images)[:, 3:])
    assert reference.shape == exact_reference.shape and not np.allclose(reference, exact_reference, atol=1e-3)
    int8_reference = unit_rows(keras_above(model, frozen.first_open, frozen.features(train_images))[:, 3:])
    np.testing.assert_allclose(reference, int8_reference, atol=2e-3)  # float16 storage
    # The validation scores are the float32 passes': the same as where no stage ran on int8.
    plain = after_training_forward(model, prepared, recipe, tmp_path / "run", result.validation)
    assert plain.approximate is plain and plain.approximate_check is None
    assert np.allclose(forward.validation_outputs(), plain.validation_outputs())
    float32_fit = fit_trust(model, prepared, recipe, forward=plain).rejection
    assert np.allclose(float32_fit.reference, exact_reference, atol=2e-3)  # float16 storage
    assert record.rejection.record["n_reference"] == float32_fit.record["n_reference"] == 48
    assert record.rejection.record["reference_passes"] == INT8_REFERENCE
    assert "reference_passes" not in float32_fit.record and "approximate_check" not in float32_fit.record
    # With the last stage's stored training features (the int8 ones it trained on), the
    # reference images take only the layers above them: the same reference, and the
    # approximate passes are left the TTA choice's images.
    assert result.reference.int8 and result.reference.first_open == frozen.first_open
    stored = after_training_forward(model, prepared, recipe, tmp_path / "run", result.validation, frozen,
                                    result.reference)
    stored_fit = fit_trust(model, prepared, recipe, forward=stored).rejection
    assert stored.reference_from == "stored" and stored_fit.record["reference_passes"] == STORED_REFERENCE
    np.testing.assert_allclose(stored_fit.reference, int8_reference, atol=2e-3)
    assert stored.approximate.image_passes == forward.approximate.image_passes - 48

    # Any difference fails a tolerance of 0: the TTA choice and the reference run in float32.
    monkeypatch.setattr(passes, "APPROXIMATE_TOLERANCE", 0.0)
    failing = after_training_forward(model, prepared, recipe, tmp_path / "run", result.validation, frozen)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        assert failing.approximate is failing
    notice = [record.getMessage() for record in caplog.records if "int8 frozen part's class probabilities" in
              record.getMessage()]
    assert len(notice) == 1 and "\n" not in notice[0] and "on 24 validation images" in notice[0]
    assert notice[0].endswith("the TTA choice and the knn reference run in float32")
    assert failing.approximate_check == {**check, "tolerance": 0.0, "passed": False}
    fallback = fit_trust(model, prepared, recipe, forward=failing).rejection
    assert np.allclose(fallback.reference, exact_reference, atol=2e-3)
    assert "reference_passes" not in fallback.record and fallback.record["approximate_check"]["passed"] is False
    # The stored int8 features go through the same layers above: float32 takes their work too.
    failing = after_training_forward(model, prepared, recipe, tmp_path / "run", result.validation, frozen,
                                     result.reference)
    fallback = fit_trust(model, prepared, recipe, forward=failing).rejection
    assert failing.reference_from == "these" and "reference_passes" not in fallback.record
    assert np.allclose(fallback.reference, exact_reference, atol=2e-3)


def test_where_the_last_stage_trained_the_head_alone_the_approximate_passes_run_the_whole_backbone_in_int8(tmp_path):
    """A head-only recipe on int8 features: the frozen part is the whole backbone, so the
    approximate passes are that int8 network and the float32 head, with the embedding of
    its int8 feature maps."""
    from types import SimpleNamespace

    from transferkit.inference.embedding import KerasEmbedding
    from transferkit.recipe import load_recipe
    from transferkit.trust.record import after_training_forward

    model = classifier(seed=3)
    result, _ = train_on_int8(stages=HEAD_AND_FINE[:1], model=model, seed=3)
    frozen = result.int8_frozen
    assert frozen is not None and frozen.first_open == len(REGISTRY["vgg16"].blocks)
    val_images, val_targets = shapes(24, 3 + 200)
    train_images, train_targets = shapes(48, 3 + 100)
    prepared = SimpleNamespace(val_images=val_images, val_labels=val_targets.argmax(axis=1),
                               train_images=train_images, train_labels=train_targets.argmax(axis=1))
    recipe = load_recipe(None, {"weights": "none", "image_size": 32, "precision": "int8", "engine": "openvino"})
    forward = after_training_forward(model, prepared, recipe, tmp_path / "run", result.validation, frozen)
    assert forward.approximate is not forward
    through_int8 = forward.approximate.outputs(train_images)
    exact = KerasEmbedding(model).predict(train_images)
    assert through_int8.shape == exact.shape and not np.array_equal(through_int8, exact)
    assert np.abs(through_int8[:, :3] - exact[:, :3]).mean() < 0.03
    cosine = np.sum(through_int8[:, 3:] * exact[:, 3:], axis=1) / (
        np.linalg.norm(through_int8[:, 3:], axis=1) * np.linalg.norm(exact[:, 3:], axis=1))
    assert cosine.min() > 0.98, cosine.min()
