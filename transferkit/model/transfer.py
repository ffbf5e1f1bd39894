"""Transfer from your own runs: a finished run's backbone as the starting weights of a new one.

    transferkit finetune NEW_DATA --weights runs/flowers        # or runs/flowers/model.keras

The new run takes the source run's backbone weights (the head is new, for the new classes)
and records where they came from: the source run, its data fingerprint and its recipe go
into labels.json ("lineage") and a comment at the top of recipe.toml. A source of another
backbone or image size is refused, saying what it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from transferkit.backbones import BackboneSpec
from transferkit.errors import RunError, WeightsError, first_line
from transferkit.runs import LABELS_FILE, MODEL_FILE, is_run_folder, load_keras_file


@dataclass(frozen=True)
class SourceRun:
    """A finished run whose backbone a new run starts from.

    Attributes:
        folder: the run folder.
        model_path: its model file.
        labels: its labels.json.
    """

    folder: Path
    model_path: Path
    labels: dict

    def lineage(self) -> dict:
        """What the new run records of its start: the source run, its data and its recipe."""
        recipe = None
        try:
            import tomllib

            recipe = tomllib.loads((self.folder / "recipe.toml").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        return {
            "source_run": str(self.folder.resolve()),
            "source_model": str(self.model_path.resolve()),
            "backbone": self.labels.get("backbone"),
            "image_size": self.labels.get("image_size"),
            "class_names": self.labels.get("class_names"),
            "data_fingerprint": self.labels.get("data_fingerprint"),
            "recipe": recipe,
        }


def source_run(weights: str | os.PathLike) -> SourceRun | None:
    """The run a ``weights`` setting names: a run folder (model.keras + labels.json) or a
    ``.keras`` file with labels.json beside it; None for anything else ("imagenet", "none",
    a .h5 weights file)."""
    path = Path(weights).expanduser()
    if is_run_folder(path):
        folder, model_path = path, path / MODEL_FILE
    elif path.is_file() and path.suffix == ".keras" and (path.parent / LABELS_FILE).is_file():
        folder, model_path = path.parent, path
    else:
        return None
    try:
        labels = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(
            f"--weights {weights}: {folder / LABELS_FILE} cannot be read ({first_line(error)})") from error
    return SourceRun(folder, model_path, labels)


def check_fits(source: SourceRun, spec: BackboneSpec, image_size: int) -> None:
    """Refuse a source run of another backbone or image size, saying what it is.

    Raises:
        WeightsError: the backbone or the image size differs.
    """
    backbone, size = source.labels.get("backbone"), source.labels.get("image_size")
    if backbone != spec.name or size != image_size:
        raise WeightsError(
            f"--weights {source.folder}: that run has a {backbone} backbone at {size} px, this run is "
            f"{spec.name} at {image_size} px; use --backbone {backbone} --image-size {size}, or another run"
        )


def load_run_backbone(source: SourceRun, spec: BackboneSpec, input_shape: tuple[int, int, int]):
    """A new backbone holding the source run's backbone weights.

    Args:
        source: the run, from ``source_run``.
        spec: the backbone's registry entry (must be the source's).
        input_shape: (S, S, 3), S the source's image size.

    Returns:
        A ``keras.Model`` named "backbone", as ``load_backbone`` builds it.

    Raises:
        WeightsError: another backbone or image size, or a model that cannot be read.
    """
    from transferkit.backbones import load_backbone

    check_fits(source, spec, int(input_shape[0]))
    try:
        # safe_mode: a model file from someone else runs no code of its own here.
        model = load_keras_file(source.model_path, "re-run the source run's finetune, or choose another --weights")
    except RunError as error:
        raise WeightsError(f"--weights: {error}") from error
    try:
        weights = model.get_layer("backbone").get_weights()
    except Exception as error:  # a foreign model file
        raise WeightsError(f"--weights {source.model_path}: cannot read its backbone ({first_line(error)})") from error
    backbone = load_backbone(spec.name, "none", input_shape)
    backbone.set_weights(weights)
    return backbone
