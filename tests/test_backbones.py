import urllib.error

import h5py
import numpy as np
import pytest

from transferkit.backbones import REGISTRY, available_backbones, load_backbone
from transferkit.errors import WeightsError


def test_registry_lists_the_three_backbones():
    assert available_backbones() == ["resnet50", "vgg16", "vgg19"]


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50"])
def test_load_with_random_weights_every_layer_has_a_block(name):
    backbone = load_backbone(name, weights="none", input_shape=(32, 32, 3))
    spec = REGISTRY[name]
    assert backbone.name == "backbone"
    assert backbone.output_shape[1:3] == (1, 1)
    weighted = [layer for layer in backbone.layers if layer.weights]
    assert all(spec.block_of(layer.name) is not None for layer in weighted)
    # Every block holds at least one layer with weights.
    assert {spec.block_of(layer.name) for layer in weighted} == set(range(len(spec.blocks)))


def test_unknown_backbone_and_too_small_input():
    with pytest.raises(WeightsError, match="choose one of: resnet50, vgg16, vgg19"):
        load_backbone("mobilenet", weights="none")
    with pytest.raises(WeightsError, match="at least 32x32x3"):
        load_backbone("vgg16", weights="none", input_shape=(16, 16, 3))


def test_weights_file_round_trip_keras3_format(tmp_path):
    source = load_backbone("vgg16", weights="none", input_shape=(32, 32, 3))
    path = tmp_path / "vgg16.weights.h5"
    source.save_weights(path)
    loaded = load_backbone("vgg16", weights=str(path), input_shape=(32, 32, 3))
    for saved, got in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(saved, got)


def write_legacy_h5(model, path):
    """The layout of Keras's own downloaded notop files (legacy HDF5 weights)."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


def test_weights_file_round_trip_legacy_h5_as_keras_downloads_them(tmp_path):
    source = load_backbone("resnet50", weights="none", input_shape=(32, 32, 3))
    path = tmp_path / "resnet50_notop.h5"
    write_legacy_h5(source, path)
    loaded = load_backbone("resnet50", weights=path, input_shape=(64, 64, 3))
    for saved, got in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(saved, got)


def test_weights_of_another_backbone_are_refused(tmp_path):
    other = load_backbone("vgg19", weights="none", input_shape=(32, 32, 3))
    path = tmp_path / "vgg19.h5"
    write_legacy_h5(other, path)
    with pytest.raises(WeightsError, match="does not fit the vgg16 backbone"):
        load_backbone("vgg16", weights=path, input_shape=(32, 32, 3))


def test_corrupt_and_missing_weights_files(tmp_path):
    corrupt = tmp_path / "broken.h5"
    corrupt.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(WeightsError, match="does not fit the vgg16 backbone"):
        load_backbone("vgg16", weights=corrupt, input_shape=(32, 32, 3))
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("vgg16", weights=tmp_path / "missing.h5", input_shape=(32, 32, 3))
    wrong_kind = tmp_path / "weights.npz"
    wrong_kind.write_bytes(b"x")
    with pytest.raises(WeightsError, match="not a .h5"):
        load_backbone("vgg16", weights=wrong_kind, input_shape=(32, 32, 3))


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_failed_download_names_file_folder_and_alternatives(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    requested = []

    def no_network(url, *args, **kwargs):
        requested.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    from keras.src.utils import file_utils

    # Keras fetches with urllib's urlretrieve; cut it where Keras calls it.
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(WeightsError) as info:
        load_backbone(name, weights="imagenet", input_shape=(32, 32, 3))
    spec = REGISTRY[name]
    message = str(info.value)
    assert requested == [spec.weights_origin]  # the real download path was taken
    assert spec.weights_file in message
    assert str(tmp_path / "keras-home" / "models") in message
    assert "--weights PATH" in message and "--weights none" in message
    assert "\n" not in message
