import functools
import urllib.error
import urllib.request
import warnings

import h5py
import keras
import numpy as np
import pytest

from transferkit.backbones import REGISTRY, available_backbones, load_backbone
from transferkit.errors import ExportError, WeightsError

NEW_FAMILIES = [
    "efficientnetv2-b0", "efficientnetv2-b1", "efficientnetv2-b2", "efficientnetv2-b3", "efficientnetv2-s",
    "convnext-tiny", "convnext-small", "mobilenetv3-small", "mobilenetv3-large",
]


def test_registry_lists_every_backbone():
    # With the suite's own backbones, which tests/plugins adds as an installed package would.
    assert sorted(REGISTRY) == sorted(["resnet50", "vgg16", "vgg19", *NEW_FAMILIES])
    assert available_backbones() == sorted([*REGISTRY, "tinyresnet", "tinyvgg"])


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
    with pytest.raises(WeightsError,
                       match="choose one of: convnext-small, .*, resnet50, tinyresnet, tinyvgg, vgg16, vgg19"):
        load_backbone("mobilenet", weights="none")
    with pytest.raises(WeightsError, match="at least 32x32x3"):
        load_backbone("vgg16", weights="none", input_shape=(16, 16, 3))
    with pytest.raises(WeightsError, match="takes RGB images: input_shape needs 3 channels, got 1"):
        load_backbone("vgg16", weights="none", input_shape=(32, 32, 1))
    for shape in ((32, 32), (None, None, 3), (32.5, 32, 3)):
        with pytest.raises(WeightsError, match=r"give \(height, width, 3\) in whole pixels, e.g. \(224, 224, 3\)"):
            load_backbone("vgg16", weights="none", input_shape=shape)


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


def test_weights_of_another_backbone_are_refused_in_one_error_without_kerass_warnings(tmp_path):
    import warnings

    other = load_backbone("vgg19", weights="none", input_shape=(32, 32, 3))
    path = tmp_path / "vgg19.h5"
    write_legacy_h5(other, path)
    with pytest.raises(WeightsError, match="does not fit the vgg16 backbone"):
        load_backbone("vgg16", weights=path, input_shape=(32, 32, 3))
    # a file of another family (Keras 3's own format): Keras warns of each part it skips, then fails
    mobilenet = load_backbone("mobilenetv3-small", weights="none", input_shape=(32, 32, 3))
    path = tmp_path / "mobilenet.weights.h5"
    mobilenet.save_weights(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WeightsError, match=r"does not fit the vgg16 backbone \(Layer 'block1_conv1' expected 2 "
                           r"variables, but received 1 .*; 13 objects could not be loaded\); pass the Keras notop"):
            load_backbone("vgg16", weights=path, input_shape=(32, 32, 3))
    assert [str(warning.message) for warning in caught if "Skipping" in str(warning.message)] == []
    # ResNet50's (Keras 3's format): the first layer whose shapes differ, named with both shapes
    resnet = load_backbone("resnet50", weights="none", input_shape=(32, 32, 3))
    path = tmp_path / "resnet50.weights.h5"
    resnet.save_weights(path)
    with pytest.raises(WeightsError, match=r"does not fit the vgg16 backbone \(block1_conv1/kernel is \(3, 3, 3, 64\) "
                       r"here, \(7, 7, 3, 64\) in the file; 13 objects could not be loaded\); pass"):
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


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """A Keras home of the test's own: Keras read KERAS_HOME when it was imported and keeps
    it (what ``keras_private.keras_home`` reads)."""
    from keras.src.backend import config

    home = tmp_path / "keras-home"
    home.mkdir()
    monkeypatch.setattr(config, "_KERAS_DIR", str(home))
    return home


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "efficientnetv2-b0", "convnext-tiny", "mobilenetv3-small"])
def test_failed_download_names_file_folder_and_alternatives(name, tmp_path, keras_home, monkeypatch):
    requested = []

    def no_network(url, *args, **kwargs):
        requested.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    from keras.src.utils import file_utils

    # Keras fetches with urllib's urlretrieve; cut it where Keras calls it.
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(WeightsError) as info:
        warnings.simplefilter("always")
        load_backbone(name, weights="imagenet", input_shape=(32, 32, 3))
    # (MobileNetV3's builder warns that its 224 px weights load at 32 px: the one file, which fits.)
    assert not [str(warning.message) for warning in caught if "224" in str(warning.message)]
    spec = REGISTRY[name]
    message = str(info.value)
    assert requested == [spec.weights_origin]  # the real download path was taken
    assert spec.weights_file in message
    assert str(tmp_path / "keras-home" / "models") in message
    assert "--weights PATH" in message and "--weights none" in message
    assert "\n" not in message


def test_a_silent_server_is_given_up_after_the_download_timeout(keras_home, monkeypatch):
    """Through a proxy that accepts the connection and never answers, urllib would wait forever."""
    import socket
    import threading
    import time

    import transferkit.backbones

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{silent.getsockname()[1]}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(transferkit.backbones, "DOWNLOAD_TIMEOUT", 0.5)
    # urllib builds its default opener, proxies included, at its first use in the process:
    # made again now, it takes the proxy above (and again after, without it).
    urllib.request.install_opener(None)
    started = time.monotonic()
    try:
        with pytest.raises(WeightsError, match="could not download the ImageNet weights for vgg16 .*timed out"):
            load_backbone("vgg16", weights="imagenet", input_shape=(32, 32, 3))
    finally:
        silent.close()
        urllib.request.install_opener(None)
    assert time.monotonic() - started < 30 and held  # the proxy was reached, and given up on
    assert socket.getdefaulttimeout() is None  # the process's own setting is put back


