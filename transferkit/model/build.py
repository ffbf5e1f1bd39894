"""The one way a run's model is built: the recipe's dtype policy and distribution strategy,
its backbone (pretrained weights, a weights file, or a finished run's backbone) and a new head.

``finetune``, ``--resume`` (before its first checkpoint), ``tune``'s trials, ``lr-find`` and
``doctor --model`` all build through ``build_model``, so they train the same network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transferkit import backbones
from transferkit.model.classifier import build_classifier
from transferkit.model.transfer import load_run_backbone, source_run
from transferkit.recipe import Recipe
from transferkit.runtime import ONEDNN_LEFT_OFF, dtype_policy, onednn_left_off, resolve_precision
from transferkit.strategies import Distribution, resolve_distribution

log = logging.getLogger("transferkit")


@dataclass(frozen=True)
class BuiltModel:
    """A new classifier, the precision it was built in and the strategy it was built under.

    Attributes:
        model: the uncompiled classifier (``build_classifier``'s layout).
        policy: the Keras dtype policy it computes in, e.g. "float32" or "mixed_bfloat16".
        reason: why that policy (the CPU or GPU seen, or the recipe's choice).
        distribution: the ``strategies.Distribution`` whose scope it was built in (its
            variables live on every replica's device); default None (one device).
    """

    model: Any
    policy: str
    reason: str
    distribution: Distribution | None = None


def build_model(recipe: Recipe, n_classes: int, *, verbose: int = 0) -> BuiltModel:
    """The recipe's classifier: its backbone at its image size, in its precision, with a new
    head, built in the scope of the recipe's distribution strategy (``strategy``, ``devices``).

    Args:
        recipe: the resolved recipe (backbone, weights, image size, head, precision).
        n_classes: number of classes, at least 2.
        verbose: 0 silent, 1 say the precision, the strategy and where the backbone's weights
            came from; default 0.

    Returns:
        A ``BuiltModel``.

    Raises:
        WeightsError: the weights cannot be loaded (a download that failed names the file
            and the folder to put it in), or a source run does not fit the recipe.
        StrategyError: the strategy or device count cannot be set up here.
    """
    distribution = resolve_distribution(recipe.strategy, recipe.devices)
    policy, reason = resolve_precision(recipe.precision)
    if verbose:
        log_setup(policy, reason, distribution)
    shape = (recipe.image_size,) * 2 + (3,)
    source = source_run(recipe.weights)
    with distribution.scope(), dtype_policy(policy):
        if source is not None:
            backbone = load_run_backbone(source, backbones.get_spec(recipe.backbone), shape)
            if verbose:
                log.info(f"backbone weights from the run {source.folder}")
        else:
            backbone = backbones.load_backbone(recipe.backbone, recipe.weights, shape)
        model = build_classifier(backbone, n_classes, recipe.head, backbone_name=recipe.backbone)
    return BuiltModel(model, policy, reason, distribution)


def log_setup(policy: str, reason: str, distribution: Distribution) -> None:
    """Say the precision and the strategy a run trains in (progress messages).

    Args:
        policy: the Keras dtype policy; reason: why it.
        distribution: the ``Distribution``.
    """
    import keras

    log.info(f"precision: {policy} ({reason})")
    log.info(f"strategy: {distribution.describe()} ({distribution.reason})")
    if keras.config.backend() == "tensorflow" and onednn_left_off():
        log.warning(ONEDNN_LEFT_OFF)
