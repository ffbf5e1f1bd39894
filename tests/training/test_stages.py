import numpy as np
import pytest

from transferkit.backbones import get_spec, load_backbone
from transferkit.data.batches import ImageBatches
from transferkit.model.classifier import build_classifier
from transferkit.model.surgery import set_trainable
from transferkit.outputs import encode_targets
from transferkit.recipe import HeadConfig, StageConfig
from transferkit.runs import HISTORY_COLUMNS
from transferkit.training.stages import StageOptions, run_stages

# The suite's VGG-shaped backbone (tests/plugins) wherever a stage's story does not depend on
# the architecture; ResNet50 where BatchNorm inside the backbone is the point.
BACKBONE = "tinyvgg"


def batches(n_classes, n=16, size=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    images = rng.integers(0, 256, (n, size, size, 3), dtype="uint8")
    return ImageBatches(images, encode_targets(labels, n_classes), 8, shuffle=True, seed=seed)


def build(name, n_classes):
    backbone = load_backbone(name, weights="none", input_shape=(32, 32, 3))
    return build_classifier(backbone, n_classes, HeadConfig(units=(8,)), backbone_name=name)


def snapshot(layer):
    return [np.array(weight) for weight in layer.get_weights()]


def test_stage_one_changes_no_backbone_weight_and_trains_the_head():
    model = build(BACKBONE, 3)
    backbone, head = model.get_layer("backbone"), model.get_layer("head")
    before_backbone, before_head = snapshot(backbone), snapshot(head)
    stages = [StageConfig(name="head", epochs=2, learning_rate=1e-2, unfreeze=0, patience=5)]
    data = batches(3)
    history = run_stages(model, get_spec(BACKBONE), stages, data, data, 3, StageOptions(verbose=0)).history
    for old, new in zip(before_backbone, snapshot(backbone)):
        np.testing.assert_array_equal(old, new)
    assert any(not np.array_equal(old, new) for old, new in zip(before_head, snapshot(head)))
    assert [row["epoch"] for row in history] == [1, 2]
    assert set(history[0]) == set(HISTORY_COLUMNS)


def test_stage_two_changes_only_unfrozen_blocks_and_no_batchnorm_statistics():
    spec = get_spec("tinyresnet")
    model = build("tinyresnet", 2)
    backbone = model.get_layer("backbone")
    before = {layer.name: snapshot(layer) for layer in backbone.layers if layer.weights}
    stages = [
        StageConfig(name="head", epochs=1, learning_rate=1e-3, unfreeze=0),
        StageConfig(name="fine", epochs=1, learning_rate=1e-3, unfreeze=2, patience=5),
    ]
    data = batches(2)
    history = run_stages(model, spec, stages, data, data, 2, StageOptions(verbose=0)).history
    assert [row["stage"] for row in history] == ["head", "fine"]
    assert [row["epoch"] for row in history] == [1, 2]
    open_blocks = {len(spec.blocks) - 1, len(spec.blocks) - 2}  # conv5_block1, conv5_block2
    changed_open = 0
    for layer in backbone.layers:
        if not layer.weights:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(before[layer.name], snapshot(layer)))
        is_bn = type(layer).__name__ == "BatchNormalization"
        if is_bn or spec.block_of(layer.name) not in open_blocks:
            assert same, f"{layer.name} changed but was frozen"
        else:
            changed_open += not same
    assert changed_open > 0


def test_set_trainable_keeps_batchnorm_frozen_even_with_all():
    spec = get_spec("tinyresnet")
    model = build("tinyresnet", 3)
    set_trainable(model, spec, "all")
    backbone = model.get_layer("backbone")
    for layer in backbone.layers:
        if type(layer).__name__ == "BatchNormalization":
            assert not layer.trainable
    assert all(layer.trainable for layer in backbone.layers if type(layer).__name__ == "Conv2D")
    assert not model.get_layer("preprocessing").trainable
    set_trainable(model, spec, 0)
    assert not backbone.trainable_weights
    assert model.get_layer("head").trainable_weights


def test_zero_epoch_stage_is_skipped():
    model = build(BACKBONE, 3)
    data = batches(3)
    stages = [StageConfig(epochs=1, unfreeze=0), StageConfig(name="fine", epochs=0, unfreeze=1)]
    result = run_stages(model, get_spec(BACKBONE), stages, data, data, 3, StageOptions(verbose=0))
    history = result.history
    assert [row["stage"] for row in history] == ["stage"]
    # One timing per stage that ran; without a cache nothing is cached and no outputs come back.
    assert [(timing.stage, timing.epochs, timing.cached) for timing in result.timings] == [("stage", 1, False)]
    assert result.timings[0].caching_seconds == 0.0 and result.val_outputs is None


