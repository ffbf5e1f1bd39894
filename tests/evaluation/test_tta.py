import numpy as np
import pytest

from transferkit.evaluation.evaluate import evaluate_folder
from transferkit.evaluation.tta import SHIFTS, TTAEngine, transform_batch, tta_engine, tta_variants
from transferkit.inference.engines import ForwardEngine, inference_engine
from transferkit.inference.predict import predict_folder


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
