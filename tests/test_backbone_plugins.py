"""Backbones that installed packages add through the ``transferkit.backbones`` entry point."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import transferkit_test_backbones  # tests/plugins/, on the path (tests/conftest.py)

import transferkit
from tests import forked
from transferkit.backbones import available_backbones, get_spec, load_backbone, plugin_source
from transferkit.errors import RecipeError, RunError, WeightsError

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
LONG = SMALL_CNN.__class__(**{**SMALL_CNN.__dict__, "name": "small-cnn-with-a-long-name"})
UPPER = SMALL_CNN.__class__(**{**SMALL_CNN.__dict__, "name": "Upper"})
TORCH = SMALL_CNN.__class__(**{**SMALL_CNN.__dict__, "name": "torch-pre", "preprocessing": "torch"})
NO_COUNT = SMALL_CNN.__class__(**{**SMALL_CNN.__dict__, "name": "no-count", "parameters": None})
'''

ENTRY_POINTS = """[transferkit.backbones]
small-cnn = my_nets:SMALL_CNN
broken = my_nets_missing:NET
text = my_nets:NOT_A_SPEC
misnamed = my_nets:RENAMED
vgg16 = my_nets:VGG16
small-cnn-with-a-long-name = my_nets:LONG
Upper = my_nets:UPPER
torch-pre = my_nets:TORCH
no-count = my_nets:NO_COUNT
"""


@pytest.fixture()
def installed(tmp_path):
    """A folder holding an installed package that adds two good backbones and seven faulty
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
    header = result.stdout.splitlines()[0]
    # One column each, however long a name: each row's size ends where the header's does.
    assert {row.index(" 64 ") + 3 for row in (rows["small-cnn"], rows["small-cnn-with-a-long-name"])} == \
        {header.index("default size") + len("default size")}
    assert rows["small-cnn"].split()[1:5] == ["64", "8", "2", "260"]
    assert rows["small-cnn"].endswith("none  (added by my-nets)")
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in rows["vgg16"]  # the built-in one stands
    assert not {"broken", "text", "misnamed", "other", "Upper", "upper", "torch-pre", "no-count"} & set(rows)
    warned = result.stderr
    assert "backbone plugin 'broken' (my_nets_missing:NET, package my-nets) failed to load (No module named " in warned
    assert "'text' (my_nets:NOT_A_SPEC, package my-nets) gives a str, not a transferkit.backbones.Backbone" in warned
    assert "'misnamed' (my_nets:RENAMED, package my-nets) names its backbone 'other'" in warned
    assert "'vgg16' (my_nets:VGG16, package my-nets) would replace the built-in backbone 'vgg16'" in warned
    assert "'Upper' (my_nets:UPPER, package my-nets) names its backbone 'Upper': backbone names are lower" in warned
    assert "'torch-pre' (my_nets:TORCH, package my-nets) has preprocessing 'torch': it must be one of caffe, " in warned
    assert "'no-count' (my_nets:NO_COUNT, package my-nets) has parameters None: it must be a whole number" in warned
    assert "Traceback" not in warned and "UserWarning" not in warned
    assert "warning: backbone plugin 'broken' (my_nets_missing:NET, package my-nets) failed" in warned  # the CLI's own


def test_a_plugin_backbone_trains_a_run_that_plain_keras_loads_without_the_plugin(tmp_path, shapes_dir, tiny):
    run = transferkit.finetune(shapes_dir, None, tiny, output=tmp_path / "run", verbose=0)
    assert run.recipe["backbone"] == "tinyvgg" and plugin_source("tinyvgg") == "transferkit-test-backbones"
    # The package is recorded, for whoever resumes or explains the run elsewhere.
    assert json.loads((run.path / "labels.json").read_text())["backbone_package"] == "transferkit-test-backbones"
    assert transferkit.load_run(run.path, with_model=False).backbone_package == "transferkit-test-backbones"
    card = (run.path / "MODEL_CARD.md").read_text()
    assert "a tinyvgg (from the package transferkit-test-backbones) backbone" in card
    assert "- **Backbone:** tinyvgg (added by the package transferkit-test-backbones)," in card
    moved = shutil.copytree(run.path, tmp_path / "moved")
    labels = json.loads((moved / "labels.json").read_text())
    (moved / "labels.json").write_text(json.dumps({**labels, "backbone": "gone-net", "backbone_package": "gone-nets"}))
    with pytest.raises(RunError, match=r"the run's backbone 'gone-net' is neither built in nor added by an installed "
                                       r"package; cannot find its last conv layer \(install the package that adds it "
                                       r"\(gone-nets\)\)"):
        transferkit.explain(moved, [shapes_dir / "circle" / sorted(os.listdir(shapes_dir / "circle"))[0]])
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
    with pytest.raises(RecipeError, match="backbone: backbone names are lower case: 'tinyvgg', not 'TinyVGG'"):
        transferkit.load_recipe(None, {"backbone": "TinyVGG"})


def _small(include_top=False, weights=None, input_shape=(32, 32, 3), *, fixed=False, lam=False, boom=False):
    import keras

    if boom:
        raise RuntimeError("the constructor broke")
    inputs = keras.Input((64, 64, 3) if fixed else input_shape)
    x = keras.layers.Conv2D(4, 3, name="stem_conv")(inputs)
    if lam:
        x = keras.layers.Lambda(lambda t: t * 2, name="double")(x)
    x = keras.layers.Conv2D(4, 3, name="top_conv")(x)
    return keras.Model(inputs, x)


