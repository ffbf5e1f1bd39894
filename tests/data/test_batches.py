
import numpy as np

from transferkit.data.batches import ImageBatches
from transferkit.outputs import encode_targets


def test_batches_augment_reproducibly_and_reshuffle_each_epoch():
    from transferkit.data.augment import build_augmenter
    from transferkit.recipe import AugmentConfig

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 16, 3), dtype="uint8")
    targets = encode_targets(np.arange(10) % 2, 2)
    factory = lambda: build_augmenter(AugmentConfig(rotation=30.0))

    def make():
        return ImageBatches(images, targets, 4, shuffle=True, augmenter_factory=factory, seed=5)

    first, second = make(), make()
    np.testing.assert_array_equal(first[0][0], second[0][0])
    assert not np.array_equal(first[0][0], images[first.order[:4]].astype("float32"))
    order = first.order.copy()
    first.on_epoch_end()
    assert not np.array_equal(order, first.order)
    assert len(first) == 3 and first[2][0].shape[0] == 2
    weighted = ImageBatches(images, targets, 4, sample_weights=np.arange(10, dtype="float32"))
    assert weighted[0][2].tolist() == [0, 1, 2, 3]
