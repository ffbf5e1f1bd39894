"""Pretrained backbones: one registry of per-architecture facts, and weight resolution.

    from transferkit.backbones import load_backbone, available_backbones
    backbone = load_backbone("resnet50", weights="imagenet", input_shape=(224, 224, 3))

Weights are one of:
- ``"imagenet"``: Keras's own download and cache (``$KERAS_HOME/models`` or
  ``~/.keras/models``); a file already in the cache is used with no network.
- a path to a local ``.h5`` / ``.weights.h5`` file (Keras's own notop file copied from a
  machine with internet, or weights saved from a backbone of the same architecture).
- ``"none"``: random initialisation.

Other packages add backbones through the ``transferkit.backbones`` entry-point group: each
entry names a ``BackboneSpec`` (or a function returning one) whose ``constructor`` is a
callable with keras.applications' signature. In the package's pyproject.toml::

    [project.entry-points."transferkit.backbones"]
    small-cnn = "my_package.nets:SMALL_CNN"

Once the package is installed, "small-cnn" is a backbone name like the built-in ones.
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import ExportError, WeightsError, first_line

WEIGHTS_CHOICES = ("imagenet", "none")
# The names a weights file may have (Keras's legacy .h5, as its notop downloads are, or .weights.h5).
WEIGHTS_FILE_SUFFIXES = (".h5", ".hdf5")
log = logging.getLogger("transferkit")


@dataclass(frozen=True)
class BackboneSpec:
    """What transferkit needs to know about one backbone architecture.

    Attributes:
        name: registry name used in recipes and on the command line (lower case).
        constructor: what builds it: the name of a ``keras.applications`` attribute, or a
            callable taking the same keywords (``include_top=False, weights=None,
            input_shape=(height, width, 3)``) and returning a ``keras.Model`` (a plugin's
            own architecture; built from Keras's own layers, its runs load in plain Keras).
        preprocessing: input convention the ImageNet weights expect, which transferkit's
            "preprocessing" layer applies: "caffe" (BGR, mean subtracted, no scaling), or
            "included" (the Keras model scales and normalises RGB 0..255 itself, with its
            own Rescaling / Normalization layers: the pixels pass as they are).
        min_size: smallest input height/width Keras accepts without the top.
        default_size: the size the ImageNet weights were trained at.
        blocks: layer-name prefixes from the input to the output; unfreezing N blocks makes
            the last N of these trainable.
        weights_file: the file name Keras downloads for the ImageNet notop weights ("" for
            an architecture without ImageNet weights to download).
        weights_origin: where Keras downloads it from ("" where there is none).
        last_conv: the last convolutional layer's output that keeps a spatial map (where
            Grad-CAM looks).
        parameters: weights without the top, counted from the built model (a listing
            answers at once; a test checks the figure against Keras).
        output_layer: the name ``load_backbone`` gives the backbone's last layer where
            Keras leaves it an automatic name ("layer_normalization_3"), which depends on
            what else the process built; "" where Keras names it.
        unsupported_formats: (export format, why it cannot hold this backbone) pairs: the
            formats whose files of it fail to load back or convert (``--save-h5`` is the
            "h5" format).
    """

    name: str
    constructor: str | Callable
    preprocessing: str
    min_size: int
    default_size: int
    blocks: tuple[str, ...]
    weights_file: str
    weights_origin: str
    last_conv: str
    parameters: int
    output_layer: str = ""
    unsupported_formats: tuple[tuple[str, str], ...] = ()

    def first_unfrozen(self, unfreeze: int | str) -> int:
        """Index of the first block that trains for an unfreeze depth (0, N or "all");
        ``len(blocks)`` when the backbone stays frozen."""
        depth = len(self.blocks) if unfreeze == "all" else int(unfreeze)
        return len(self.blocks) - depth

    def block_of(self, layer_name: str) -> int | None:
        """Index into ``blocks`` of the block a layer belongs to, or None (input layers).

        The longest prefix wins: MobileNetV3's ``conv_1_bn`` is in ``conv_1``, not in the
        stem ``conv``."""
        found, length = None, -1
        for index, prefix in enumerate(self.blocks):
            if (layer_name == prefix or layer_name.startswith(prefix + "_")) and len(prefix) > length:
                found, length = index, len(prefix)
        return found

    def require_format(self, format: str, alternatives: str = "keras, savedmodel, openvino or litert") -> bool:
        """Check that this backbone's model can be written in an export format.

        Args:
            format: an export format name ("h5", "onnx", ...).
            alternatives: the formats the message offers instead.

        Returns:
            True.

        Raises:
            ExportError: the format cannot hold this backbone (``unsupported_formats``).
        """
        reason = dict(self.unsupported_formats).get(format)
        if reason is not None:
            raise ExportError(f"{self.name} cannot be written as {format}: {reason}; use {alternatives} instead")
        return True


_KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"

_RESNET50_BLOCKS = ("conv1",) + tuple(
    f"conv{stage}_block{block}"
    for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
    for block in range(1, count + 1)
)


def _efficientnetv2_blocks(depths: tuple[int, ...]) -> tuple[str, ...]:
    """The stem, each MBConv block ("block1a" .. "block6h": stage number, then a letter per
    repeat) and the top 1x1 convolution, for the repeats per stage Keras builds."""
    return ("stem",) + tuple(
        f"block{stage}{chr(ord('a') + repeat)}"
        for stage, count in enumerate(depths, start=1)
        for repeat in range(count)
    ) + ("top",)


def _convnext_blocks(prefix: str, depths: tuple[int, ...]) -> tuple[str, ...]:
    """The stem, each ConvNeXt block, the downsampling layer before stages 1..3 (each its own
    block) and the LayerNormalization over the output (named by ``output_layer``)."""
    blocks = [f"{prefix}_stem"]
    for stage, count in enumerate(depths):
        if stage:
            blocks.append(f"{prefix}_downsampling_block_{stage - 1}")
        blocks.extend(f"{prefix}_stage_{stage}_block_{block}" for block in range(count))
    return (*blocks, f"{prefix}_top_layernorm")


def _mobilenetv3_blocks(inverted_residuals: int) -> tuple[str, ...]:
    """The stem convolution, the inverted residual blocks and the last 1x1 convolution."""
    return ("conv", "expanded_conv") + tuple(
        f"expanded_conv_{index}" for index in range(1, inverted_residuals)
    ) + ("conv_1",)


def _efficientnetv2(variant: str, default_size: int, depths: tuple[int, ...], parameters: int) -> BackboneSpec:
    keras_name = f"efficientnetv2-{variant}"
    return BackboneSpec(
        name=keras_name,
        constructor=f"EfficientNetV2{variant.upper()}",
        preprocessing="included",
        min_size=32,
        default_size=default_size,
        blocks=_efficientnetv2_blocks(depths),
        weights_file=f"{keras_name}_notop.h5",
        weights_origin=_KERAS_APPLICATIONS + f"efficientnet_v2/{keras_name}_notop.h5",
        last_conv="top_activation",
        parameters=parameters,
    )


def _convnext(variant: str, depths: tuple[int, ...], parameters: int) -> BackboneSpec:
    keras_name = f"convnext_{variant}"
    return BackboneSpec(
        name=f"convnext-{variant}",
        constructor=f"ConvNeXt{variant.capitalize()}",
        preprocessing="included",
        min_size=32,
        default_size=224,
        blocks=_convnext_blocks(keras_name, depths),
        weights_file=f"{keras_name}_notop.h5",
        weights_origin=_KERAS_APPLICATIONS + f"convnext/{keras_name}_notop.h5",
        last_conv=f"{keras_name}_top_layernorm",
        parameters=parameters,
        output_layer=f"{keras_name}_top_layernorm",
        unsupported_formats=(
            ("onnx", "tf2onnx cannot convert its grouped 7x7 convolutions and exact GELU"),
            ("h5", "its LayerScale layers (keras.src.applications.convnext) are not registered, so the "
                   "legacy HDF5 file does not load"),
        ),
    )


def _mobilenetv3(variant: str, inverted_residuals: int, parameters: int) -> BackboneSpec:
    weights_file = f"weights_mobilenet_v3_{variant}_224_1.0_float_no_top_v2.h5"
    return BackboneSpec(
        name=f"mobilenetv3-{variant}",
        constructor=f"MobileNetV3{variant.capitalize()}",
        preprocessing="included",
        min_size=32,
        default_size=224,
        blocks=_mobilenetv3_blocks(inverted_residuals),
        weights_file=weights_file,
        weights_origin=_KERAS_APPLICATIONS + f"mobilenet_v3/{weights_file}",
        last_conv="conv_1_activation",
        parameters=parameters,
        output_layer="conv_1_activation",
        unsupported_formats=(
            ("h5", "its hard sigmoid (keras.ops with a constant argument) does not load from the legacy HDF5 "
                   "format"),
        ),
    )


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="vgg16",
            constructor="VGG16",
            preprocessing="caffe",
            min_size=32,
            default_size=224,
            blocks=("block1", "block2", "block3", "block4", "block5"),
            weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_origin=_KERAS_APPLICATIONS
            + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            last_conv="block5_conv3",
            parameters=14_714_688,
        ),
        BackboneSpec(
            name="vgg19",
            constructor="VGG19",
            preprocessing="caffe",
            min_size=32,
            default_size=224,
            blocks=("block1", "block2", "block3", "block4", "block5"),
            weights_file="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_origin=_KERAS_APPLICATIONS
            + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            last_conv="block5_conv4",
            parameters=20_024_384,
        ),
        BackboneSpec(
            name="resnet50",
            constructor="ResNet50",
            preprocessing="caffe",
            min_size=32,
            default_size=224,
            blocks=_RESNET50_BLOCKS,
            weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_origin=_KERAS_APPLICATIONS
            + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            last_conv="conv5_block3_out",
            parameters=23_587_712,
        ),
        # Repeats per stage as Keras scales them for each variant (B0's are the base ones).
        _efficientnetv2("b0", 224, (1, 2, 2, 3, 5, 8), 5_919_312),
        _efficientnetv2("b1", 240, (2, 3, 3, 4, 6, 9), 6_931_124),
        _efficientnetv2("b2", 260, (2, 3, 3, 4, 6, 10), 8_769_374),
        _efficientnetv2("b3", 300, (2, 3, 3, 5, 7, 12), 12_930_622),
        _efficientnetv2("s", 384, (2, 4, 4, 6, 9, 15), 20_331_360),
        _convnext("tiny", (3, 3, 9, 3), 27_820_128),
        _convnext("small", (3, 3, 27, 3), 49_454_688),
        _mobilenetv3("small", 11, 939_120),
        _mobilenetv3("large", 15, 2_996_352),
    )
}


# The entry-point group through which other packages add backbones.
PLUGIN_GROUP = "transferkit.backbones"


def available_backbones() -> list[str]:
    """Names of the backbones transferkit can load, sorted: the built-in ones and those
    installed packages add (``PLUGIN_GROUP``).

    Returns:
        A list such as ``["convnext-small", ..., "resnet50", "vgg16", "vgg19"]``.
    """
    return sorted({*REGISTRY, *plugin_backbones()})


def find_spec(name: str) -> BackboneSpec | None:
    """The entry for a backbone name (case-insensitive), built-in or a plugin's, or None."""
    key = name.lower()
    found = _plugins().get(key)
    return REGISTRY.get(key) or (found[0] if found is not None else None)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for a backbone name.

    Args:
        name: a name from ``available_backbones()`` (case-insensitive).

    Returns:
        Its ``BackboneSpec``.

    Raises:
        WeightsError: no built-in backbone or installed plugin has that name.
    """
    spec = find_spec(name)
    if spec is None:
        raise WeightsError(unknown_backbone(name))
    return spec


def unknown_backbone(name: str) -> str:
    """The message for a backbone name nothing provides."""
    return (f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())} (a backbone another "
            f"package adds is known once that package is installed)")


def plugin_backbones() -> dict[str, BackboneSpec]:
    """The backbones installed packages add, by name (see ``_plugins``)."""
    return {name: spec for name, (spec, _) in _plugins().items()}


def plugin_source(name: str) -> str | None:
    """The package (or, without one, the module) that adds a plugin backbone; None for a
    built-in or unknown name."""
    found = _plugins().get(name.lower())
    return found[1] if found is not None else None


@functools.cache
def _plugins() -> dict[str, tuple[BackboneSpec, str]]:
    """The backbones installed packages add, by name: each entry point of ``PLUGIN_GROUP``
    loaded once per process. One that fails to load, is not a ``BackboneSpec``, has
    another name than its entry point, or would replace a built-in backbone or an earlier
    plugin's, is left out with a warning naming it and its package."""
    from importlib.metadata import entry_points

    found: dict[str, tuple[BackboneSpec, str]] = {}
    for point in entry_points(group=PLUGIN_GROUP):
        package = point.dist.name if point.dist is not None else point.module
        source = f"backbone plugin {point.name!r} ({point.value}, package {package})"
        try:
            spec = point.load()
            if callable(spec) and not isinstance(spec, BackboneSpec):
                spec = spec()
        except Exception as error:  # a plugin's own code: anything it raises leaves it out
            log.warning("%s failed to load (%s); it is left out", source, first_line(error))
            continue
        if not isinstance(spec, BackboneSpec):
            problem = f"gives a {type(spec).__name__}, not a transferkit.backbones.BackboneSpec"
        elif (problem := _spec_problem(spec)) is not None:
            pass
        elif spec.name != point.name.lower():
            problem = f"names its backbone {spec.name!r}: the entry point's name must be the backbone's"
        elif spec.name in REGISTRY:
            problem = f"would replace the built-in backbone {spec.name!r}"
        elif spec.name in found:
            problem = f"would replace the backbone {spec.name!r} that package {found[spec.name][1]} adds"
        else:
            found[spec.name] = (spec, package)
            continue
        log.warning("%s %s; it is left out", source, problem)
    return found


