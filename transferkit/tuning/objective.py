"""What a study optimizes: the final validation metrics a trial can be scored on, each with
its direction. A module of its own, without imports, so that the CLI shows the choices in
``transferkit tune --help`` without loading the search."""

from __future__ import annotations

METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