def test_a_cached_file_keras_rejects_and_removes_is_told_as_such(keras_home, monkeypatch):
    cached = keras_home / "models" / REGISTRY["vgg16"].weights_file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    from keras.src.utils import file_utils

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(WeightsError, match=f"the cached ImageNet weights {cached} did not match Keras's checksum .*"
                                           "Keras removed it .*Put the original"):
        load_backbone("vgg16", weights="imagenet", input_shape=(32, 32, 3))
    assert not cached.exists()


# --- the EfficientNetV2, ConvNeXt and MobileNetV3 families: registry facts against Keras ---


@functools.cache
def built(name):
    """The backbone at its minimum size, built once per test process."""
    return load_backbone(name, weights="none", input_shape=(REGISTRY[name].min_size,) * 2 + (3,))


def leaf_layers(model):
    for layer in model.layers:
        yield from leaf_layers(layer) if isinstance(layer, keras.Model) else (layer,)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_backbone_facts_match_what_keras_builds(name):
    spec, backbone = REGISTRY[name], built(name)
    assert spec.preprocessing == "included"  # Keras's Rescaling / Normalization inside the backbone
    assert spec.parameters == backbone.count_params()
    # Keras's own minimum: one pixel less is refused by the Keras constructor itself.
    with pytest.raises(ValueError, match="at least 32x32"):
        getattr(keras.applications, spec.constructor)(include_top=False, weights=None,
                                                      input_shape=(spec.min_size - 1, spec.min_size - 1, 3))
    # Every layer with weights is in a block (nested ones through their container's name, as
    # set_trainable sets them), and every block holds weights.
    blocks = {}
    for layer in backbone.layers:
        if layer.weights:
            assert spec.block_of(layer.name) is not None, layer.name
            blocks.setdefault(spec.block_of(layer.name), []).append(layer.name)
    assert sorted(blocks) == list(range(len(spec.blocks)))
    # Blocks run from the input to the output: each block's first layer comes after the last
    # layer of the block before it.
    order = [spec.block_of(layer.name) for layer in backbone.layers if spec.block_of(layer.name) is not None]
    assert order == sorted(order)
    # Grad-CAM's layer: a spatial map, and the one the head reads.
    conv = backbone.get_layer(spec.last_conv)
    assert len(conv.output.shape) == 4 and conv is backbone.layers[-1]
    # Only the layers with weights of batch statistics are BatchNormalization (ConvNeXt: none).
    has_batchnorm = any(isinstance(layer, keras.layers.BatchNormalization) for layer in leaf_layers(backbone))
    assert has_batchnorm == (not name.startswith("convnext"))


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_backbone_weights_file_is_the_one_keras_downloads(name):
    """The file name and origin as Keras's application module computes them (its
    BASE_WEIGHTS_PATH and its naming rule), for the offline instructions."""
    import inspect

    from keras.src.applications import convnext, efficientnet_v2, mobilenet_v3

    spec = REGISTRY[name]
    constructor = getattr(keras.applications, spec.constructor)
    if name.startswith("mobilenetv3"):
        variant = name.split("-")[1]
        model_name = f"{variant}_224_1.0_float"
        assert model_name in mobilenet_v3.WEIGHTS_HASHES
        expected = f"weights_mobilenet_v3_{model_name}_no_top_v2.h5"
        base = mobilenet_v3.BASE_WEIGHT_PATH
    else:
        module = convnext if name.startswith("convnext") else efficientnet_v2
        keras_name = inspect.signature(constructor).parameters["name"].default
        expected, base = f"{keras_name}_notop.h5", module.BASE_WEIGHTS_PATH
    assert spec.weights_file == expected
    assert spec.weights_origin == base + expected


def test_block_of_takes_the_longest_prefix():
    mobilenet = REGISTRY["mobilenetv3-small"]
    assert mobilenet.blocks[mobilenet.block_of("conv_bn")] == "conv"
    assert mobilenet.blocks[mobilenet.block_of("conv_1_bn")] == "conv_1"
    assert mobilenet.blocks[mobilenet.block_of("expanded_conv_1_expand")] == "expanded_conv_1"
    assert mobilenet.blocks[mobilenet.block_of("expanded_conv_10_add")] == "expanded_conv_10"
    assert mobilenet.blocks[mobilenet.block_of("expanded_conv_squeeze_excite_mul")] == "expanded_conv"
    small = REGISTRY["convnext-small"]
    block = small.block_of("convnext_small_stage_2_block_20_layernorm")
    assert small.blocks[block] == "convnext_small_stage_2_block_20"
    assert small.block_of("convnext_small_prestem_normalization") is None  # no weights that train


def test_formats_a_backbone_cannot_be_written_in_are_refused_in_one_line():
    with pytest.raises(ExportError) as info:
        REGISTRY["convnext-tiny"].require_format("onnx")
    message = str(info.value)
    assert "convnext-tiny cannot be written as onnx" in message and "openvino" in message and "\n" not in message
    with pytest.raises(ExportError, match="mobilenetv3-small cannot be written as h5"):
        REGISTRY["mobilenetv3-small"].require_format("h5")
    assert REGISTRY["efficientnetv2-b0"].require_format("onnx") and REGISTRY["vgg16"].require_format("h5")