# The input conventions ``BackboneSpec.preprocessing`` names (model.classifier builds each).
PREPROCESSING = ("caffe", "included")


def _spec_problem(spec: BackboneSpec) -> str | None:
    """What makes a plugin's spec unusable as written (before anything is built), or None."""
    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1

    if not isinstance(spec.name, str) or not spec.name or spec.name != spec.name.lower():
        return f"names its backbone {spec.name!r}: backbone names are lower case"
    if not (isinstance(spec.constructor, str) or callable(spec.constructor)):
        return "has a constructor that is neither a callable nor the name of a keras.applications model"
    if spec.preprocessing not in PREPROCESSING:
        return f"has preprocessing {spec.preprocessing!r}: it must be one of {', '.join(PREPROCESSING)}"
    if not (isinstance(spec.blocks, tuple) and spec.blocks and all(isinstance(b, str) and b for b in spec.blocks)):
        return f"has blocks {spec.blocks!r}: they must be a non-empty tuple of layer-name prefixes"
    for name in ("min_size", "default_size", "parameters"):
        if not whole(getattr(spec, name)):
            return f"has {name} {getattr(spec, name)!r}: it must be a whole number of at least 1"
    for name in ("weights_file", "weights_origin", "last_conv", "output_layer"):
        if not isinstance(getattr(spec, name), str):
            return f"has {name} {getattr(spec, name)!r}: it must be a string"
    if not spec.last_conv:
        return "has no last_conv: the name of its last layer that keeps a spatial map"
    pairs = spec.unsupported_formats
    if not (isinstance(pairs, tuple) and all(isinstance(pair, tuple) and len(pair) == 2
                                             and all(isinstance(part, str) for part in pair) for pair in pairs)):
        return f"has unsupported_formats {pairs!r}: they must be a tuple of (format, why) pairs of strings"
    return None


