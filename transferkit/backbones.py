"""Pretrained backbones: one registry of per-architecture facts, and weight resolution.

    from transferkit.backbones import load_backbone, available_backbones
    backbone = load_backbone("resnet50", weights="imagenet", input_shape=(224, 224, 3))

Weights are one of:
- ``"imagenet"``: Keras's own download and cache (``$KERAS_HOME/models`` or
  ``~/.keras/models``); a file already in the cache is used with no network.
- a path to a local ``.h5`` / ``.weights.h5`` file (Keras's own notop file copied from a
  machine with internet, or weights saved from a backbone of the same architecture).
- ``"none"``: random initialisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import WeightsError, first_line

WEIGHTS_CHOICES = ("imagenet", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """What transferkit needs to know about one keras.applications architecture.

    Attributes:
        name: registry name used in recipes and on the command line.
        constructor: attribute of ``keras.applications`` that builds it.
        preprocessing: input convention the ImageNet weights expect ("caffe": BGR, mean
            subtracted, no scaling).
        min_size: smallest input height/width Keras accepts without the top.
        default_size: the size the ImageNet weights were trained at.
        blocks: layer-name prefixes from the input to the output; unfreezing N blocks makes
            the last N of these trainable.
        weights_file: the file name Keras downloads for the ImageNet notop weights.
        weights_origin: where Keras downloads it from.
        last_conv: the last convolutional layer's output that keeps a spatial map (where
            Grad-CAM looks).
        parameters: weights without the top, counted from the built model (a listing
            answers at once; a test checks the figure against Keras).
    """

    name: str
    constructor: str
    preprocessing: str
    min_size: int
    default_size: int
    blocks: tuple[str, ...]
    weights_file: str
    weights_origin: str
    last_conv: str
    parameters: int

    def first_unfrozen(self, unfreeze: int | str) -> int:
        """Index of the first block that trains for an unfreeze depth (0, N or "all");
        ``len(blocks)`` when the backbone stays frozen."""
        depth = len(self.blocks) if unfreeze == "all" else int(unfreeze)
        return len(self.blocks) - depth

    def block_of(self, layer_name: str) -> int | None:
        """Index into ``blocks`` of the block a layer belongs to, or None (input layers)."""
        for index, prefix in enumerate(self.blocks):
            if layer_name == prefix or layer_name.startswith(prefix + "_"):
                return index
        return None


_KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"

_RESNET50_BLOCKS = ("conv1",) + tuple(
    f"conv{stage}_block{block}"
    for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
    for block in range(1, count + 1)
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
    )
}


def available_backbones() -> list[str]:
    """Names of the backbones transferkit can load, sorted.

    Returns:
        A list such as ``["resnet50", "vgg16", "vgg19"]``.
    """
    return sorted(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for a backbone name.

    Args:
        name: a name from ``available_backbones()`` (case-insensitive).

    Returns:
        Its ``BackboneSpec``.

    Raises:
        WeightsError: the name is not in the registry.
    """
    spec = REGISTRY.get(name.lower())
    if spec is None:
        raise WeightsError(
            f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}"
        )
    return spec


def keras_cache_dir() -> Path:
    """The folder Keras downloads application weights into: $KERAS_HOME/models or ~/.keras/models."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "models"


def load_backbone(
    name: str,
    weights: str | os.PathLike = "imagenet",
    input_shape: tuple[int, int, int] = (224, 224, 3),
):
    """Build a keras.applications backbone without its classification top.

    Args:
        name: "vgg16", "vgg19" or "resnet50".
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
    height, width, channels = input_shape
    if channels != 3 or min(height, width) < spec.min_size:
        raise WeightsError(
            f"{spec.name} needs an input of at least {spec.min_size}x{spec.min_size}x3, "
            f"got {height}x{width}x{channels}; raise the image size"
        )

    import keras

    constructor = getattr(keras.applications, spec.constructor)
    weights_text = str(weights)
    if weights_text.lower() == "none":
        backbone = constructor(include_top=False, weights=None, input_shape=tuple(input_shape))
    elif weights_text.lower() == "imagenet":
        backbone = _build_with_imagenet(spec, constructor, tuple(input_shape))
    else:
        backbone = constructor(include_top=False, weights=None, input_shape=tuple(input_shape))
        load_weights_file(backbone, spec, Path(weights_text))
    # A stable name so the classifier can find the backbone after save and load.
    backbone.name = "backbone"
    return backbone


def _build_with_imagenet(spec: BackboneSpec, constructor, input_shape):
    try:
        return constructor(include_top=False, weights="imagenet", input_shape=input_shape)
    except Exception as error:  # Keras raises a bare Exception for a failed fetch.
        cached = keras_cache_dir() / spec.weights_file
        reason = first_line(error)
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
    if not path.name.endswith((".h5", ".hdf5")):
        raise WeightsError(
            f"weights file {path} is not a .h5 or .weights.h5 file; "
            f"pass the Keras notop file ({spec.weights_file}) or weights saved from {spec.name}"
        )
    try:
        backbone.load_weights(str(path))
    except Exception as error:
        raise WeightsError(
            f"weights file {path} does not fit the {spec.name} backbone ({first_line(error)}); "
            f"pass {spec.weights_file} or weights saved from a {spec.name} backbone"
        ) from error
