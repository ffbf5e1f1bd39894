"""transferkit: transfer-learning image classification on Keras 3.

    import transferkit
    run = transferkit.finetune("images/", "quickstart", {"weights": "none"}, output="runs/demo")
    result = transferkit.predict_folder(transferkit.load_run("runs/demo"), "to_sort/")

Names are imported on first use, so ``import transferkit`` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import importlib
import os

# Keras reads its backend once, on first import; transferkit is written for TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

_EXPORTS = {
    "AugmentConfig": "transferkit.recipe",
    "CacheConfig": "transferkit.recipe",
    "DataConfig": "transferkit.recipe",
    "DataError": "transferkit.errors",
    "EngineError": "transferkit.errors",
    "HeadConfig": "transferkit.recipe",
    "Prediction": "transferkit.predict",
    "Recipe": "transferkit.recipe",
    "RecipeError": "transferkit.errors",
    "Run": "transferkit.runs",
    "RunError": "transferkit.errors",
    "StageConfig": "transferkit.recipe",
    "TransferkitError": "transferkit.errors",
    "WeightsError": "transferkit.errors",
    "available_backbones": "transferkit.backbones",
    "build_augmenter": "transferkit.augment",
    "build_classifier": "transferkit.model",
    "check_data": "transferkit.doctor",
    "finetune": "transferkit.workflow",
    "fold_batchnorm": "transferkit.fold",
    "index_folder": "transferkit.data",
    "load_backbone": "transferkit.backbones",
    "load_recipe": "transferkit.recipe",
    "load_run": "transferkit.runs",
    "make_engine": "transferkit.engine",
    "predict_folder": "transferkit.predict",
    "read_image": "transferkit.data",
    "resume_finetune": "transferkit.workflow",
    "run_stages": "transferkit.training",
    "write_predictions": "transferkit.predict",
}

__all__ = [
    "AugmentConfig",
    "CacheConfig",
    "DataConfig",
    "DataError",
    "EngineError",
    "HeadConfig",
    "Prediction",
    "Recipe",
    "RecipeError",
    "Run",
    "RunError",
    "StageConfig",
    "TransferkitError",
    "WeightsError",
    "__version__",
    "available_backbones",
    "build_augmenter",
    "build_classifier",
    "check_data",
    "finetune",
    "fold_batchnorm",
    "index_folder",
    "load_backbone",
    "load_recipe",
    "load_run",
    "make_engine",
    "predict_folder",
    "read_image",
    "resume_finetune",
    "run_stages",
    "write_predictions",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