def _plugin_model_problem(spec: BackboneSpec, model, shape: tuple[int, int, int]) -> str | None:
    """What makes the model a plugin's constructor built unusable as its spec describes it,
    or None."""
    import keras

    if not isinstance(model, keras.Model):
        return f"its constructor returned {type(model).__name__}, not a keras.Model"
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 4:
        return (f"it outputs {[tuple(output.shape) for output in model.outputs]}, not one feature map "
                "(batch, height, width, channels)")
    if tuple(model.input_shape[1:]) != shape:
        return f"it was asked for inputs of {shape} and takes {tuple(model.input_shape[1:])}: it must build input_shape"
    lambdas = [layer.name for layer in _every_layer(model) if isinstance(layer, keras.layers.Lambda)]
    if lambdas:
        return (f"it holds a Lambda layer ({lambdas[0]}), which transferkit refuses to load from a saved run (it "
                "would run code from the file); build it from Keras layers")
    names = {layer.name for layer in model.layers}
    if spec.last_conv not in names and spec.output_layer != spec.last_conv:
        return f"its last_conv {spec.last_conv!r} is not one of its layers"
    blocks = {spec.block_of(layer.name) for layer in model.layers}
    empty = [prefix for index, prefix in enumerate(spec.blocks) if index not in blocks]
    if empty:
        return f"its block {empty[0]!r} names none of its layers (blocks are layer-name prefixes)"
    outside = [layer.name for layer in model.layers if layer.weights and spec.block_of(layer.name) is None]
    if outside:
        return (f"its layer(s) {', '.join(outside[:3])} lie in none of its blocks, so no unfreeze depth would "
                "train them")
    return None


