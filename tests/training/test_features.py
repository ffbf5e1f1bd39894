import logging

import keras
import numpy as np
import pytest

from transferkit.backbones import get_spec, load_backbone
from transferkit.data.batches import ImageBatches
from transferkit.model.classifier import build_classifier
from transferkit.model.surgery import extractor_at
from transferkit.outputs import encode_targets
from transferkit.recipe import AugmentConfig, CacheConfig, HeadConfig, StageConfig
from transferkit.training.features import (
    FeatureBatches,
    FeaturePass,
    FeatureStore,
    compute_feature_stores,
    view_seed,
)
from transferkit.training.stages import Checkpointing, StageOptions, run_stages

# The suite's VGG-shaped backbone (tests/plugins): what the cache does depends on the blocks
# and the frozen boundary, not on the size of the network.
BACKBONE = "tinyvgg"


def build(name, n_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = load_backbone(name, weights="none", input_shape=(32, 32, 3))
    return build_classifier(backbone, n_classes, HeadConfig(units=(8,), dropout=0.3), backbone_name=name)


def images(n=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype="uint8")


def test_store_spills_to_disk_beyond_its_budget_with_the_same_values_and_leaves_no_file(tmp_path, caplog):
    data = images(10)
    forward = lambda batch: [batch.reshape(len(batch), -1)[:, :7] * 0.5]  # noqa: E731
    with caplog.at_level(logging.DEBUG, logger="transferkit"):
        (in_memory,) = compute_feature_stores(forward, data, [(7,)],
                                              FeaturePass([1], batch_size=3, memory_budget_mb=100))
        assert "memory-mapped" not in caplog.text
        spilled = FeaturePass([1], batch_size=3, memory_budget_mb=1e-6, spill_dir=tmp_path)
        (on_disk,) = compute_feature_stores(forward, data, [(7,)], spilled)
    # told with -v (debug): where the cache went, and why
    assert f"above cache.memory_mb (1e-06 MB): memory-mapped from a temporary file in {tmp_path}" in caplog.text
    assert not in_memory.on_disk and on_disk.on_disk
    assert isinstance(on_disk.array, np.memmap)
    # Unlinked as soon as it is mapped: a run killed now leaves nothing in the folder.
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(in_memory.array, on_disk.array)
    on_disk.close()
    assert list(tmp_path.iterdir()) == []


def test_feature_batches_follow_the_image_order_and_rotate_views():
    store = FeatureStore(2, 5, (1,), "float32", 10)
    store.array[0, :, 0] = np.arange(5)
    store.array[1, :, 0] = np.arange(5) + 100
    targets = np.arange(5, dtype="float32").reshape(-1, 1)
    batches = FeatureBatches(store, targets, 2, seed=3)
    reference = ImageBatches(np.zeros((5, 2, 2, 3), "uint8"), targets, 2, shuffle=True, seed=3)
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        reference.set_epoch(epoch)
        x, y = batches[0]
        np.testing.assert_array_equal(y, reference[0][1])
        np.testing.assert_array_equal(x[:, 0] - 100 * epoch, y[:, 0])


def fit(model, cache, augment=None, unfreeze=0, epochs=3, optimizer="adam", order_seed=1, seed=1,
        forward_factory=None):
    labels = np.arange(24) % 3
    from transferkit.data.augment import build_augmenter

    factory = (lambda: build_augmenter(augment)) if augment else None
    train = ImageBatches(images(24), encode_targets(labels, 3), 8, shuffle=True, seed=order_seed,
                         augmenter_factory=factory)
    val = ImageBatches(images(9, seed=5), encode_targets(np.arange(9) % 3, 3), 8)
    stages = [StageConfig(epochs=epochs, learning_rate=1e-2, unfreeze=unfreeze, patience=10, optimizer=optimizer)]
    options = StageOptions(verbose=0, seed=seed, cache=cache, forward_factory=forward_factory)
    return run_stages(model, get_spec(BACKBONE), stages, train, val, 3, options).history


# The comparison trains with SGD, not Adam. Adam's first steps move each weight by about
# lr * sign(gradient); on random-weight VGG features many gradient components are near zero
# and float noise decides their sign, so whichever kernels compute the forward pass (oneDNN
# here, Eigen on a CPU without AVX512_VNNI/BF16/AMX; fused differently in the cached and the
# uncached graph) those weights part by the whole learning rate per step: features perturbed
# by a relative 1e-7 moved 2420 of 4163 head weights by up to 0.37, and the uncached run alone
# gives another val_loss on Eigen (1.950) than on oneDNN (1.903). With SGD the same noise
# (1e-5) moves no weight by more than 6e-6, while another dropout seed or batch order moves
# thousands by over 1e-2 (see the test after this one).
COMPARED = dict(optimizer="sgd", epochs=3)


def train_head(cache=None, **changes):
    model = build(BACKBONE, seed=4)
    history = fit(model, cache, **COMPARED, **changes)
    return model, history


def assert_same_training(plain, cached):
    (plain_model, history_plain), (cached_model, history_cached) = plain, cached
    for a, b in zip(plain_model.get_layer("head").get_weights(), cached_model.get_layer("head").get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert [r["val_loss"] for r in history_cached] == pytest.approx([r["val_loss"] for r in history_plain], rel=1e-3)


@pytest.fixture(scope="module")
def uncached_training():
    return train_head(None)


def test_cached_training_matches_uncached_without_augmentation(uncached_training):
    model = build(BACKBONE, seed=4)
    backbone_before = [np.array(w) for w in model.get_layer("backbone").get_weights()]
    cached = model, fit(model, CacheConfig(enabled=True), **COMPARED)
    assert_same_training(uncached_training, cached)
    for a, b in zip(backbone_before, model.get_layer("backbone").get_weights()):
        np.testing.assert_array_equal(a, b)


def noisy_forward(relative):
    """The default forward pass with relative Gaussian noise on its outputs (another CPU's kernels)."""
    from transferkit.training.features import default_forward

    def factory(extractor, work=None):
        forward, rng = default_forward(extractor), np.random.default_rng(0)

        def noisy(batch):
            outputs = np.asarray(forward(batch))
            return outputs * (1 + relative * rng.standard_normal(outputs.shape)).astype("float32")

        return noisy

    return factory


@pytest.mark.parametrize("change, tells", [
    ({"forward_factory": noisy_forward(1e-5)}, False),  # float noise, 100x what kernels differ by
    ({"seed": 2}, True),  # another dropout seed (the images' batch order stays)
    ({"order_seed": 2}, True),  # another batch order
])
def test_cached_versus_uncached_comparison_tells_a_real_difference_from_noise(uncached_training, change, tells):
    cached = train_head(CacheConfig(enabled=True), **change)
    if tells:
        with pytest.raises(AssertionError):
            assert_same_training(uncached_training, cached)
    else:
        assert_same_training(uncached_training, cached)


def test_partly_unfrozen_stage_on_cache_changes_only_the_open_block():
    model = build(BACKBONE, seed=2)
    backbone = model.get_layer("backbone")
    before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in backbone.layers if layer.weights}
    fit(model, CacheConfig(enabled=True), unfreeze=1, epochs=2)
    for layer in backbone.layers:
        if not layer.weights:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))
        assert same == (not layer.name.startswith("block5_")), layer.name


