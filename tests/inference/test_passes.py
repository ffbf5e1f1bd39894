"""The work after training on one engine (``inference.passes.ForwardPasses``): the TTA choice
and the rejection fit share it, the validation images' plain pass runs once, the results
agree with each step computing its own on Keras, small splits stay on Keras, and the run's
first predict finds the converted networks in its engine cache."""

import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import transferkit
from tests.conftest import TINY
from transferkit.data.synthetic import write_shapes_dataset
from transferkit.evaluation.tta import fit_tta, judged_passes, judged_variants
from transferkit.inference.embedding import EmbeddingEngine, KerasEmbedding
from transferkit.inference.openvino import claim_engine_cache, engine_cache_dir
from transferkit.inference.passes import ENGINE_FROM
from transferkit.inference.predict import engine_for
from transferkit.inference.uncertainty import load_rejection
from transferkit.recipe import load_recipe
from transferkit.trust.record import STORED_REFERENCE, after_training_forward, fit_trust
from transferkit.trust.rejection import image_passes


def split_of(count_val: int, count_train: int, seed: int = 0):
    """Validation and training images as ``PreparedData`` holds them (uint8, 32 px), with labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count_val + count_train, 32, 32, 3), dtype=np.uint8)
    return SimpleNamespace(val_images=images[:count_val], val_labels=rng.integers(0, 3, count_val),
                           train_images=images[count_val:], train_labels=rng.integers(0, 3, count_train))


def test_one_engine_serves_the_tta_choice_and_the_rejection_fit_and_agrees_with_keras(shapes_run, tmp_path):
    pytest.importorskip("openvino")
    recipe = load_recipe(None, {**TINY, "augment.hflip": True, "engine": "openvino", "precision": "float32"})
    prepared = split_of(48, 30)
    passes = judged_passes(prepared, recipe) + image_passes(prepared, recipe.reject)
    assert passes == 48 * 5 + 48 + 30 >= ENGINE_FROM  # hflip and four shifts beside the plain pass
    forward = after_training_forward(shapes_run.model, prepared, recipe, run_path=tmp_path / "run")
    shared_tta = fit_tta(shapes_run.model, prepared, recipe, forward=forward)
    shared_trust = fit_trust(shapes_run.model, prepared, recipe, forward=forward)
    assert isinstance(forward.engine, EmbeddingEngine) and forward.engine_name == "openvino"
    assert forward.builds == 1 and forward.validation_passes == 1
    # The networks went to the engine cache of the run folder (not yet written: being written).
    assert (engine_cache_dir(tmp_path / "run") / "openvino-32px" / "body.xml").is_file()

    # Each step on its own: TTA calls the Keras model on every variant; the rejection fit
    # builds its own engine (Keras here).
    keras_recipe = recipe.model_copy(update={"engine": "keras"})
    alone_tta = fit_tta(shapes_run.model, prepared, keras_recipe)
    alone_trust = fit_trust(shapes_run.model, prepared, keras_recipe)
    assert shared_tta["kept"] == alone_tta["kept"] and shared_tta["n_images"] == 48
    assert shared_tta["plain_log_loss"] == pytest.approx(alone_tta["plain_log_loss"], abs=1e-5)
    for shared, alone in zip(shared_tta["transforms"], alone_tta["transforms"], strict=True):
        assert shared["kept"] == alone["kept"] and shared["log_loss"] == pytest.approx(alone["log_loss"], abs=1e-5)
    assert shared_tta["flip"]["made_wrong"] == alone_tta["flip"]["made_wrong"]
    shared_fit, alone_fit = shared_trust.rejection, alone_trust.rejection
    assert shared_fit.record["threshold"] == pytest.approx(alone_fit.record["threshold"], abs=1e-4)
    assert shared_fit.record["validation_coverage"] == alone_fit.record["validation_coverage"]
    np.testing.assert_allclose(shared_fit.val_probabilities, alone_fit.val_probabilities, atol=1e-5)
    np.testing.assert_allclose(shared_fit.reference, alone_fit.reference, atol=2e-3)  # stored as float16
    assert shared_trust.prediction_sets["scores"] == pytest.approx(alone_trust.prediction_sets["scores"], abs=1e-5)


def test_a_small_split_stays_on_keras_called_eagerly_and_caches_nothing(shapes_run, tmp_path):
    recipe = load_recipe(None, dict(TINY))
    prepared = split_of(24, 24)  # 24 x 5 + 24 + 24 = 168 image passes
    forward = after_training_forward(shapes_run.model, prepared, recipe, run_path=tmp_path / "run")
    calls = []
    predict = forward.engine.predict
    forward.engine.predict = lambda batch: calls.append(len(batch)) or predict(batch)
    choice = fit_tta(shapes_run.model, prepared, recipe, forward=forward)
    fit_trust(shapes_run.model, prepared, recipe, forward=forward)
    assert choice["judged"] and isinstance(forward.engine, KerasEmbedding) and forward.image_passes < ENGINE_FROM
    assert forward.builds == 1 and forward.validation_passes == 1
    # Called eagerly, it traces nothing: no padding, and each pass in one call, not one per
    # batch of 8 (each call costs a walk over the layers in Python).
    variants = len(judged_variants(recipe.model_dump(mode="json"))) - 1  # the plain pass is the shared one
    assert recipe.batch_size == 8 and variants == 5 and sorted(calls) == [24, 24, 24 * variants]
    assert not engine_cache_dir(tmp_path / "run").exists()
    alone = fit_tta(shapes_run.model, prepared, recipe)  # the Keras model on every variant, identity included
    assert choice["kept"] == alone["kept"]
    assert choice["log_loss"] == pytest.approx(alone["log_loss"], abs=1e-5)


def test_the_last_cached_stages_readout_stands_for_the_validation_pass_only_where_both_are_float32(shapes_run):
    from transferkit.model.surgery import readout_at
    from transferkit.training.stages import ValidationReadout
    from transferkit.trust.record import known_validation

    recipe = load_recipe(None, {**TINY, "precision": "float32"})
    prepared = split_of(24, 24)
    readout = ValidationReadout(*readout_at(shapes_run.model).predict(prepared.val_images, verbose=0))
    known = after_training_forward(shapes_run.model, prepared, recipe, readout=readout)
    plain = after_training_forward(shapes_run.model, prepared, recipe)
    np.testing.assert_allclose(known.validation_outputs(), plain.validation_outputs(), rtol=1e-5, atol=1e-5)
    assert known.validation_passes == 0 and plain.validation_passes == 1
    assert known.image_passes == plain.image_passes - 24
    known_tta, plain_tta = (fit_tta(shapes_run.model, prepared, recipe, forward=forward) for forward in (known, plain))
    assert known_tta["kept"] == plain_tta["kept"]
    assert known_tta["plain_log_loss"] == pytest.approx(plain_tta["plain_log_loss"], abs=1e-5)
    # An engine in 16 bits: the pass runs, so that every variant the TTA choice compares with
    # "identity" comes from one engine.
    bfloat16 = recipe.model_copy(update={"precision": "bfloat16"})
    assert known_validation(shapes_run.model, bfloat16, readout) is None
    assert known_validation(shapes_run.model, recipe, None) is None


def test_finetune_leaves_its_networks_for_the_first_predict_reject(tmp_path, caplog, monkeypatch):
    pytest.importorskip("openvino")
    from transferkit.evaluation import calibration

    calibration_passes = []
    logits_of = calibration.logits_of
    monkeypatch.setattr(calibration, "logits_of", lambda *args, **kwargs: calibration_passes.append(1) or logits_of(
        *args, **kwargs))
    data = write_shapes_dataset(tmp_path / "data", 3, 60, size=40, seed=4)
    # 54 validation images: 54 x 5 variants + 54 + 126 training images = 450 image passes; in
    # float32 (TINY's precision) the last stage's readout of its cached features stands for the
    # 54 plain ones, and its stored training features for the 126 knn reference images.
    with caplog.at_level(logging.DEBUG, logger="transferkit"):
        run = transferkit.finetune(data, None, {**TINY, "data.val_split": 0.3, "engine": "openvino"},
                                   output=tmp_path / "run", verbose=0)
    assert "the work after training: 270 image passes on <EmbeddingEngine" in caplog.text
    assert run.rejection["reference_passes"] == STORED_REFERENCE and run.rejection["n_reference"] == 126
    assert calibration_passes == []  # its logits too came from the last stage's readout
    caplog.clear()
    assert run.metrics["tta"]["judged"] and run.rejection["n_validation"] == 54
    cache = engine_cache_dir(run.path)
    assert (cache / "openvino-32px" / "body.xml").is_file() and (cache / "compiled").is_dir()
    with caplog.at_level(logging.DEBUG, logger="transferkit"):
        engine_for(transferkit.load_run(run.path), "openvino", "auto", load_rejection(run))
    assert sum("reusing the OpenVINO network" in record.getMessage() for record in caplog.records) == 2  # body, head


def test_an_uncached_run_reads_its_validation_images_once_for_metrics_calibration_and_trust(
        shapes_dir, tmp_path, caplog, monkeypatch):
    from transferkit.evaluation import calibration

    calibration_passes = []
    logits_of = calibration.logits_of
    monkeypatch.setattr(calibration, "logits_of", lambda *args, **kwargs: calibration_passes.append(1) or logits_of(
        *args, **kwargs))
    with caplog.at_level(logging.DEBUG, logger="transferkit"):
        run = transferkit.finetune(shapes_dir, None, {**TINY, "cache.enabled": False, "stages.1:.epochs": 0},
                                   output=tmp_path / "run", verbose=0)
    assert all(not stage["cached"] for stage in run.metrics["stages"])
    # 6 validation images (too few to judge TTA on) + 24 training ones for the knn reference;
    # in float32 (TINY's precision) the one readout of the model over the validation images
    # stands for their pass.
    assert "the work after training: 24 image passes" in caplog.text
    assert calibration_passes == [] and run.metrics["calibration"]["n_images"] == 6


def test_the_engine_cache_of_a_run_being_written_is_kept_until_neither_it_nor_its_work_folder_exists(tmp_path):
    writing = tmp_path / "writing"
    ours = claim_engine_cache(writing)
    (tmp_path / "writing.partial").mkdir()
    claim_engine_cache(tmp_path / "other")  # another run's predict cleans up
    assert ours.is_dir()
    shutil.rmtree(tmp_path / "writing.partial")  # the run failed before it was published
    claim_engine_cache(tmp_path / "other")
    assert not ours.exists()
