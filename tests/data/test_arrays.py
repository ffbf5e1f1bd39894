
import numpy as np
import pytest

from transferkit.data.arrays import balanced_class_weights, stratified_split
from transferkit.errors import DataError


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = np.array([0] * 10 + [1] * 30)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, val])) == list(range(40))
    assert np.bincount(labels[val]).tolist() == [2, 6]
    again_train, again_val = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(val, again_val)
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=4)[1])


def test_split_needs_two_images_per_class():
    with pytest.raises(DataError, match="at least 2 per class"):
        stratified_split(np.array([0, 0, 1]), 0.2, seed=0)


def test_class_weights_balance_the_classes():
    labels = np.array([0] * 30 + [1] * 10)
    weights = balanced_class_weights(labels, 2)
    assert weights[1] == pytest.approx(3 * weights[0])
    assert (weights[labels]).sum() == pytest.approx(len(labels))




def test_image_array_spills_beyond_its_budget_and_leaves_no_file(tmp_path, caplog):
    import logging

    from transferkit.data.arrays import image_array, partition_rows

    with caplog.at_level(logging.DEBUG, logger="transferkit"):
        in_memory = image_array(4, 8, memory_budget_mb=1)
        assert type(in_memory) is np.ndarray and "memory-mapped" not in caplog.text
        spilled = image_array(4, 8, memory_budget_mb=1e-4, spill_dir=tmp_path)
    assert isinstance(spilled, np.memmap)
    # told with -v (debug): where the images went, and why
    assert f"above data.memory_mb (0.0001 MB): memory-mapped from a temporary file in {tmp_path}" in caplog.text
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped; freed with the array
    spilled[:] = np.arange(4 * 8 * 8 * 3).reshape(4, 8, 8, 3) % 251
    before = np.array(spilled)
    (taken,) = partition_rows(spilled, [np.array([3, 1])])
    assert isinstance(taken, np.memmap)
    np.testing.assert_array_equal(taken, before[[3, 1]])
    assert [path.name for path in tmp_path.iterdir() if path.name != "keras-home"] == []


@pytest.mark.parametrize("seed", range(5))
def test_partition_rows_gives_each_group_in_place(seed):
    from transferkit.data.arrays import partition_rows

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (23, 2, 2, 3), dtype="uint8")
    rows = rng.permutation(23)
    groups = [np.sort(rows[:14]), np.sort(rows[14:20])]  # rows[20:] belong to no group
    expected = [images[group].copy() for group in groups]
    original = images.copy()
    views = partition_rows(images, groups)
    for view, wanted in zip(views, expected, strict=False):
        np.testing.assert_array_equal(view, wanted)
        assert np.shares_memory(view, images)  # a view: no second copy of the images
    # the rows in no group are still there: the array is a permutation of its old rows
    assert sorted(row.tobytes() for row in images) == sorted(row.tobytes() for row in original)
