import numpy as np
import pytest

from tests.fresh_process import predict_without_transferkit
from transferkit.data.folders import index_folder
from transferkit.data.images import decode_images
from transferkit.evaluation.calibration import (
    apply_temperature,
    calibrate,
    fit_temperature,
    logits_of,
    output_layer,
    probabilities_from_logits,
)


def test_fit_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in probabilities_from_logits(logits)])
    assert fit_temperature(logits * 3, labels, 4) == pytest.approx(3.0, rel=0.1)
    z = rng.normal(0, 2, (4000, 1))
    binary = (rng.random(4000) < probabilities_from_logits(z)[:, 1]).astype(int)
    assert fit_temperature(z * 0.5, binary, 2) == pytest.approx(0.5, rel=0.1)


def test_overconfident_model_gets_lower_ece_same_top_class_and_loads_without_transferkit(
        shapes_run, shapes_dir, tmp_path):
    import keras

    index = index_folder(shapes_dir)
    images, _, _ = decode_images(list(index.paths), shapes_run.image_size)
    model = keras.models.clone_model(shapes_run.model)
    model.set_weights(shapes_run.model.get_weights())
    kernel, bias = output_layer(model).get_weights()
    output_layer(model).set_weights([kernel * 10, bias * 10])  # deliberately over-confident
    assert np.allclose(probabilities_from_logits(logits_of(model, images)), model.predict(images, verbose=0), atol=1e-5)
    before = model.predict(images, verbose=0)
    result = calibrate(model, images, index.labels, 3)
    after = model.predict(images, verbose=0)
    assert result.temperature > 1 and result.ece_after <= result.ece_before
    assert result.log_loss_after < result.log_loss_before
    assert (after.argmax(1) == before.argmax(1)).all()
    fresh = predict_without_transferkit(model, images, tmp_path)
    assert np.allclose(fresh, after, atol=1e-5)
    assert np.allclose(fresh, probabilities_from_logits(logits_of(model, images)), atol=1e-5)


def test_apply_temperature_rejects_non_positive(shapes_run):
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(shapes_run.model, 0.0)


def test_a_small_validation_split_is_run_eagerly_and_gives_what_the_traced_pass_gives(shapes_run, monkeypatch):
    import keras

    from transferkit.data.samples import generated_images
    from transferkit.evaluation.calibration import EAGER_UP_TO

    images = generated_images(EAGER_UP_TO + 6, shapes_run.image_size, np.random.default_rng(2))
    traced = []
    predict_on_batch = keras.Model.predict_on_batch
    monkeypatch.setattr(keras.Model, "predict_on_batch",
                        lambda self, x: traced.append(len(x)) or predict_on_batch(self, x))
    many = logits_of(shapes_run.model, images)
    assert sum(traced) == len(images)  # more than EAGER_UP_TO: through the traced function
    traced.clear()
    few = logits_of(shapes_run.model, images[:EAGER_UP_TO])
    assert traced == []  # called eagerly: nothing traced
    np.testing.assert_allclose(few, many[:EAGER_UP_TO], rtol=1e-5, atol=1e-5)
    assert few.dtype == np.float64 and few.shape == (EAGER_UP_TO, 3)


def test_dense_inputs_known_beforehand_give_the_temperature_a_pass_gives(shapes_run, shapes_dir):
    import keras

    from transferkit.model.surgery import readout_at

    index = index_folder(shapes_dir)
    images, _, _ = decode_images(list(index.paths), shapes_run.image_size)
    copies = []
    for _ in range(2):
        model = keras.models.clone_model(shapes_run.model)
        model.set_weights(shapes_run.model.get_weights())
        kernel, bias = output_layer(model).get_weights()
        output_layer(model).set_weights([kernel * 10, bias * 10])  # something to calibrate
        copies.append(model)
    _, dense_inputs, _ = readout_at(copies[0]).predict(images, verbose=0)
    known = calibrate(copies[0], images[:0], index.labels, 3, dense_inputs=dense_inputs)  # no image is read
    passed = calibrate(copies[1], images, index.labels, 3)
    assert known.temperature == pytest.approx(passed.temperature, rel=1e-4) and known.temperature > 1
    assert known.n_images == passed.n_images == len(images)
    np.testing.assert_allclose(output_layer(copies[0]).get_weights()[0], output_layer(copies[1]).get_weights()[0],
                               rtol=1e-4)