def spoiler(model, epoch: int):
    """A callback that scrambles the output layer before ``epoch`` (0-based) of a stage's fit,
    so that that epoch cannot be the stage's best."""
    import keras

    class Spoil(keras.callbacks.Callback):
        def on_epoch_begin(self, number, logs=None):
            if number == epoch:
                kernel = model.get_layer("head").get_layer("output").kernel
                noise = np.random.default_rng(0).normal(0, 20, kernel.shape).astype("float32")
                kernel.assign(keras.ops.convert_to_numpy(kernel) + noise)

    return Spoil()


def test_early_stopping_restores_the_best_weights_of_a_stage():
    import keras

    keras.utils.set_random_seed(0)
    model = build(BACKBONE, 3)
    data = batches(3)

    stages = [StageConfig(epochs=4, learning_rate=1e-3, unfreeze=0, patience=3)]
    options = StageOptions(verbose=0, callbacks=[spoiler(model, 3)])
    history = run_stages(model, get_spec(BACKBONE), stages, data, data, 3, options).history
    best = min(row["val_loss"] for row in history)
    assert history[-1]["val_loss"] > best  # the last epoch was not the best one
    evaluated = model.evaluate(data, verbose=0, return_dict=True)["loss"]
    assert evaluated == pytest.approx(best, rel=1e-3)


def test_a_stage_that_ends_on_an_earlier_epoch_says_which_the_next_starts_from(caplog):
    import logging

    import keras

    keras.utils.set_random_seed(0)
    model = build(BACKBONE, 3)
    data = batches(3)

    stages = [StageConfig(name="first", epochs=3, learning_rate=1e-3, unfreeze=0, patience=3),
              StageConfig(name="second", epochs=1, learning_rate=1e-4, unfreeze=0)]
    with caplog.at_level(logging.INFO, logger="transferkit"):
        history = run_stages(model, get_spec(BACKBONE), stages, data, data, 3,
                             StageOptions(verbose=1, callbacks=[spoiler(model, 2)])).history
    first = [row["val_loss"] for row in history if row["stage"] == "first"]
    best = int(np.argmin(first))
    assert best < 2  # the spoiled last epoch is not the best
    assert (f"stage 'first' ends on its epoch {best + 1} of 3 (epoch {best + 1}: its lowest val_loss, "
            f"{first[best]:.4f}); stage 'second' starts from it") in caplog.text


def _rates(schedule, steps):
    import keras

    if not callable(schedule):
        return [float(schedule)] * len(steps)
    return [float(keras.ops.convert_to_numpy(schedule(step))) for step in steps]


def test_constant_schedule_without_warmup_is_the_plain_rate():
    from transferkit.training.compile import stage_learning_rate

    assert stage_learning_rate(StageConfig(epochs=3, learning_rate=1e-3), 10) == 1e-3


def test_warmup_rises_linearly_to_the_rate_then_holds_it():
    from transferkit.training.compile import stage_learning_rate

    stage = StageConfig(epochs=4, learning_rate=1e-2, warmup_epochs=1)
    rates = _rates(stage_learning_rate(stage, 4), range(16))  # 4 steps per epoch: warmup = 4 steps
    np.testing.assert_allclose(rates[:4], [0.2e-2, 0.4e-2, 0.6e-2, 0.8e-2], rtol=1e-5)
    np.testing.assert_allclose(rates[4:], 1e-2, rtol=1e-5)


def test_cosine_falls_from_the_rate_to_zero_at_the_stages_end():
    from transferkit.training.compile import stage_learning_rate

    stage = StageConfig(epochs=2, learning_rate=1e-2, schedule="cosine")
    rates = _rates(stage_learning_rate(stage, 5), [0, 5, 10])  # 10 steps in the stage
    np.testing.assert_allclose(rates, [1e-2, 0.5e-2, 0.0], atol=1e-9)
    warm = stage_learning_rate(StageConfig(epochs=3, learning_rate=1e-2, schedule="cosine", warmup_epochs=1), 5)
    rates = _rates(warm, [0, 4, 5, 10, 15])  # warmup 5 steps, then cosine over 10
    np.testing.assert_allclose(rates, [1e-2 / 6, 5e-2 / 6, 1e-2, 0.5e-2, 0.0], atol=1e-9, rtol=1e-5)


