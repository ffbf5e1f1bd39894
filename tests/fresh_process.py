"""Run a saved model in a Python process that never imports transferkit."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np

from tests import forked


def predict_without_transferkit(model, images: np.ndarray, folder: Path, check: str = "") -> np.ndarray:
    """Save ``model`` to folder/model.keras, load it with plain Keras in a new process, and
    return its predictions for ``images``; ``check`` is extra code run there on ``model``."""
    model.save(folder / "model.keras")
    np.save(folder / "images.npy", images)
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, keras
        model = keras.models.load_model({str(folder / "model.keras")!r})
        np.save({str(folder / "out.npy")!r}, model.predict(np.load({str(folder / "images.npy")!r}), verbose=0))
        assert not any(name.startswith("transferkit") for name in sys.modules), "transferkit was imported"
        """
    ) + textwrap.dedent(check)
    result = forked.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return np.load(folder / "out.npy")
