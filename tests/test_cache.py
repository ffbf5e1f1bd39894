import keras
import numpy as np
import pytest

from transferkit.backbones import REGISTRY, load_backbone
from transferkit.cache import FeatureBatches, FeatureStore, compute_features, split_at_frozen_part
from transferkit.data import ImageBatches, encode_targets
from transferkit.model import build_classifier
from transferkit.recipe import AugmentConfig, CacheConfig, HeadConfig, StageConfig
from transferkit.training import run_stages


def build(name, n_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = load_backbone(name, weights="none", input_shape=(32, 32, 3))
    return build_classifier(backbone, n_classes, HeadConfig(units=(8,), dropout=0.3), backbone_name=name)


def images(n=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype="uint8")


@pytest.mark.parametrize("name, unfreeze, boundary", [
    ("vgg16", 0, ""), ("vgg16", 1, "block4_pool"), ("resnet50", 2, "conv5_block1_out"), ("resnet50", 16, "pool1_pool"),
])
def test_split_model_computes_what_the_classifier_computes(name, unfreeze, boundary):
    model = build(name)
    split = split_at_frozen_part(model, REGISTRY[name], unfreeze)
    assert split.boundary == boundary
    x = images(4).astype("float32")
    direct = model.predict_on_batch(x)
    via_split = split.trainable.predict_on_batch(split.extractor.predict_on_batch(x))
    np.testing.assert_allclose(via_split, direct, rtol=1e-4, atol=1e-5)
    assert split_at_frozen_part(model, REGISTRY[name], "all") is None


def test_store_spills_to_disk_beyond_its_budget_with_the_same_values():
    data = images(10)
    forward = lambda batch: batch.reshape(len(batch), -1)[:, :7] * 0.5
    in_memory = compute_features(forward, data, (7,), batch_size=3, memory_budget_mb=100)
    on_disk = compute_features(forward, data, (7,), batch_size=3, memory_budget_mb=1e-6)
    assert not in_memory.on_disk and on_disk.on_disk
    np.testing.assert_array_equal(in_memory.array, on_disk.array)
    path = on_disk._file.name
    on_disk.close()
    import os

    assert not os.path.exists(path)


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


def fit(model, cache, augment=None, unfreeze=0, epochs=3):
    name = "vgg16"
    labels = np.arange(24) % 3
    factory = (lambda: __import__("transferkit.augment", fromlist=["x"]).build_augmenter(augment)) if augment else None
    train = ImageBatches(images(24), encode_targets(labels, 3), 8, shuffle=True, seed=1, augmenter_factory=factory)
    val = ImageBatches(images(9, seed=5), encode_targets(np.arange(9) % 3, 3), 8)
    stages = [StageConfig(epochs=epochs, learning_rate=1e-2, unfreeze=unfreeze, patience=10)]
    return run_stages(model, REGISTRY[name], stages, train, val, 3, verbose=0, seed=1, cache=cache)


def test_cached_training_matches_uncached_without_augmentation():
    plain, cached = build("vgg16", seed=4), build("vgg16", seed=4)
    backbone_before = [np.array(w) for w in cached.get_layer("backbone").get_weights()]
    history_plain = fit(plain, None)
    history_cached = fit(cached, CacheConfig(enabled=True))
    for a, b in zip(plain.get_layer("head").get_weights(), cached.get_layer("head").get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert [r["val_loss"] for r in history_cached] == pytest.approx([r["val_loss"] for r in history_plain], rel=1e-3)
    for a, b in zip(backbone_before, cached.get_layer("backbone").get_weights()):
        np.testing.assert_array_equal(a, b)


def test_partly_unfrozen_stage_on_cache_changes_only_the_open_block():
    model = build("vgg16", seed=2)
    backbone = model.get_layer("backbone")
    before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in backbone.layers if layer.weights}
    fit(model, CacheConfig(enabled=True), unfreeze=1, epochs=2)
    for layer in backbone.layers:
        if not layer.weights:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))
        assert same == (not layer.name.startswith("block5_")), layer.name


def test_augmented_stage_stores_at_most_one_view_per_epoch(capsys):
    augment = AugmentConfig(rotation=20.0)
    labels = np.arange(12) % 3
    from transferkit.augment import build_augmenter

    train = ImageBatches(images(12), encode_targets(labels, 3), 8, shuffle=True, seed=1,
                         augmenter_factory=lambda: build_augmenter(augment))
    val = ImageBatches(images(6, seed=5), encode_targets(np.arange(6) % 3, 3), 8)
    for views, stored in ((2, 2), (5, 3)):
        model = build("vgg16", seed=0)
        stages = [StageConfig(epochs=3, unfreeze=0, patience=10)]
        run_stages(model, REGISTRY["vgg16"], stages, train, val, 3, verbose=1, seed=1,
                   cache=CacheConfig(enabled=True, views=views))
        output = capsys.readouterr().out
        assert "on cached features" in output
        assert f"({stored} view(s)" in output, output[-500:]
    model = build("vgg16", seed=0)
    run_stages(model, REGISTRY["vgg16"], [StageConfig(epochs=2, unfreeze=0)], train, val, 3, verbose=1, seed=1,
               cache=CacheConfig(enabled=False))
    assert "on cached features" not in capsys.readouterr().out


def test_final_validation_outputs_from_the_cache_equal_the_models():
    model = build("vgg16", seed=3)
    labels = np.arange(24) % 3
    train = ImageBatches(images(24), encode_targets(labels, 3), 8, shuffle=True, seed=1)
    val = ImageBatches(images(9, seed=5), encode_targets(np.arange(9) % 3, 3), 4)
    outputs = {}
    run_stages(model, REGISTRY["vgg16"], [StageConfig(epochs=2, unfreeze=0)], train, val, 3, verbose=0,
               seed=1, cache=CacheConfig(enabled=True), final_outputs=outputs)
    np.testing.assert_allclose(outputs["val"], model.predict(val, verbose=0), rtol=1e-4, atol=1e-5)
    run_stages(model, REGISTRY["vgg16"], [StageConfig(epochs=1, unfreeze=0)], train, val, 3, verbose=0,
               seed=1, cache=None, final_outputs=outputs)
    assert "val" not in outputs  # an uncached last stage leaves the model to predict