def test_one_cycle_rises_from_a_25th_for_30_percent_then_falls_to_a_ten_thousandth():
    from transferkit.training.compile import stage_learning_rate

    stage = StageConfig(epochs=10, learning_rate=1e-2, schedule="one-cycle")
    rates = _rates(stage_learning_rate(stage, 10), [0, 30, 65, 100])  # 100 steps: rise 30, fall 70
    np.testing.assert_allclose(rates, [1e-2 / 25, 1e-2, 0.5e-2 * (1 + 1e-4), 1e-6], rtol=1e-4)
    assert int(np.argmax(_rates(stage_learning_rate(stage, 10), range(100)))) == 30


def test_weight_decay_reaches_the_optimizer_of_every_kind():
    from transferkit.training.compile import make_optimizer

    for name in ("adam", "adamw", "sgd", "rmsprop"):
        assert make_optimizer(name, 1e-3, 0.01).weight_decay == pytest.approx(0.01)
    assert make_optimizer("adam", 1e-3).weight_decay is None
    assert make_optimizer("adamw", 1e-3).weight_decay == 0.0  # not Keras's own 0.004
    assert make_optimizer("sgd", 1e-3).momentum == 0.9


def test_weight_decay_shrinks_weights_that_get_no_gradient():
    import keras

    from transferkit.training.compile import make_optimizer

    for decay, expected in ((0.0, 1.0), (0.5, 0.95)):
        weight = keras.Variable(np.ones(3, dtype="float32"))
        make_optimizer("adam", 0.1, decay).apply([keras.ops.zeros(3)], [weight])
        np.testing.assert_allclose(keras.ops.convert_to_numpy(weight), expected, rtol=1e-5)


@pytest.mark.parametrize("n_classes, kind", [(2, "BinaryCrossentropy"), (3, "CategoricalCrossentropy")])
def test_label_smoothing_reaches_the_compiled_loss(n_classes, kind):
    from transferkit.recipe import LossConfig
    from transferkit.training.compile import compile_for_stage

    model = build(BACKBONE, n_classes)
    compile_for_stage(model, StageConfig(), n_classes, loss=LossConfig(label_smoothing=0.2))
    assert type(model.loss).__name__ == kind
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.2)
    compile_for_stage(model, StageConfig(), n_classes)
    assert model.loss.get_config()["label_smoothing"] == 0.0


def test_a_scheduled_stage_records_the_rate_of_each_epochs_last_step_and_smooths_cached_validation():
    from transferkit.recipe import CacheConfig, LossConfig
    from transferkit.training.compile import stage_learning_rate

    model = build(BACKBONE, 3)
    data = batches(3, n=16)  # 2 steps per epoch
    stage = StageConfig(epochs=3, learning_rate=1e-2, schedule="cosine", warmup_epochs=1, patience=5)
    options = StageOptions(verbose=0, cache=CacheConfig(), loss=LossConfig(label_smoothing=0.1))
    history = run_stages(model, get_spec(BACKBONE), [stage], data, data, 3, options).history
    expected = _rates(stage_learning_rate(stage, 2), [1, 3, 5])
    np.testing.assert_allclose([row["learning_rate"] for row in history], expected, rtol=1e-5)
    assert history[0]["learning_rate"] == pytest.approx(1e-2 * 2 / 3)


def test_a_stop_request_mid_epoch_ends_fit_at_once_without_the_validation_pass():
    """Ctrl-C in an uncached stage: the batch ends, then training stops; Keras's validation
    pass of the epoch that was cut short (minutes on a big folder) is not run."""
    import keras

    from transferkit.errors import TrainingInterrupted
    from transferkit.training.checkpoint import StopFlag
    from transferkit.training.stages import Checkpointing

    stop = StopFlag()
    seen = {"validation passes": 0, "epochs ended": 0, "batches": 0}

    class StopInSecondEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                stop.requested = "SIGINT"

        def on_train_batch_end(self, batch, logs=None):
            seen["batches"] += 1

        def on_test_begin(self, logs=None):
            seen["validation passes"] += 1

        def on_epoch_end(self, epoch, logs=None):
            seen["epochs ended"] += 1

    stages = [StageConfig(name="head", epochs=3, learning_rate=1e-2, unfreeze=0, patience=5)]
    data = batches(3)  # two batches an epoch
    with pytest.raises(TrainingInterrupted, match="SIGINT: training stopped"):
        run_stages(build(BACKBONE, 3), get_spec(BACKBONE), stages, data, data, 3,
                   StageOptions(verbose=0, callbacks=[StopInSecondEpoch()]), Checkpointing(stop=stop))
    # the first epoch whole, with its validation; of the second, one batch and nothing after it
    assert seen == {"validation passes": 1, "epochs ended": 1, "batches": 2}