def _every_layer(model):
    """A model's layers and those of the models nested in it."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _every_layer(layer)


def _plugin_named(spec: BackboneSpec) -> str:
    """A plugin's backbone as its messages name it: with the package that adds it."""
    return f"backbone {spec.name!r} (added by {plugin_source(spec.name)})"


def _guarded(spec: BackboneSpec, constructor: Callable, shape: tuple[int, int, int]) -> Callable:
    """A plugin's constructor, whose failures (its own exceptions, a model unlike its spec)
    are one ``WeightsError`` naming the package."""
    maker = _plugin_named(spec)
    remedy = "the package that adds it needs a fix; choose another backbone meanwhile"

    def build(**keywords):
        try:
            model = constructor(**keywords)
        except WeightsError:
            raise
        except Exception as error:  # the plugin's own code
            raise WeightsError(f"{maker} failed to build ({first_line(error)}); {remedy}") from error
        problem = _plugin_model_problem(spec, model, shape)
        if problem is not None:
            raise WeightsError(f"{maker}: {problem}; {remedy}")
        if model.count_params() != spec.parameters:
            log.warning("%s has %s parameters; its spec says %s", maker, f"{model.count_params():,}",
                        f"{spec.parameters:,}")
        return model

    return build


def keras_cache_dir() -> Path:
    """The folder Keras downloads application weights into: ``models/`` in its home folder
    ($KERAS_HOME as it was when Keras was imported, else ~/.keras; /tmp/.keras where that
    cannot be written), as Keras's ``get_file`` decides."""
    from transferkit.keras_private import keras_home

    return Path(keras_home()) / "models"


