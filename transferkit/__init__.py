"""transferkit: transfer-learning image classification on Keras 3.

    import transferkit
    run = transferkit.finetune("images/", "quickstart", {"weights": "none"}, output="runs/demo")
    result = transferkit.predict_folder(transferkit.load_run("runs/demo"), "to_sort/")

Names are imported on first use, so ``import transferkit`` (and the CLI's --help) stays fast.
The one table ``_EXPORTS`` says where each public name lives; ``__all__`` is derived from it.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import TYPE_CHECKING

# Keras reads its backend once, on first import: TensorFlow unless KERAS_BACKEND says "jax"
# or "torch" (transferkit.backend holds what differs between them).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ["KERAS_BACKEND"].strip().lower() == "jax":  # before JAX is imported: it reads these once
    from transferkit.backend import use_jax_compilation_cache

    use_jax_compilation_cache()
# albumentations checks PyPI for a newer release when imported unless told not to: no
# network call at import or at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# A process that trains several models (each with new Keras functions) is not told it retraces;
# where TensorFlow would leave its oneDNN kernels off (AVX2-only CPUs), they are turned on
# before it is imported (``runtime.prefer_onednn``).
from transferkit.runtime import prefer_onednn, quiet_keras_retracing  # noqa: E402

prefer_onednn()
quiet_keras_retracing()

try:
    __version__ = metadata.version("transferkit")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "AuditResult": "transferkit.trust.audit",
    "AugmentConfig": "transferkit.recipe",
    "CacheConfig": "transferkit.recipe",
    "Checkpointing": "transferkit.training.stages",
    "DataConfig": "transferkit.recipe",
    "DataError": "transferkit.errors",
    "EngineError": "transferkit.errors",
    "ExportError": "transferkit.errors",
    "HeadConfig": "transferkit.recipe",
    "LossConfig": "transferkit.recipe",
    "Prediction": "transferkit.inference.predict",
    "PreparedData": "transferkit.data.prepare",
    "Recipe": "transferkit.recipe",
    "RecipeError": "transferkit.errors",
    "RejectConfig": "transferkit.recipe",
    "Run": "transferkit.runs",
    "RunError": "transferkit.errors",
    "ServeError": "transferkit.errors",
    "StageConfig": "transferkit.recipe",
    "StageOptions": "transferkit.training.stages",
    "StagesResult": "transferkit.training.stages",
    "StrategyError": "transferkit.errors",
    "TrainingInterrupted": "transferkit.errors",
    "UnreadableImage": "transferkit.errors",
    "TransferkitError": "transferkit.errors",
    "WeightsError": "transferkit.errors",
    "audit": "transferkit.trust.audit",
    "available_backbones": "transferkit.backbones",
    "benchmark_run": "transferkit.export.benchmark",
    "build_augmenter": "transferkit.data.augment",
    "build_classifier": "transferkit.model.classifier",
    "build_model": "transferkit.model.build",
    "check_data": "transferkit.data.doctor",
    "check_learning": "transferkit.tuning.diagnostics",
    "evaluate_folder": "transferkit.evaluation.evaluate",
    "explain": "transferkit.evaluation.gradcam",
    "export_run": "transferkit.export.exporter",
    "find_learning_rate": "transferkit.tuning.lr_find",
    "finetune": "transferkit.workflow",
    "fold_batchnorm": "transferkit.model.fold",
    "index_folder": "transferkit.data.folders",
    "load_backbone": "transferkit.backbones",
    "load_recipe": "transferkit.recipe",
    "load_run": "transferkit.runs",
    "make_engine": "transferkit.inference.engines",
    "predict_folder": "transferkit.inference.predict",
    "prepare_data": "transferkit.data.prepare",
    "read_image": "transferkit.data.images",
    "resolve_distribution": "transferkit.strategies",
    "resume_finetune": "transferkit.workflow",
    "train_prepared": "transferkit.workflow",
    "begin_stage": "transferkit.training.stages",
    "run_stages": "transferkit.training.stages",
    "tune": "transferkit.tuning.search",
    "write_predictions": "transferkit.inference.predict",
    "write_model_card": "transferkit.evaluation.card",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # what editors and type checkers see; at run time names load on first use
    from transferkit.backbones import available_backbones, load_backbone
    from transferkit.data.augment import build_augmenter
    from transferkit.data.doctor import check_data
    from transferkit.data.folders import index_folder
    from transferkit.data.images import read_image
    from transferkit.data.prepare import PreparedData, prepare_data
    from transferkit.errors import (
        DataError,
        EngineError,
        ExportError,
        RecipeError,
        RunError,
        ServeError,
        StrategyError,
        TrainingInterrupted,
        TransferkitError,
        UnreadableImage,
        WeightsError,
    )
    from transferkit.evaluation.card import write_model_card
    from transferkit.evaluation.evaluate import evaluate_folder
    from transferkit.evaluation.gradcam import explain
    from transferkit.export.benchmark import benchmark_run
    from transferkit.export.exporter import export_run
    from transferkit.inference.engines import make_engine
    from transferkit.inference.predict import Prediction, predict_folder, write_predictions
    from transferkit.model.build import build_model
    from transferkit.model.classifier import build_classifier
    from transferkit.model.fold import fold_batchnorm
    from transferkit.recipe import (
        AugmentConfig,
        CacheConfig,
        DataConfig,
        HeadConfig,
        LossConfig,
        Recipe,
        RejectConfig,
        StageConfig,
        load_recipe,
    )
    from transferkit.runs import Run, load_run
    from transferkit.strategies import resolve_distribution
    from transferkit.training.stages import Checkpointing, StageOptions, StagesResult, begin_stage, run_stages
    from transferkit.trust.audit import AuditResult, audit
    from transferkit.tuning.diagnostics import check_learning
    from transferkit.tuning.lr_find import find_learning_rate
    from transferkit.tuning.search import tune
    from transferkit.workflow import finetune, resume_finetune, train_prepared


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