def test_augmented_stage_stores_at_most_one_view_per_epoch(caplog):
    augment = AugmentConfig(rotation=20.0)
    labels = np.arange(12) % 3
    from transferkit.data.augment import build_augmenter

    train = ImageBatches(images(12), encode_targets(labels, 3), 8, shuffle=True, seed=1,
                         augmenter_factory=lambda: build_augmenter(augment))
    val = ImageBatches(images(6, seed=5), encode_targets(np.arange(6) % 3, 3), 8)
    for views, stored in ((2, 2), (5, 3)):
        model = build(BACKBONE, seed=0)
        stages = [StageConfig(epochs=3, unfreeze=0, patience=10)]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transferkit"):
            run_stages(model, get_spec(BACKBONE), stages, train, val, 3,
                       StageOptions(verbose=1, seed=1, cache=CacheConfig(enabled=True, views=views)))
        output = caplog.text
        assert "on cached features" in output
        assert f"({stored} view(s)" in output, output[-500:]
    model = build(BACKBONE, seed=0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transferkit"):
        # (a stage of 0 epochs, as --fine-epochs 0 makes, is skipped and not counted)
        run_stages(model, get_spec(BACKBONE), [StageConfig(epochs=2, unfreeze=0), StageConfig(epochs=0, unfreeze=1)],
                   train, val, 3, StageOptions(verbose=1, seed=1, cache=CacheConfig(enabled=False)))
    assert "stage 1/1 " in caplog.text and "/2 " not in caplog.text and "on cached features" not in caplog.text


@pytest.mark.parametrize("unfreeze", [0, 1])  # the head alone on backbone maps; block5 and the head
def test_final_validation_readout_from_the_cache_equals_the_models(unfreeze):
    from transferkit.evaluation.calibration import logits_from, logits_of
    from transferkit.model.surgery import readout_at

    model = build(BACKBONE, seed=3)
    labels = np.arange(24) % 3
    train = ImageBatches(images(24), encode_targets(labels, 3), 8, shuffle=True, seed=1)
    val = ImageBatches(images(9, seed=5), encode_targets(np.arange(9) % 3, 3), 4)
    result = run_stages(model, get_spec(BACKBONE), [StageConfig(epochs=2 - unfreeze, unfreeze=unfreeze)], train, val,
                        3, StageOptions(verbose=0, seed=1, cache=CacheConfig(enabled=True)))
    outputs, dense_inputs, embeddings = readout_at(model).predict(val, verbose=0)
    np.testing.assert_allclose(result.val_outputs, model.predict(val, verbose=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.validation.outputs, outputs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.validation.dense_inputs, dense_inputs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.validation.embeddings, embeddings, rtol=1e-4, atol=1e-4)
    assert embeddings.shape == (9, model.get_layer("backbone").output.shape[-1])
    # Calibration's logits from them are the ones a pass of the model gives.
    np.testing.assert_allclose(logits_from(model, result.validation.dense_inputs), logits_of(model, val.images),
                               rtol=1e-4, atol=1e-4)
    result = run_stages(model, get_spec(BACKBONE), [StageConfig(epochs=1, unfreeze=0)], train, val, 3,
                        StageOptions(verbose=0, seed=1, cache=None))
    assert result.val_outputs is None and result.validation is None  # an uncached last stage: the model runs


def test_feature_batches_rotate_over_the_stage_views_only():
    store = FeatureStore(3, 4, (1,), "float32", 10)
    for view in range(3):
        store.array[view, :, 0] = view
    batches = FeatureBatches(store, np.zeros((4, 1), "float32"), 4, shuffle=False, views=2)
    seen = []
    for epoch in range(4):
        batches.set_epoch(epoch)
        seen.append(int(batches[0][0][0, 0]))
    assert seen == [0, 1, 0, 1]


def plan_for(model, unfreezes, forward_factory=None, augment=None, epochs=2):
    from transferkit.data.augment import build_augmenter
    from transferkit.training.features import FeaturePlan

    factory = (lambda: build_augmenter(augment)) if augment else None
    train = ImageBatches(images(12), encode_targets(np.arange(12) % 3, 3), 4, shuffle=True, seed=1,
                         augmenter_factory=factory)
    val = ImageBatches(images(6, seed=5), encode_targets(np.arange(6) % 3, 3), 4)
    stages = [StageConfig(epochs=epochs, unfreeze=unfreeze) for unfreeze in unfreezes]
    from transferkit.training.features import default_forward

    return FeaturePlan(model, get_spec(BACKBONE), stages, train, val, CacheConfig(enabled=True, views=2),
                       forward_factory or default_forward, seed=1)


def test_plan_takes_each_stage_from_the_shallowest_boundary_of_the_stages_after_it():
    model = build(BACKBONE)
    plan = plan_for(model, [0, 2, 1])  # boundaries: backbone output (5), block4 (3), block5 (4)
    assert [plan.boundary(i) for i in range(3)] == [5, 3, 4]
    assert [plan.source(i) for i in range(3)] == [3, 3, 4]


def test_later_stage_reuses_the_first_stage_pass_and_gets_what_a_fresh_pass_gives():
    """The fine stage trains on features the head stage's pass computed; a run resumed at the
    fine stage computes them afresh and must get the very same numbers."""
    from transferkit.recipe import AugmentConfig

    augment = AugmentConfig(rotation=20.0)
    model = build(BACKBONE, seed=6)
    shared = plan_for(model, [0, 1], augment=augment)
    head, fine = shared.stage_inputs(0), shared.stage_inputs(1)
    assert head.computed and not fine.computed
    backbone = model.get_layer("backbone")  # each stage's features: the output of the block below its first open one
    assert head.train.store.shape[2:] == tuple(backbone.get_layer("block5_pool").output.shape[1:]) == (1, 1, 128)
    assert fine.train.store.shape[2:] == tuple(backbone.get_layer("block4_pool").output.shape[1:]) == (2, 2, 64)
    resumed = plan_for(model, [0, 1], augment=augment).stage_inputs(1)
    assert resumed.computed
    for stage in (head, fine, resumed):  # views after the first are computed in the background
        stage.train.store.wait_for()
    np.testing.assert_array_equal(resumed.train.store.array, fine.train.store.array)
    np.testing.assert_array_equal(resumed.val.store.array, fine.val.store.array)
    # and they are the frozen part's output on the views: the images themselves, then augmented
    direct = extractor_at(model, get_spec(BACKBONE), [get_spec(BACKBONE).first_unfrozen(1)])
    for view in (0, 1):
        expected = direct.predict_on_batch(head_view_images(shared, view))
        np.testing.assert_allclose(fine.train.store.array[view], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fine.train.store.array[1], fine.train.store.array[0], rtol=1e-3, atol=1e-3)
    shared.stage_done(0)
    assert len(shared._stores) == 1
    shared.stage_done(1)
    assert not shared._stores


def head_view_images(plan, view):
    """The images of a cached view: the images themselves (view 0), else augmented."""
    from transferkit.data.batches import augment_one

    if view == 0:
        return plan.train_data.images.astype("float32")
    augmenter = plan.augmenter_factory()
    return np.stack([augment_one(augmenter, image, view_seed(plan.seed, view, index))
                     for index, image in enumerate(plan.train_data.images)]).astype("float32")


def test_resumed_stage_runs_the_same_engine_network_as_the_whole_run():
    """A backbone with BatchNorm (the suite's tinyresnet) through OpenVINO in bfloat16, three
    stages sharing one pass: a run resumed at the second stage computes its features afresh
    and gets the same numbers."""
    from transferkit.inference.engines import inference_engine

    keras.utils.set_random_seed(0)
    with __import__("transferkit.runtime", fromlist=["x"]).dtype_policy("mixed_bfloat16"):
        backbone = load_backbone("tinyresnet", weights="none", input_shape=(64, 64, 3))
        model = build_classifier(backbone, 3, HeadConfig(units=(8,)), backbone_name="tinyresnet")
    pictures = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype="uint8")

    def factory(extractor, work=None):
        return inference_engine(extractor, "auto", precision="bfloat16").predict

    from transferkit.training.features import FeaturePlan

    def plan():
        train = ImageBatches(pictures[:8], encode_targets(np.arange(8) % 3, 3), 4, shuffle=True, seed=1)
        val = ImageBatches(pictures[8:], encode_targets(np.arange(4) % 3, 3), 4)
        stages = [StageConfig(epochs=1, unfreeze=unfreeze) for unfreeze in (0, 2, 3)]
        return FeaturePlan(model, get_spec("tinyresnet"), stages, train, val, CacheConfig(), factory, dtype="float16")

    whole = plan()
    whole.stage_inputs(0)
    reused = whole.stage_inputs(1)
    fresh = plan().stage_inputs(1)
    assert not reused.computed and fresh.computed
    reused.train.store.wait_for()
    fresh.train.store.wait_for()
    np.testing.assert_array_equal(fresh.train.store.array, reused.train.store.array)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_cached_stage_validation_figures_are_what_keras_evaluate_gives(n_classes):
    """A cached stage computes its validation loss and accuracy itself (no traced test
    function); they must be the figures Keras reports for the same model and images."""
    from transferkit.outputs import loss_for

    model = build(BACKBONE, n_classes=n_classes, seed=8)
    labels = np.arange(24) % n_classes
    train = ImageBatches(images(24), encode_targets(labels, n_classes), 8, shuffle=True, seed=1)
    val = ImageBatches(images(11, seed=5), encode_targets(np.arange(11) % n_classes, n_classes), 4)
    history = run_stages(model, get_spec(BACKBONE), [StageConfig(epochs=1, learning_rate=1e-2, unfreeze=0)],
                         train, val, n_classes,
                         StageOptions(verbose=0, seed=1, cache=CacheConfig(enabled=True))).history
    model.compile(loss=loss_for(n_classes), metrics=["accuracy"])
    expected = model.evaluate(val, verbose=0, return_dict=True)
    assert history[0]["val_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert history[0]["val_accuracy"] == pytest.approx(expected["accuracy"])


def test_run_stopped_in_the_first_cached_epoch_resumes_from_the_stage_start(tmp_path):
    """The whole model is saved in the background as a cached stage starts, while its head
    already trains: resuming from that checkpoint must start from the head as it was."""
    from transferkit.errors import TrainingInterrupted
    from transferkit.training.checkpoint import StopFlag, WorkFolder

    def batches():
        train = ImageBatches(images(24), encode_targets(np.arange(24) % 3, 3), 8, shuffle=True, seed=1)
        return train, ImageBatches(images(9, seed=5), encode_targets(np.arange(9) % 3, 3), 8)

    stages = [StageConfig(epochs=2, learning_rate=1e-2, unfreeze=0, patience=10)]
    reference = build(BACKBONE, seed=7)
    options = StageOptions(verbose=0, seed=1, cache=CacheConfig())
    expected = run_stages(reference, get_spec(BACKBONE), stages, *batches(), 3, options).history

    stop = StopFlag()

    class StopInFirstEpoch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            stop.requested = "SIGINT"

    work = WorkFolder.create(tmp_path / "run", {}, "", force=False)
    with pytest.raises(TrainingInterrupted):
        run_stages(build(BACKBONE, seed=7), get_spec(BACKBONE), stages, *batches(), 3,
                   StageOptions(verbose=0, seed=1, cache=CacheConfig(), callbacks=[StopInFirstEpoch()]),
                   Checkpointing(work=work, stop=stop))
    state = work.state()
    assert (state.epochs_done, state.part_only, state.history) == (0, True, [])
    work.release()  # its owner lock, as the interrupted process lets go of it when it ends

    work = WorkFolder.open(tmp_path / "run")
    resumed = work.load_model()
    history = run_stages(resumed, get_spec(BACKBONE), stages, *batches(), 3, options,
                         Checkpointing(state=state, work=work)).history
    assert [row["val_loss"] for row in history] == pytest.approx([row["val_loss"] for row in expected], rel=1e-6)
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_later_views_computed_in_the_background_equal_the_ones_computed_at_once():
    from transferkit.data.augment import build_augmenter

    factory = lambda: build_augmenter(AugmentConfig(rotation=30.0, shift=0.2))  # noqa: E731
    forward = lambda batch: [batch.reshape(len(batch), -1)[:, :6] / 255.0]  # noqa: E731
    common = dict(views=[3], augmenter_factory=factory, seed=4, batch_size=5)
    (at_once,) = compute_feature_stores(forward, images(12), [(6,)], FeaturePass(**common))
    in_background = FeaturePass(later_views_in_background=True, **common)
    (store,) = compute_feature_stores(forward, images(12), [(6,)], in_background)
    assert at_once.filler is None and store.filler is not None
    store.wait_for()
    np.testing.assert_array_equal(store.array, at_once.array)
    assert not np.array_equal(store.array[1], store.array[2])  # different augmented views
    store.close()


def test_a_failure_in_the_background_reaches_whoever_waits_for_that_view():
    from transferkit.data.augment import build_augmenter

    calls = []

    def forward(batch):
        calls.append(len(batch))
        if len(calls) > 2:  # the two batches of view 0 succeed
            raise RuntimeError("engine lost")
        return [batch.reshape(len(batch), -1)[:, :2]]

    (store,) = compute_feature_stores(forward, images(8), [(2,)], FeaturePass(
        views=[2], batch_size=4, later_views_in_background=True,
        augmenter_factory=lambda: build_augmenter(AugmentConfig(rotation=10.0))))
    store.wait_for(0)
    with pytest.raises(RuntimeError, match="engine lost"):
        store.wait_for(1)
    store.close()


def test_cached_stage_progress_never_counts_past_the_epoch(capsys):
    import re

    model = build(BACKBONE, seed=1)
    train = ImageBatches(images(24), encode_targets(np.arange(24) % 3, 3), 8, shuffle=True, seed=1)  # 3 steps
    val = ImageBatches(images(6, seed=5), encode_targets(np.arange(6) % 3, 3), 8)
    run_stages(model, get_spec(BACKBONE), [StageConfig(epochs=1, unfreeze=0)], train, val, 3,
               StageOptions(verbose=1, seed=1, cache=CacheConfig(enabled=True)))
    counts = [int(done) for done in re.findall(r"(\d+)/3\b", capsys.readouterr().out)]
    assert counts and max(counts) == 3


def test_a_stop_request_ends_the_feature_pass_and_the_stage_before_training(tmp_path):
    """Ctrl-C while features are computed (minutes on real data) stops at the next batch,
    and training does not start."""
    from transferkit.errors import TrainingInterrupted
    from transferkit.training.checkpoint import StopFlag

    calls = []

    def forward(batch):
        calls.append(len(batch))
        return [batch.reshape(len(batch), -1)[:, :6] / 255.0]

    stop = StopFlag()
    (store,) = compute_feature_stores(forward, images(40), [(6,)], FeaturePass(
        views=[3], batch_size=4,
        augmenter_factory=lambda: __import__("transferkit.data.augment", fromlist=["x"])
        .build_augmenter(AugmentConfig(rotation=30.0)),
        later_views_in_background=True, stop_requested=lambda: len(calls) >= 2))
    assert len(calls) == 2 and store.filler is None  # 2 of 10 batches, no background views

    class Stopping(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise AssertionError("training started after the stop request")

    def stopping_factory(extractor, work=None):
        from transferkit.training.features import default_forward

        inner = default_forward(extractor)

        def forward(batch):
            stop.requested = "SIGINT"
            return inner(batch)

        return forward

    model = build(BACKBONE, seed=3)
    train = ImageBatches(images(16), encode_targets(np.arange(16) % 3, 3), 4, shuffle=True, seed=1)
    val = ImageBatches(images(8, seed=2), encode_targets(np.arange(8) % 3, 3), 4)
    with pytest.raises(TrainingInterrupted):
        run_stages(model, get_spec(BACKBONE), [StageConfig(epochs=2, unfreeze=0)], train, val, 3,
                   StageOptions(verbose=0, cache=CacheConfig(), forward_factory=stopping_factory,
                                callbacks=[Stopping()]),
                   Checkpointing(stop=stop))


# --- features shared across runs (a study's trials) ------------------------------------------


def shared_plan(model, unfreezes, data, cache, *, augment=AugmentConfig(rotation=20.0), context=("auto", "auto"),
                forward_factory=None):
    from transferkit.data.augment import build_augmenter
    from transferkit.training.features import FeaturePlan, default_forward

    train_images, val_images = data
    factory = (lambda: build_augmenter(augment)) if augment else None
    train = ImageBatches(train_images, encode_targets(np.arange(len(train_images)) % 3, 3), 4, shuffle=True, seed=1,
                         augmenter_factory=factory)
    val = ImageBatches(val_images, encode_targets(np.arange(len(val_images)) % 3, 3), 4)
    stages = [StageConfig(epochs=2, unfreeze=unfreeze) for unfreeze in unfreezes]
    return FeaturePlan(model, get_spec(BACKBONE), stages, train, val, CacheConfig(enabled=True, views=2),
                       forward_factory or default_forward, seed=1, shared=cache, context=context)


def counting(calls: list):
    """A forward factory that records the number of outputs of each extractor it is given."""
    from transferkit.training.features import default_forward

    def factory(extractor, work=None):
        calls.append(len(extractor.outputs))
        return default_forward(extractor)

    return factory


def test_a_shared_cache_serves_a_later_run_whose_frozen_part_is_the_same():
    from transferkit.training.features import FeatureCache

    cache = FeatureCache()
    data = (images(12), images(6, seed=5))
    first = shared_plan(build(BACKBONE, seed=6), [0, 1], data, cache)
    head, fine = first.stage_inputs(0), first.stage_inputs(1)
    assert head.computed and not fine.computed
    first.stage_done(0)
    first.close()  # the cache keeps both boundaries, every view stored
    assert len(cache) == 2 and head.train.store.complete() and fine.train.store.complete()
    # Another model with the same weights (same seed), the same images and augmentation.
    calls = []
    again = shared_plan(build(BACKBONE, seed=6), [0, 1], data, cache, forward_factory=counting(calls))
    head_again, fine_again = again.stage_inputs(0), again.stage_inputs(1)
    assert calls == [] and not head_again.computed and not fine_again.computed
    assert head_again.train.store is head.train.store and fine_again.val.store is fine.val.store
    np.testing.assert_array_equal(head_again.calibration, head.calibration)
    again.close()
    assert len(cache) == 2 and cache.hits == 2 and cache.misses == 2
    # A deeper fine stage: the head's features come from the cache, the pass computes only
    # the new boundary, and gets what a run of its own computes.
    calls = []
    deeper = shared_plan(build(BACKBONE, seed=6), [0, 2], data, cache, forward_factory=counting(calls))
    deeper_fine = deeper.stage_inputs(1)
    assert calls == [1] and deeper_fine.computed
    assert deeper.stage_inputs(0).train.store is head.train.store
    own = plan_for(build(BACKBONE, seed=6), [0, 2], augment=AugmentConfig(rotation=20.0))  # the same images
    own_fine = own.stage_inputs(1)
    own_fine.train.store.wait_for()
    deeper_fine.train.store.wait_for()
    np.testing.assert_allclose(deeper_fine.train.store.array, own_fine.train.store.array, rtol=1e-5, atol=1e-5)
    own.close()
    deeper.close()
    cache.close()
    assert len(cache) == 0


@pytest.mark.parametrize("change", ["weights", "augmentation", "engine", "images"])
def test_a_shared_cache_never_serves_features_computed_otherwise(change):
    from transferkit.training.features import FeatureCache

    cache = FeatureCache()
    data = (images(12), images(6, seed=5))
    shared_plan(build(BACKBONE, seed=6), [0], data, cache).stage_inputs(0)
    calls = []
    other = {
        "weights": dict(model=build(BACKBONE, seed=7)),
        "augmentation": dict(augment=AugmentConfig(rotation=10.0)),
        "engine": dict(context=("openvino", "float32")),
        "images": dict(data=(data[0].copy(), data[1])),  # equal values, another array
    }[change]
    arguments = {"model": build(BACKBONE, seed=6), "data": data, **other}
    model, data_used = arguments.pop("model"), arguments.pop("data")
    plan = shared_plan(model, [0], data_used, cache, forward_factory=counting(calls), **arguments)
    assert plan.stage_inputs(0).computed and calls == [1]
    assert cache.hits == 0 and len(cache) == 2
    cache.close()


def test_the_shared_cache_releases_the_least_recently_used_stores_it_may():
    from transferkit.training.features import FeatureCache

    def entry():
        return FeatureStore(1, 256, (1024,), "float32", 100), FeatureStore(1, 256, (1024,), "float32", 100)  # 2 MB

    cache = FeatureCache(max_entries=3)
    for name in "abc":
        cache.keep((name,), entry(), views=1)
    assert cache.memory_mb() == pytest.approx(6)
    assert cache.lookup(("a",), views=1) is not None  # now the most recently used
    assert cache.lookup(("b",), views=2) is None  # it holds fewer views than asked
    cache.make_room(needed_mb=2, memory_mb=6, keep=[("b",)])
    # Room for 2 MB more within 6 MB: "c" goes (the least recently used that may go; "b" is
    # kept), and then there is room.
    assert cache.lookup(("c",), views=1) is None
    assert cache.lookup(("b",), views=1) is not None and cache.lookup(("a",), views=1) is not None
    assert len(cache) == 2 and cache.memory_mb() == pytest.approx(4)
    cache.keep(("d",), entry(), views=1)
    cache.make_room(needed_mb=0, memory_mb=100)  # three entries at most: room for one more
    assert len(cache) == 2 and cache.lookup(("b",), views=1) is None  # "b" was used longest ago
    cache.close()
    assert cache.memory_mb() == 0


@pytest.mark.parametrize("unfreeze", [0, 1])  # the backbone's maps; below the top block
def test_the_last_stages_stored_features_give_the_knn_reference_the_whole_model_gives(unfreeze, tmp_path):
    """The last stage's stored training features, view 0, are the training images' own (not
    augmented), in their order: the knn score's reference images take only the layers above
    them, and come out as a pass of the whole model gives them."""
    from types import SimpleNamespace

    from transferkit.data.augment import build_augmenter
    from transferkit.recipe import load_recipe
    from transferkit.trust.record import STORED_REFERENCE, after_training_forward, fit_trust

    spec = get_spec(BACKBONE)
    model = build(BACKBONE, seed=3)
    train_images, labels = images(24), np.arange(24) % 3
    train = ImageBatches(train_images, encode_targets(labels, 3), 8, shuffle=True, seed=1,
                         augmenter_factory=lambda: build_augmenter(AugmentConfig()))
    val = ImageBatches(images(9, seed=5), encode_targets(np.arange(9) % 3, 3), 4)
    result = run_stages(model, spec, [StageConfig(epochs=2, unfreeze=unfreeze)], train, val, 3,
                        StageOptions(verbose=0, seed=1, cache=CacheConfig(enabled=True, views=2)))
    stored = result.reference
    boundary = spec.first_unfrozen(unfreeze)
    assert stored.first_open == boundary and not stored.int8 and len(stored.features) == 24
    direct = extractor_at(model, spec, [boundary]).predict(train_images.astype("float32"), verbose=0)
    np.testing.assert_allclose(stored.features, direct, rtol=1e-4, atol=1e-4)

    prepared = SimpleNamespace(train_images=train_images, train_labels=labels, val_images=val.images,
                               val_labels=np.arange(9) % 3)
    recipe = load_recipe(None, {"backbone": BACKBONE, "weights": "none", "image_size": 32, "batch_size": 8,
                                "precision": "float32", "engine": "openvino"})
    forward = after_training_forward(model, prepared, recipe, tmp_path / "stored", result.validation, None, stored)
    fit = fit_trust(model, prepared, recipe, forward=forward).rejection
    whole = after_training_forward(model, prepared, recipe, tmp_path / "whole", result.validation)
    plain = fit_trust(model, prepared, recipe, forward=whole).rejection
    assert forward.reference_from == "stored" and fit.record["reference_passes"] == STORED_REFERENCE
    assert whole.reference_from == "these" and "reference_passes" not in plain.record
    assert fit.reference.shape == plain.reference.shape == (24, model.get_layer("backbone").output.shape[-1])
    np.testing.assert_allclose(fit.reference, plain.reference, atol=2e-3)  # float16 storage
    assert fit.record["threshold"] == pytest.approx(plain.record["threshold"], abs=2e-3)