def load_backbone(
    name: str,
    weights: str | os.PathLike = "imagenet",
    input_shape: tuple[int, int, int] = (224, 224, 3),
):
    """Build a keras.applications backbone without its classification top.

    Args:
        name: a name from ``available_backbones()`` ("vgg16", "resnet50",
            "efficientnetv2-b0", "convnext-tiny", "mobilenetv3-small", ...).
        weights: "imagenet" (default; Keras download and cache), "none" (random), or a path
            to a ``.h5`` / ``.weights.h5`` file holding this architecture's weights.
        input_shape: (height, width, 3); each side at least the backbone's ``min_size``.
            Default (224, 224, 3).

    Returns:
        A ``keras.Model`` named "backbone" mapping preprocessed images to feature maps.

    Raises:
        WeightsError: unknown name, too small a shape, failed download, or a weights file
            that is missing or does not fit the architecture.
    """
    spec = get_spec(name)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(side, numbers.Integral) and side > 0 for side in shape):
        raise WeightsError(f"input_shape {shape!r}: give (height, width, 3) in whole pixels, "
                           f"e.g. ({spec.default_size}, {spec.default_size}, 3)")
    height, width, channels = shape = tuple(int(side) for side in shape)
    if channels != 3:
        raise WeightsError(f"{spec.name} takes RGB images: input_shape needs 3 channels, got {channels}")
    if min(height, width) < spec.min_size:
        raise WeightsError(
            f"{spec.name} needs an input of at least {spec.min_size}x{spec.min_size}x3, "
            f"got {height}x{width}x{channels}; raise the image size"
        )

    import keras

    constructor = spec.constructor
    if not callable(constructor):
        constructor = getattr(keras.applications, constructor, None)
        if constructor is None:  # a plugin's spec (the built-in names are tested)
            raise WeightsError(f"{_plugin_named(spec)} names keras.applications.{spec.constructor}, which this "
                               "Keras lacks")
    if spec.name not in REGISTRY:
        constructor = _guarded(spec, constructor, shape)
    weights_text = str(weights)
    if weights_text.lower() == "none":
        backbone = constructor(include_top=False, weights=None, input_shape=shape)
    elif weights_text.lower() == "imagenet":
        backbone = _build_with_imagenet(spec, constructor, shape)
    else:
        backbone = constructor(include_top=False, weights=None, input_shape=shape)
        load_weights_file(backbone, spec, Path(weights_text))
    # A stable name so the classifier can find the backbone after save and load.
    backbone.name = "backbone"
    if spec.output_layer:
        # Keras leaves this layer an automatic name; the registry's blocks and last_conv
        # need one that is the same in every process.
        backbone.layers[-1].name = spec.output_layer
    return backbone


# Seconds a weights download may wait for the server's next bytes before it is given up
# (urllib has no limit of its own: a proxy or firewall that accepts and stays silent would
# hold it forever). Where the program set a socket default timeout, that one stands.
DOWNLOAD_TIMEOUT = 60.0