def _plugin(name, constructor=_small, **changes):
    from transferkit.backbones import BackboneSpec

    facts = dict(name=name, constructor=constructor, preprocessing="caffe", min_size=8, default_size=32,
                 blocks=("stem", "top"), weights_file="", weights_origin="", last_conv="top_conv", parameters=260)
    return BackboneSpec(**{**facts, **changes})


FAULTY = {
    "boom": (_plugin("boom", lambda **k: _small(**k, boom=True)), "failed to build (the constructor broke)"),
    "fixed": (_plugin("fixed", lambda **k: _small(**k, fixed=True)),
              "it was asked for inputs of (32, 32, 3) and takes (64, 64, 3): it must build input_shape"),
    "none": (_plugin("none", lambda **k: None), "its constructor returned NoneType, not a keras.Model"),
    "lambda": (_plugin("lambda", lambda **k: _small(**k, lam=True)), "it holds a Lambda layer (double)"),
    "gap": (_plugin("gap", blocks=("stem", "middle", "top")), "its block 'middle' names none of its layers"),
    "uncovered": (_plugin("uncovered", blocks=("top",)),
                  "its layer(s) stem_conv lie in none of its blocks, so no unfreeze depth would train them"),
    "no-map": (_plugin("no-map", last_conv="head_conv"), "its last_conv 'head_conv' is not one of its layers"),
    "missing-app": (_plugin("missing-app", "NoSuchNet"), "names keras.applications.NoSuchNet, which this Keras lacks"),
}


@pytest.fixture()
def faulty_plugins(monkeypatch):
    """The installed plugins as ``FAULTY``'s (monkeypatched: building each is in-process)."""
    from transferkit import backbones

    monkeypatch.setattr(backbones, "_plugins", lambda: {name: (spec, "bad-nets") for name, (spec, _) in FAULTY.items()})


@pytest.mark.parametrize("name", sorted(FAULTY))
def test_a_plugin_whose_model_is_not_what_its_spec_says_is_one_error_naming_its_package(name, faulty_plugins):
    with pytest.raises(WeightsError) as raised:
        load_backbone(name, weights="none", input_shape=(32, 32, 3))
    message = str(raised.value)
    assert message.startswith(f"backbone {name!r} (added by bad-nets)") and FAULTY[name][1] in message, message
    assert "\n" not in message


def test_a_wrong_parameter_count_is_a_warning_and_the_command_line_tells_a_plugins_failure_in_one_line(
        faulty_plugins, tmp_path, shapes_dir, caplog):
    from typer.testing import CliRunner

    from transferkit import backbones
    from transferkit.cli import app

    FAULTY["counted"] = (_plugin("counted", parameters=123), "")
    try:
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            load_backbone("counted", weights="none", input_shape=(32, 32, 3))
    finally:
        del FAULTY["counted"]
    assert "backbone 'counted' (added by bad-nets) has 260 parameters; its spec says 123" in caplog.messages
    assert backbones.find_spec("boom") is not None
    result = CliRunner().invoke(app, ["finetune", str(shapes_dir), "--backbone", "boom", "--weights", "none",
                                      "--image-size", "32", "-o", str(tmp_path / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line == ("error: backbone 'boom' (added by bad-nets) failed to build (the constructor broke); the package "
                    "that adds it needs a fix; choose another backbone meanwhile")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("run*"))


# A package whose backbone holds a layer of its own, registered with Keras when the module is
# imported: its runs load where the package is installed, through transferkit importing it.
CUSTOM_NETS = '''
import keras

from transferkit.backbones import BackboneSpec


@keras.saving.register_keras_serializable(package="custom_nets")
class Doubled(keras.layers.Layer):
    def call(self, inputs):
        return inputs * 2.0


def custom_cnn(include_top=False, weights=None, input_shape=(32, 32, 3)):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, name="stem_conv")(inputs)
    x = Doubled(name="stem_doubled")(x)
    return keras.Model(inputs, keras.layers.Conv2D(4, 3, name="top_conv")(x))


CUSTOM_CNN = BackboneSpec(name="custom-cnn", constructor=custom_cnn, preprocessing="caffe", min_size=8,
                          default_size=32, blocks=("stem", "top"), weights_file="", weights_origin="",
                          last_conv="top_conv", parameters=260)
'''


def test_a_run_whose_backbone_has_a_registered_layer_loads_where_its_package_is_installed(
        tmp_path, shapes_dir, tiny, monkeypatch):
    from transferkit import backbones

    site = tmp_path / "site"
    (site / "custom_nets-0.1.dist-info").mkdir(parents=True)
    (site / "custom_nets.py").write_text(CUSTOM_NETS)
    (site / "custom_nets-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: custom-nets\n"
                                                                 "Version: 0.1\n")
    (site / "custom_nets-0.1.dist-info" / "entry_points.txt").write_text(
        "[transferkit.backbones]\ncustom-cnn = custom_nets:CUSTOM_CNN\n")
    monkeypatch.syspath_prepend(str(site))
    import custom_nets  # here as the entry point would import it (a fresh process below finds it so)

    monkeypatch.setattr(backbones, "_plugins", lambda: {"custom-cnn": (custom_nets.CUSTOM_CNN, "custom-nets")})
    run = transferkit.finetune(shapes_dir, None, {**tiny, "backbone": "custom-cnn"}, output=tmp_path / "run",
                               verbose=0)
    script = textwrap.dedent(f"""
        import sys, numpy as np, transferkit
        run = transferkit.load_run({str(run.path)!r})
        assert "custom_nets" in sys.modules
        np.save({str(tmp_path / "out.npy")!r}, run.model.predict(np.full((2, 32, 32, 3), 90.0), verbose=0))
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = forked.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               run.model.predict(np.full((2, 32, 32, 3), 90.0), verbose=0), atol=1e-6)
