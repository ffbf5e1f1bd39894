"""Backbones that installed packages add through the ``transferkit.backbones`` entry point."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import transferkit_test_backbones  # tests/plugins/, on the path (tests/conftest.py)

import transferkit
from tests import forked
from transferkit.backbones import available_backbones, get_spec, load_backbone, plugin_source
from transferkit.errors import RecipeError, WeightsError

# A package as pip would leave it in site-packages: its module and its .dist-info folder.
NETS = '''
from transferkit.backbones import BackboneSpec


def small_cnn(include_top=False, weights=None, input_shape=(32, 32, 3)):
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, name="stem_conv")(inputs)
    x = keras.layers.Conv2D(4, 3, name="top_conv")(x)
    return keras.Model(inputs, x)


SMALL_CNN = BackboneSpec(name="small-cnn", constructor=small_cnn, preprocessing="included", min_size=8,
                         default_size=64, blocks=("stem", "top"), weights_file="", weights_origin="",
                         last_conv="top_conv", parameters=260)
NOT_A_SPEC = "small-cnn"
RENAMED = SMALL_CNN.__class__(**{**SMALL_CNN.__dict__, "name": "other"})
VGG16 = SMALL_CNN.__class__(**{**SMALL_CNN.__dict__, "name": "vgg16"})
'''

ENTRY_POINTS = """[transferkit.backbones]
small-cnn = my_nets:SMALL_CNN
broken = my_nets_missing:NET
text = my_nets:NOT_A_SPEC
misnamed = my_nets:RENAMED
vgg16 = my_nets:VGG16
"""


@pytest.fixture()
def installed(tmp_path):
    """A folder holding an installed package that adds one good backbone and four faulty
    entries."""
    site = tmp_path / "site"
    (site / "my_nets-0.1.dist-info").mkdir(parents=True)
    (site / "my_nets.py").write_text(NETS)
    (site / "my_nets-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-nets\nVersion: 0.1\n")
    (site / "my_nets-0.1.dist-info" / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def transferkit_command(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_an_installed_packages_backbone_is_listed_and_its_faulty_entries_are_left_out_with_a_warning(installed):
    result = transferkit_command(installed, "backbones")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["small-cnn"].split()[1:5] == ["64", "8", "2", "260"]
    assert rows["small-cnn"].endswith("none  (added by my-nets)")
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in rows["vgg16"]  # the built-in one stands
    assert not {"broken", "text", "misnamed", "other"} & set(rows)
    warned = result.stderr
    assert "backbone plugin 'broken' (my_nets_missing:NET, package my-nets) failed to load (No module named " in warned
    assert "'text' (my_nets:NOT_A_SPEC, package my-nets) gives a str, not a transferkit.backbones.Backbone" in warned
    assert "'misnamed' (my_nets:RENAMED, package my-nets) names its backbone 'other'" in warned
    assert "'vgg16' (my_nets:VGG16, package my-nets) would replace the built-in backbone 'vgg16'" in warned
    assert "Traceback" not in warned


def test_a_plugin_backbone_trains_a_run_that_plain_keras_loads_without_the_plugin(tmp_path, shapes_dir, tiny):
    run = transferkit.finetune(shapes_dir, None, tiny, output=tmp_path / "run", verbose=0)
    assert run.recipe["backbone"] == "tinyvgg" and plugin_source("tinyvgg") == "transferkit-test-backbones"
    assert run.model.get_layer("backbone").get_layer("block5_conv1").filters == transferkit_test_backbones.FILTERS[-1]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import sys, numpy as np, keras
        model = keras.models.load_model({str(run.path / "model.keras")!r})
        np.save({str(tmp_path / "out.npy")!r}, model.predict(np.load({str(tmp_path / "images.npy")!r}), verbose=0))
        assert not [name for name in sys.modules if name.startswith(("transferkit", "transferkit_test_backbones"))]
        """)
    result = forked.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), run.model.predict(images, verbose=0), atol=1e-6)


@pytest.mark.parametrize("name", ["tinyvgg", "tinyresnet"])
def test_the_suites_own_backbones_are_what_their_specs_say(name):
    """What the suite's tests lean on: the facts in each spec are those of the model built,
    every weighted layer is in a block, and tinyresnet's BatchNorm layers are where
    ResNet50's names put them."""
    spec = get_spec(name)
    backbone = load_backbone(name, weights="none", input_shape=(32, 32, 3))
    assert backbone.count_params() == spec.parameters and plugin_source(name) == "transferkit-test-backbones"
    assert backbone.get_layer(spec.last_conv).output.shape[1:3] == (2, 2)  # a map for Grad-CAM at 32 px
    weighted = [layer for layer in backbone.layers if layer.weights]
    assert all(spec.block_of(layer.name) is not None for layer in weighted)
    assert {spec.block_of(layer.name) for layer in weighted} == set(range(len(spec.blocks)))
    norms = [layer.name for layer in weighted if type(layer).__name__ == "BatchNormalization"]
    assert len(norms) == (0 if name == "tinyvgg" else 14)
    for norm in norms:  # each after the convolution of its name, as in ResNet50
        assert norm.endswith("_bn") and backbone.get_layer(norm[:-2] + "conv")


def test_a_plugin_without_imagenet_weights_says_so_and_an_unknown_name_says_how_to_add_one(tmp_path):
    with pytest.raises(WeightsError, match="tinyvgg has no ImageNet weights to download; pass --weights PATH to a "
                                           "weights file of a tinyvgg backbone, or --weights none"):
        load_backbone("tinyvgg", weights="imagenet", input_shape=(32, 32, 3))
    saved = load_backbone("tinyvgg", weights="none", input_shape=(32, 32, 3))
    saved.save_weights(tmp_path / "tiny.weights.h5")
    loaded = load_backbone("tinyvgg", weights=str(tmp_path / "tiny.weights.h5"), input_shape=(32, 32, 3))
    for expected, got in zip(saved.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(expected, got)
    with pytest.raises(WeightsError, match=r"unknown backbone 'small-cnn'; choose one of: .*tinyvgg, vgg16, vgg19 "
                                           r"\(a backbone another package adds is known once that package is"):
        get_spec("small-cnn")
    assert "tinyvgg" in available_backbones()
    with pytest.raises(RecipeError, match="backbone: unknown backbone 'TinyVGG'"):
        transferkit.load_recipe(None, {"backbone": "TinyVGG"})