def _build_with_imagenet(spec: BackboneSpec, constructor, input_shape):
    import socket

    if not spec.weights_origin:
        raise WeightsError(f"{spec.name} has no ImageNet weights to download; pass --weights PATH to a weights file "
                           f"of a {spec.name} backbone, or --weights none for random weights")

    cached = keras_cache_dir() / spec.weights_file
    was_cached = cached.is_file()
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        with warnings.catch_warnings():
            # MobileNet's builders warn at any size but 224 that the 224 px weights are
            # loaded: their one notop file, whose convolutions fit every size.
            warnings.filterwarnings("ignore", message=r".*Weights for input shape \(224, 224\) will be loaded",
                                    category=UserWarning)
            return constructor(include_top=False, weights="imagenet", input_shape=input_shape)
    except WeightsError:  # a plugin's constructor, told as such (``_guarded``)
        raise
    except Exception as error:  # Keras raises a bare Exception for a failed fetch.
        reason = first_line(error)
        if was_cached and not cached.exists():
            # Keras checks the cached file's hash, downloads it again when it differs, and
            # deletes it when that fails.
            raise WeightsError(
                f"the cached ImageNet weights {cached} did not match Keras's checksum for {spec.name} (a damaged or "
                f"another file), and Keras removed it when downloading a good copy failed ({reason}). Put the "
                f"original {spec.weights_file} (from {spec.weights_origin}) there, or pass --weights PATH or "
                "--weights none"
            ) from error
        if cached.exists():
            raise WeightsError(
                f"the cached ImageNet weights {cached} could not be loaded ({reason}); "
                f"delete it to download again, or pass --weights PATH or --weights none"
            ) from error
        raise WeightsError(
            f"could not download the ImageNet weights for {spec.name} ({reason}). "
            f"Put {spec.weights_file} (from {spec.weights_origin}) into {cached.parent}/, "
            f"or pass --weights PATH to a copy of it, or --weights none for random weights"
        ) from error
    finally:
        if previous is None:
            socket.setdefaulttimeout(None)


def load_weights_file(backbone, spec: BackboneSpec, path: Path) -> None:
    """Load a local weights file into a freshly built backbone.

    Args:
        backbone: the model built with ``weights=None``.
        spec: its registry entry (for the message).
        path: a ``.h5`` (Keras's legacy format, as the notop downloads are) or
            ``.weights.h5`` file.

    Raises:
        WeightsError: the file is missing, unreadable, or holds another architecture.
    """
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; pass an existing .h5 file, "
            f"'imagenet' or 'none'"
        )
    if not path.name.endswith(WEIGHTS_FILE_SUFFIXES):
        raise WeightsError(
            f"weights file {path} is not a .h5 or .weights.h5 file; "
            f"pass {_fitting_weights(spec)}"
        )
    # Keras warns, layer by layer, of what it could not match before it fails (or, loading
    # what matches, leaves the rest as initialized): one error says it instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(str(path))
        except Exception as error:
            raise WeightsError(
                f"weights file {path} does not fit the {spec.name} backbone ({_misfit(error)}); "
                f"pass {_fitting_weights(spec)}"
            ) from error
    skipped = [str(warning.message) for warning in caught if "Skipping" in str(warning.message)]
    if skipped:
        raise WeightsError(
            f"weights file {path} does not fit the {spec.name} backbone (Keras left {len(skipped)} part(s) without "
            f"weights: {first_line(skipped[0])}); pass {_fitting_weights(spec)}"
        )
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _misfit(error: BaseException) -> str:
    """What of a weights file did not fit, from Keras's error, whose first line ends in a colon
    before the example that says it (with the variable's values quoted): the first variable
    whose shape differs, or the example's first line, and how many objects failed; else the
    message's first line."""
    text = str(error)
    total = re.match(r"A total of (\d+) objects could not be loaded", text)
    variable = re.search(r"Target variable: <Variable path=([^,\s]+), shape=(\([^)]*\))", text)
    received = re.search(r"Received: value\.shape=(\([^)]*\))", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if variable is not None and received is not None:
        detail = f"{variable.group(1)} is {variable.group(2)} here, {received.group(1)} in the file"
    elif total is not None and len(lines) > 1:
        detail = first_line(ValueError(lines[1]))
    else:
        return first_line(error)
    return f"{detail}; {total.group(1)} objects could not be loaded" if total is not None else detail


def _fitting_weights(spec: BackboneSpec) -> str:
    """What a weights file for this backbone is, as a message names it."""
    saved = f"weights saved from a {spec.name} backbone"
    return f"the Keras notop file ({spec.weights_file}) or {saved}" if spec.weights_file else saved
