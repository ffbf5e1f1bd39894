"""Imported first by a test process that must run as on a machine with no TensorFlow:
``import tensorflow`` (and any sub-module) then raises ImportError, as if it were not
installed (``sys.modules["tensorflow"] = None`` would not do: Keras takes a name present in
``sys.modules`` for an imported TensorFlow and imports it).

    python -c "import tests.no_tensorflow; ..."      # from the repository root
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """TensorFlow as if it were not installed: ``import tensorflow`` (and any sub-module)
    raises ImportError. ``importlib.util.find_spec`` still answers a spec, with no origin
    (PyTorch's dynamo asks it for every package it skips, and takes no origin as "nothing to
    skip"); the spec's loader is what refuses."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self, origin=None)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (TensorFlow is blocked in this process)",
                                  name=spec.name)

    def exec_module(self, module):  # pragma: no cover - create_module raised
        raise ModuleNotFoundError(module.__name__)


if "tensorflow" in sys.modules:
    raise RuntimeError("tests.no_tensorflow must be imported before anything imports TensorFlow")
sys.meta_path.insert(0, NoTensorFlow())
