"""The run folder's contents: what a finished training writes, file by file.

The jobs in workflow.py decide when a run is written and publish it (runs.save_run); this
room decides what is in it, so that each file a capability adds (the split, the model card,
MLflow's run, the strategy, the rejection threshold and prediction sets) has one place to go.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from transferkit import runs
from transferkit.data.prepare import PreparedData
from transferkit.data.split import SPLIT_FILE
from transferkit.evaluation.card import write_model_card
from transferkit.files import write_atomic
from transferkit.model.transfer import source_run
from transferkit.outputs import output_activation
from transferkit.recipe import Recipe
from transferkit.runtime import quieter_loggers
from transferkit.strategies import Distribution
from transferkit.trust.record import TrustRecord


@dataclass
class TrainedRun:
    """What a finished training hands to the evaluation and the run folder.

    Attributes:
        model, policy, distribution, history: the trained model, its dtype policy, the strategy
            it trained under, and one row per epoch.
        metrics: the validation metrics (and calibration) once computed.
        tensorboard: the TensorBoard logs written while training, if any.
        tracking: the MLflow run it is logged to, if any.
        trust: the rejection threshold and prediction-set scores, when fitted.
    """

    model: keras.Model
    policy: str  # the Keras dtype policy it trained in
    distribution: Distribution  # the strategy it trained under
    history: list[dict]
    metrics: dict | None = None
    tensorboard: Path | None = None  # the TensorBoard logs written while training
    tracking: dict | None = None  # the MLflow run it is logged to
    trust: TrustRecord | None = None  # the rejection threshold and prediction-set scores


    def as_run(self, path: Path | None, recipe: Recipe, prepared: PreparedData) -> runs.Run:
        """The ``Run`` a job returns: this training, written at ``path`` (or None: not written)."""
        return runs.Run(
            path=path, class_names=tuple(prepared.class_names), image_size=recipe.image_size,
            backbone=recipe.backbone, head_activation=output_activation(prepared.n_classes),
            recipe=recipe.model_dump(mode="json"), history=self.history, metrics=self.metrics, model=self.model,
            **(self.trust.labels_entries() if self.trust is not None else {}),
        )


def write_run_contents(folder: Path, trained: TrainedRun, recipe: Recipe, prepared: PreparedData, *,
                       save_h5: bool = False, run_id: str | None = None, name: str | None = None) -> None:
    """Write the run folder's files into ``folder`` (a staging folder that runs.save_run then
    publishes): model, labels, recipe, history, metrics, split, figures, skipped files, and
    last the model card, which reads them.

    Args:
        folder: where to write.
        trained: the finished training, its metrics computed.
        recipe, prepared: the recipe it trained with and the data it trained on.
        save_h5: also write the legacy ``model.h5``; default False.
        run_id: the run's id (labels.json "run_id"); default none.
        name: the run's name for the model card; default the folder's.
    """
    history, metrics = trained.history, trained.metrics

    def draw_figures() -> None:
        from transferkit.evaluation import figures  # matplotlib: imported in the background meanwhile

        if history:
            figures.plot_history(history, folder / "history.png", metrics.get("saved"))
        figures.plot_confusion(np.asarray(metrics["confusion_matrix"]), prepared.class_names,
                               folder / "confusion.png", title="validation confusion matrix")

    # The figures are drawn while the model is written.
    with ThreadPoolExecutor(max_workers=1) as pool:
        figures = pool.submit(draw_figures)
        trained.model.save(folder / runs.MODEL_FILE)
        if save_h5:
            # Keras warns through absl that HDF5 is a legacy format: asked for by name here.
            with quieter_loggers({"absl": logging.ERROR}):
                trained.model.save(folder / "model.h5")
        figures.result()
    # Where the data was: exports sample their check images there.
    extra = {"data_fingerprint": prepared.fingerprint, "data_dir": prepared.data_dir, "val_dir": prepared.val_dir,
             "strategy": trained.distribution.as_dict(),
             "backend": keras.config.backend()}  # trained on; the folder loads on every backend
    if run_id is not None:
        extra["run_id"] = run_id
    if trained.tracking is not None:
        extra["mlflow"] = trained.tracking
    if trained.trust is not None:
        extra.update(trained.trust.labels_entries())
        trained.trust.write_files(folder)
    source = source_run(recipe.weights)
    recipe_text = recipe.to_toml()
    if source is not None:
        extra["lineage"] = source.lineage()
        recipe_text = (f"# lineage: the backbone started from the run {extra['lineage']['source_run']}\n"
                       f"# (its data fingerprint {extra['lineage']['data_fingerprint']}; its recipe is that run's "
                       "recipe.toml, copied into labels.json 'lineage')\n") + recipe_text
    runs.write_labels(folder, list(prepared.class_names), recipe.image_size, recipe.backbone,
                      output_activation(prepared.n_classes), precision=trained.policy, extra=extra)
    write_atomic(folder / "recipe.toml", recipe_text)
    runs.write_history(folder, history)
    runs.write_json(folder / "metrics.json", metrics)
    write_atomic(folder / SPLIT_FILE, prepared.split_csv())  # which image trained, which validated
    if trained.tensorboard is not None:
        shutil.copytree(trained.tensorboard, folder / "tensorboard")
    if prepared.skipped:
        write_atomic(folder / "skipped.txt", "".join(f"{path}\t{reason}\n" for path, reason in prepared.skipped))
    write_model_card(folder, name=name)
