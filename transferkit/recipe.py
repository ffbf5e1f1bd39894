"""Recipes: every hyperparameter of a run, resolved in one place.

Resolution order: built-in defaults < recipe TOML file < overrides (CLI flags). Unknown keys,
wrong types and out-of-range values fail here, naming the key, the value and the valid
choices. The resolved recipe is frozen: steps receive the part they need and never mutate it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from transferkit.backbones import WEIGHTS_CHOICES, WEIGHTS_FILE_SUFFIXES, find_spec, unknown_backbone
from transferkit.errors import RecipeError
from transferkit.runtime import ENGINES, PRECISIONS
from transferkit.strategies import STRATEGIES

# The shipped recipes live in the repository's recipes/ folder, which the build maps into the
# package as ``transferkit.recipes`` (so the wheel ships them; there is one copy).
RECIPES_PACKAGE = "transferkit.recipes"

# Named command-line flags -> the recipe key each sets. The CLI reads its flags' values by
# these names; a flag that was given wins over --set of the same key.
FLAG_KEYS = {
    "backbone": "backbone",
    "weights": "weights",
    "image_size": "image_size",
    "batch_size": "batch_size",
    "val_split": "data.val_split",
    "group_by": "data.group_by",
    "seed": "seed",
    "precision": "precision",
    "engine": "engine",
    "cache": "cache.enabled",
    "cache_views": "cache.views",
    "cache_memory": "cache.memory_mb",
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "strategy": "strategy",
    "devices": "devices",
    "head_epochs": "stages.0.epochs",
    "fine_epochs": "stages.1:.epochs",
    "time_budget": "time_budget",
}


class _Section(BaseModel):
    # strict: a string "0.5" where a number belongs is a mistake worth naming.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(_Section):
    """How the image folder becomes training and validation sets."""

    val_split: float = Field(0.2, gt=0, lt=1)
    class_weights: bool = True
    # Decoded images stay in memory when they fit; beyond it they live in a memory-mapped file.
    memory_mb: float = Field(4096.0, gt=0)
    # A regular expression whose first group, searched in each file's path relative to the
    # data folder, names the file's group (a patient, a video); the validation split keeps
    # every group on one side. Written out only when set (TOML has no null).
    group_by: str | None = Field(None, exclude_if=lambda pattern: pattern is None)

    @field_validator("group_by")
    @classmethod
    def _group_by_has_a_group(cls, pattern):
        if pattern is not None:
            group_pattern(pattern)
        return pattern


def group_pattern(text: str) -> re.Pattern:
    """The compiled ``data.group_by`` pattern.

    Args:
        text: a Python regular expression with at least one group; its first group names a
            file's group.

    Returns:
        The compiled pattern.

    Raises:
        ValueError: not a regular expression, or one without a group (the message says
            which and gives an example).
    """
    example = r"e.g. '^[^/]+/(patient\d+)_' for cat/patient12_3.jpg"
    try:
        pattern = re.compile(text)
    except re.error as error:
        raise ValueError(f"'{text}' is not a regular expression ({error}); {example}") from None
    if pattern.groups < 1:
        raise ValueError(f"'{text}' has no group; put the part of the path that names the group in "
                         f"parentheses, {example}")
    return pattern


# The units of a duration ("90s", "10m", "1.5h") and their seconds.
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*")


def parse_duration(text: object) -> float:
    """The seconds of a duration written as a number and a unit: "90s", "10m", "1.5h".

    Args:
        text: the duration.

    Returns:
        Its length in seconds, above 0.

    Raises:
        ValueError: anything else (the message names the value and the valid forms).
    """
    forms = "a number and a unit s, m or h, e.g. '90s', '10m' or '1.5h'"
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration; write {forms}")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} is no time at all; give a duration above 0, {forms}")
    return seconds


HEAD_ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "selu")


class HeadConfig(_Section):
    """The new classification head on top of the backbone.

    ``activation`` is that of the hidden Dense layers; the output layer follows the output
    rule (one sigmoid unit for two classes, else softmax), which is not a setting.
    """

    pooling: Literal["avg", "flatten"] = "avg"
    units: tuple[int, ...] = (256,)
    activation: Literal[HEAD_ACTIVATIONS] = "relu"
    dropout: float = Field(0.3, ge=0, lt=1)
    batchnorm: bool = True

    @model_validator(mode="after")
    def _positive_units(self):
        for index, units in enumerate(self.units):
            if units < 1:
                raise ValueError(f"units[{index}] must be at least 1, got {units}")
        return self


class AugmentConfig(_Section):
    """Training-set augmentation strengths; 0 switches a transform off.

    ``hflip``: random horizontal flips, true or false, or "auto": the first stage trains
    without them, and the later stages with them unless mirrored validation images then
    score clearly worse than the originals (a mirrored digit or letter is another thing;
    ``training.flips``).
    """

    shift: float = Field(0.1, ge=0, le=0.5)
    contrast: float = Field(0.2, ge=0, le=1)
    rotation: float = Field(15.0, ge=0, le=180)
    hflip: bool | Literal["auto"] = "auto"

    @field_validator("hflip", mode="before")
    @classmethod
    def _flip_choice(cls, value):
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f'choose true, false or "auto", not {value!r}')


class CacheConfig(_Section):
    """Frozen-part feature cache: computed once per image and view, then only the top trains.

    A stage stores min(views, epochs) views per image, the image itself and then augmented
    ones (one, the image, without augmentation), and epoch e trains on view e mod views.
    """

    enabled: bool = True
    views: int = Field(2, ge=1)
    memory_mb: float = Field(2048.0, gt=0)


TTA_TRANSFORMS = ("identity", "hflip", "shift")


class TTAConfig(_Section):
    """Test-time augmentation (``--tta`` on predict and evaluate): the probabilities of the
    image and of a few deterministic variants are averaged.

    ``identity`` is the image itself; ``hflip`` its mirror image (used only when the run
    trained with horizontal flips); ``shift`` four copies moved by ``shift`` of the side
    (left, right, up, down; edges reflected, as in training).
    """

    transforms: tuple[Literal[TTA_TRANSFORMS], ...] = TTA_TRANSFORMS
    shift: float = Field(0.05, gt=0, le=0.25)

    @model_validator(mode="after")
    def _some_transform(self):
        if not self.transforms:
            raise ValueError(f"transforms: name at least one of {', '.join(TTA_TRANSFORMS)}")
        return self


REJECT_SCORES = ("knn", "max_probability")


class RejectConfig(_Section):
    """Rejecting images of no known class (``predict --reject``): fitted at the end of
    finetune, after calibration, on the validation split.

    ``coverage`` is the share of validation images of the known classes kept (the
    threshold keeps at least that share of new images of those classes); ``score`` how
    familiar an image looks: "knn", the cosine similarity of its backbone embedding to the
    ``neighbours``-th nearest training image's, or "max_probability", the largest
    calibrated class probability.
    """

    coverage: float = Field(0.95, gt=0, lt=1)
    score: Literal[REJECT_SCORES] = "knn"
    neighbours: int = Field(1, ge=1)


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "one-cycle")


class StageConfig(_Section):
    """One fine-tuning stage: what is trainable and how it is optimised.

    ``learning_rate`` is the stage's peak rate; ``schedule`` shapes it per step (constant,
    cosine decay to 0 at the stage's last step, or one-cycle: a rise from rate/25 to the
    rate, then cosine down to rate/1e4); ``warmup_epochs`` ramps it up linearly from ~0
    first (in one-cycle it is the length of the rise, default 30% of the stage).
    ``weight_decay`` is Keras 3's decoupled decay (each step every weight shrinks by
    learning rate x weight_decay), which every optimizer applies the same way: with adam
    it makes AdamW; 0 switches it off.
    """

    name: str = "stage"
    epochs: int = Field(5, ge=0)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    optimizer: Literal[OPTIMIZERS] = "adam"
    schedule: Literal[SCHEDULES] = "constant"
    warmup_epochs: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    unfreeze: int | Literal["all"] = 0
    patience: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _non_negative_unfreeze(self):
        if isinstance(self.unfreeze, int) and self.unfreeze < 0:
            raise ValueError(f"unfreeze must be 0 or more, or 'all', got {self.unfreeze}")
        return self


DEFAULT_STAGES = (
    StageConfig(name="head", epochs=8, learning_rate=1e-3, optimizer="adam", unfreeze=0),
    StageConfig(name="fine", epochs=4, learning_rate=3e-5, optimizer="adam", unfreeze=1),
)


class LossConfig(_Section):
    """The training loss (cross-entropy; binary for one sigmoid unit).

    ``label_smoothing`` moves each target towards the uniform distribution by that much
    (for one sigmoid unit, 0/1 targets towards 0.5); 0 switches it off.
    """

    label_smoothing: float = Field(0.0, ge=0, lt=1)


TUNE_SPEC_KEYS = ("low", "high", "log", "step", "choices")


class TuneParam(_Section):
    """One searched recipe key of ``[tune]``: a range or a list of choices.

    ``{low = 1e-4, high = 1e-2, log = true}`` is a float range (log-uniform with ``log``);
    integer ``low`` and ``high`` make an integer range (of the recipe's float keys, a float
    range); ``step`` spaces the values; ``{choices = [[64], [256, 64]]}`` picks one value.
    A range on a list key (``head.units``) sets every entry of the recipe's list to the value.
    """

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_table(cls, value):
        if not isinstance(value, Mapping):
            raise ValueError(f"{value!r} is not a search spec; write a table such as {{low = 0.1, high = 0.5}} "
                             "or {choices = [16, 32]}")
        unknown = [key for key in value if key not in TUNE_SPEC_KEYS]
        if unknown and isinstance(value[unknown[0]], Mapping):
            # A dotted recipe key split into tables (--set tune.head.dropout=...): it is one key.
            raise ValueError(f"{unknown[0]!r} is not a spec key: a tuned recipe key is one quoted key, e.g. "
                             "\"head.dropout\" = {low = 0.1, high = 0.5} under [tune], or on the command line "
                             "--set 'tune={\"head.dropout\" = {low = 0.1, high = 0.5}}'")
        if unknown:
            raise ValueError(f"unknown spec key {unknown[0]!r}; use {', '.join(TUNE_SPEC_KEYS)}")
        return value

    @model_validator(mode="after")
    def _a_range_or_choices(self):
        if self.choices is not None:
            if any(value is not None for value in (self.low, self.high, self.step)) or self.log:
                raise ValueError("give either choices or a range (low, high), not both")
            if not self.choices:
                raise ValueError("choices is empty; list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices = [...])")
        if not self.low < self.high:
            raise ValueError(f"low {self.low!r} must be below high {self.high!r}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low!r}")
        if self.step is not None and self.log:
            raise ValueError("a log range takes no step; drop one of them")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be above 0, got {self.step!r}")
        return self

    @model_serializer(mode="wrap")
    def _written_out(self, handler):
        # TOML has no null: only what was given is written.
        return {key: value for key, value in handler(self).items() if value is not None and value is not False}


class TuneSpace(RootModel[dict[str, TuneParam]]):
    """The ``[tune]`` section: recipe key -> ``TuneParam``, searched by ``transferkit tune``.
    Keys are dotted recipe keys as ``--set`` takes them ("stages.0.learning_rate",
    "stages.1:.epochs", "head.units"); empty: the tuner's default space."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _recipe_keys(self):
        for key in self.root:
            problem = _unknown_recipe_key(key)
            if problem:
                raise ValueError(problem)
        return self


def _unknown_recipe_key(key: str) -> str | None:
    """Why ``key`` names no recipe key a search can set, or None when it does."""
    parts = key.split(".")
    if parts[0].rstrip(":") == "stages":
        selector = parts[1] if len(parts) == 3 else ""
        if parts[0] != "stages" or not selector.rstrip(":").lstrip("-").isdigit():
            return (f"{key!r}: a stage key names its stages: stages.0.learning_rate (the first) or "
                    "stages.1:.learning_rate (the second on)")
        if parts[2] not in StageConfig.model_fields:
            return f"unknown recipe key {key!r}; valid stage keys: {', '.join(StageConfig.model_fields)}"
        return None
    model: type[BaseModel] = Recipe
    for depth, part in enumerate(parts):
        if part not in model.model_fields or part == "tune":
            fields = [name for name in model.model_fields if name != "tune"]
            where = ".".join(parts[:depth]) or "the recipe"
            return f"unknown recipe key {key!r}; valid keys in {where}: {', '.join(fields)}"
        annotation = model.model_fields[part].annotation
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1:
            if not nested:
                return f"unknown recipe key {key!r}: {'.'.join(parts[: depth + 1])} is not a table"
            model = annotation
        elif nested:
            return f"{key!r} is a table; name one of its keys: {', '.join(annotation.model_fields)}"
    return None


# The largest image side: the backbones learned their features at 224-480 px, and at 4096 px
# VGG16's first activations are 4 GiB an image in float32 (at 100,000 px the decoding alone
# was killed by the kernel for memory, with no message).
MAX_IMAGE_SIZE = 4096


class Recipe(_Section):
    """A fully resolved recipe. Build one with ``load_recipe``."""

    backbone: str = "vgg16"
    weights: str = "imagenet"
    image_size: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = Field(42, ge=0)
    precision: Literal[PRECISIONS] = "auto"
    engine: Literal[ENGINES] = "auto"
    # Fit a temperature on the validation split after training (folded into the output layer).
    calibrate: bool = True
    # TensorBoard logs in RUN/tensorboard/, one step count across stages.
    tensorboard: bool = False
    # MLflow tracking URI (sqlite:///mlflow.db, http://host:5000, ...): params, per-epoch metrics,
    # the run's files and model. "": MLFLOW_TRACKING_URI when set, else none; "off": never.
    mlflow: str = ""
    # How many devices train (transferkit.strategies): batch_size is the global batch.
    strategy: Literal[STRATEGIES] = "auto"
    devices: int | Literal["all"] = "all"
    # A wall-clock budget for training ("90s", "10m", "1.5h"): the stages' epochs (at most the
    # recipe's) and the cached views are planned to fit it (training.budget). Written out only
    # when set.
    time_budget: str | None = Field(None, exclude_if=lambda budget: budget is None)
    data: DataConfig = DataConfig()
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    cache: CacheConfig = CacheConfig()
    tta: TTAConfig = TTAConfig()
    reject: RejectConfig = RejectConfig()
    stages: tuple[StageConfig, ...] = DEFAULT_STAGES
    # The search space of `transferkit tune`; written out only when there is one.
    tune: TuneSpace = Field(TuneSpace({}), exclude_if=lambda space: not space.root)

    @field_validator("weights", mode="after")
    @classmethod
    def _an_absolute_path(cls, weights):
        # A weights file or run folder is kept as an absolute path: the recipe.toml a run
        # writes must name the same file from any folder (--resume, --recipe from elsewhere).
        if weights.lower() in WEIGHTS_CHOICES:
            return weights
        path = Path(weights).expanduser()
        return os.path.abspath(path) if path.exists() else weights

    @field_validator("time_budget", mode="before")
    @classmethod
    def _a_duration(cls, budget):
        if budget is not None:
            parse_duration(budget)
        return budget

    def require_training(self) -> None:
        """Fail where no stage would train (every stage 0 epochs): the model saved would be
        the untrained one, calibrated and scored as if trained. A recipe may still say so
        (a base for ``tune``, whose trials set the epochs); ``finetune`` refuses it.

        Raises:
            RecipeError: naming the keys and their flags.
        """
        if not any(stage.epochs for stage in self.stages):
            raise RecipeError("stages.*.epochs: every stage has 0 epochs, so nothing would train; give the first "
                              "stage 1 or more (--head-epochs, or --set stages.0.epochs=N)")

    @property
    def time_budget_seconds(self) -> float | None:
        """``time_budget`` in seconds, or None without one."""
        return parse_duration(self.time_budget) if self.time_budget is not None else None

    @model_validator(mode="after")
    def _fits_backbone(self):
        spec = find_spec(self.backbone)
        if spec is None:
            raise ValueError(f"backbone: {unknown_backbone(self.backbone)}")
        if spec.name != self.backbone:  # one spelling in recipes and run folders: as listed
            raise ValueError(f"backbone: backbone names are lower case: {spec.name!r}, not {self.backbone!r}")
        if self.image_size < spec.min_size:
            raise ValueError(
                f"image_size: {self.image_size} is below the {spec.name} minimum of "
                f"{spec.min_size}; use {spec.min_size} or more"
            )
        if self.image_size > MAX_IMAGE_SIZE:  # before an image is decoded at that size
            raise ValueError(f"image_size: {self.image_size} is above the largest size transferkit trains at, "
                             f"{MAX_IMAGE_SIZE} (one image of that side takes gigabytes per layer of the network); use "
                             f"{MAX_IMAGE_SIZE} or less")
        if not self.stages:
            raise ValueError("stages: at least one [[stages]] table is needed")
        # Named by the user (the default name repeats in a recipe of unnamed stages, and in the
        # recipe.toml its run writes, which names every key).
        names = [stage.name for stage in self.stages if stage.name != StageConfig.model_fields["name"].default]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"stages: two stages are named {twice[0]!r} (history.csv and the figures tell stages "
                             "apart by name); give each its own name")
        if self.time_budget is not None and self.strategy == "data-parallel":
            raise ValueError(f"time_budget: {self.time_budget!r} does not combine with strategy 'data-parallel' (each "
                             "process would time its own steps and stop at its own); drop one of them")
        if self.devices != "all" and self.devices < 1:
            raise ValueError(f"devices: {self.devices} is not a number of devices; use 1 or more, or 'all'")
        for index, stage in enumerate(self.stages):
            if isinstance(stage.unfreeze, int) and stage.unfreeze > len(spec.blocks):
                raise ValueError(
                    f"stages.{index}.unfreeze: {stage.unfreeze} is more than the "
                    f"{len(spec.blocks)} blocks of {spec.name}; use 0..{len(spec.blocks)} or 'all'"
                )
        weights = self.weights
        if weights.lower() not in WEIGHTS_CHOICES:
            path = Path(weights).expanduser()
            if not path.is_file() and not (path.is_dir() and (path / "labels.json").is_file()):
                raise ValueError(
                    f"weights: {weights!r} is neither 'imagenet', 'none' nor an existing file or run folder; "
                    "pass one of those, the path to a .h5 weights file, or a finished run to start from"
                )
            is_run_model = path.suffix == ".keras" and (path.parent / "labels.json").is_file()
            if path.is_file() and not path.name.endswith(WEIGHTS_FILE_SUFFIXES) and not is_run_model:
                raise ValueError(
                    f"weights: {weights!r} is neither a .h5 weights file nor a run's .keras model (with its "
                    "labels.json beside it); pass the backbone's .h5 weights, a finished run, 'imagenet' or 'none'"
                )
        return self

    def to_toml(self) -> str:
        """The recipe as TOML text, every key written out."""
        return tomli_w.dumps(self.model_dump(mode="json"))


def _shipped():
    """The folder of shipped recipes, as an importlib.resources Traversable."""
    from importlib import resources

    return resources.files(RECIPES_PACKAGE)


def available_recipes() -> list[str]:
    """Names of the shipped recipes (without .toml), sorted."""
    return sorted(entry.name[: -len(".toml")] for entry in _shipped().iterdir() if entry.name.endswith(".toml"))


def recipe_summary(name: str) -> str:
    """The first sentence of a shipped recipe's opening comment, without its "name:" prefix."""
    lines = (_shipped() / f"{name}.toml").read_text(encoding="utf-8").splitlines()
    comment = []
    for line in lines:
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("# ").strip())
    text = " ".join(comment).removeprefix(f"{name}:").strip()
    return text.split(". ")[0].rstrip(".")


def collect_overrides(assignments: Sequence[str], flags: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides of one command line: ``--set KEY=VALUE`` assignments, then the named
    flags that were given (a flag and a --set of its key that disagree are refused; a flag
    left out leaves its key's --set alone).

    Args:
        assignments: the --set values, in order.
        flags: named flag -> value (None: not given), by the names in ``FLAG_KEYS``.

    Returns:
        Dotted recipe key -> value, for ``load_recipe``.

    Raises:
        RecipeError: an assignment without "=", or a flag name ``FLAG_KEYS`` lacks.
    """
    overrides = dict(parse_override(assignment) for assignment in assignments)
    for name, value in flags.items():
        if name not in FLAG_KEYS:
            raise RecipeError(f"no recipe key for the flag --{name.replace('_', '-')}")
        if value is not None:
            key = FLAG_KEYS[name]
            for given, set_value in overrides.items():
                if keys_meet(given, key) and set_value != value:
                    flag = f"--{name.replace('_', '-')}"
                    raise RecipeError(f"--set {given}={set_value!r} and {flag} {value!r} both set {given}; give one "
                                      "of them")
            overrides[key] = value
    return overrides


def keys_meet(first: str, second: str, stages: int | None = None) -> bool:
    """Whether two dotted override keys set one value: the same key, or stage keys of one
    field whose stages meet ("stages.1.epochs" and --fine-epochs' "stages.1:.epochs").

    Args:
        first, second: the keys.
        stages: the recipe's number of stages, when known: the stages are then compared
            exactly; without it, as a command line tells them before the recipe is read (a
            negative index meets any range).

    Returns:
        True when they set one value (a key with a selector the recipe lacks sets none).
    """
    if first == second:
        return True
    one, other = first.split("."), second.split(".")
    if not (len(one) == len(other) == 3 and one[0] == other[0] == "stages" and one[2] == other[2]):
        return False
    try:
        if stages is not None:
            return bool(set(stage_indices(one[1], stages)) & set(stage_indices(other[1], stages)))
        starts = [int(part[1].removesuffix(":")) for part in (one, other)]
    except ValueError:
        return False
    ranges = [part[1].endswith(":") for part in (one, other)]
    if ranges[0] and ranges[1]:
        return True
    if ranges[0] or ranges[1]:  # an index and a range from a stage: it meets it, or the last stages
        index, start = (starts[1], starts[0]) if ranges[0] else (starts[0], starts[1])
        return index < 0 or index >= start
    return starts[0] == starts[1]


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe path as given, or a shipped recipe's name such as "quickstart".

    Raises:
        RecipeError: neither a file nor a shipped recipe name.
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    if path.suffix == "" and str(recipe) in available_recipes():
        # A wheel installs the recipes as files; importlib.resources names their path.
        return Path(str(_shipped() / f"{recipe}.toml"))
    if path.is_dir():
        raise RecipeError(f"recipe {recipe} is a folder; pass a .toml file in it or a shipped recipe name")
    names = ", ".join(available_recipes()) or "none found"
    raise RecipeError(
        f"recipe {recipe} not found; pass a .toml file or a shipped recipe name ({names})"
    )


def load_recipe(
    path: Recipe | str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Recipe:
    """Resolve a recipe: built-in defaults < the TOML file < overrides.

    Args:
        path: a TOML file, a shipped recipe name ("vgg16", "quickstart", ...), a ``Recipe``
            (the overrides go over it), or None for the built-in defaults.
        overrides: dotted keys to values, e.g. ``{"image_size": 64, "head.dropout": 0.5,
            "stages.1.epochs": 2}``; None values are ignored.

    Returns:
        The frozen ``Recipe``.

    Raises:
        RecipeError: unreadable TOML, an unknown key, a wrong type or an out-of-range value,
            a recipe that is none of a name, a path or a ``Recipe`` (a mapping: overrides
            given in its place), or overrides that are not a mapping.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise RecipeError(f"overrides must map dotted recipe keys to values, such as {{'image_size': 64}}; got a "
                          f"{type(overrides).__name__}")
    if path is not None and not isinstance(path, (Recipe, str, os.PathLike)):  # finetune(data, {"image_size": 64})
        hint = ("; a mapping of keys to values goes in overrides=, e.g. finetune(data, overrides={...})"
                if isinstance(path, Mapping) else "")
        raise RecipeError(f"recipe must be a shipped recipe's name, a TOML file's path or a Recipe; got "
                          f"{type(path).__name__}{hint}")
    source = "defaults"
    raw: dict[str, Any] = {}
    if isinstance(path, Recipe):
        if not any(value is not None for value in (overrides or {}).values()):
            return path
        source, raw = "the given recipe", path.model_dump(mode="json")
    elif path is not None:
        recipe_path = resolve_recipe_path(path)
        source = str(recipe_path)
        try:
            raw = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise RecipeError(f"recipe {recipe_path} is not valid TOML: {error}") from error
        except OSError as error:
            raise RecipeError(f"recipe {recipe_path} cannot be read: {error.strerror}") from error
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value, source)
            source = source if source.endswith("overrides") else f"{source} with overrides"
    try:
        return Recipe.model_validate(_lists_to_tuples(raw))
    except ValidationError as error:
        where = ("the built-in recipe" if source.startswith("defaults") else source.split(" with ")[0]
                 if source.startswith("the given") else f"recipe {source.split(' with ')[0]}")
        if source.endswith("overrides"):
            where += " with your settings"
        raise RecipeError(f"{_describe(error)} (in {where})") from None


def stage_indices(selector: str, count: int) -> list[int]:
    """The stages a stage key's selector names: "1" the second, "-1" the last, "1:" the
    second on (as a Python slice: "-1:" is the last).

    Args:
        selector: the middle part of ``stages.SELECTOR.key``.
        count: the recipe's number of stages.

    Returns:
        Stage indices, from 0.

    Raises:
        ValueError: not an index, or one the recipe does not have.
    """
    start = int(selector.removesuffix(":"))
    if not -count <= start < count:  # it starts at a stage the recipe has
        raise ValueError(f"stage {start} of {count}")
    return list(range(start % count, count)) if selector.endswith(":") else [start % count]


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    """Set ``raw["a"]["b"] = value`` for key "a.b".

    Stage keys take an index, "stages.1.epochs", or an open range, "stages.1:.epochs"
    (every stage from the second on).
    """
    parts = key.split(".")
    malformed = len(parts) != 3 or parts[0] != "stages" or not re.fullmatch(r"-?\d+:?", parts[1])
    if parts[0].rstrip(":") == "stages" and malformed:
        field = parts[-1] if len(parts) > 1 else "epochs"
        raise RecipeError(
            f"override {key}: a stage key names its stages: stages.0.{field} (the first), "
            f"stages.1:.{field} (the second on) or stages.0:.{field} (all)"
        )
    if parts[0] == "stages":
        stages = raw.setdefault("stages", [stage.model_dump() for stage in DEFAULT_STAGES])
        if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
            raise RecipeError(f"override {key}: stages in {source} is not a list of [[stages]] tables")
        if not stages:
            raise RecipeError(f"override {key}: {source} has no stages; at least one [[stages]] table is needed")
        try:
            chosen = stage_indices(parts[1], len(stages))
        except ValueError:
            raise RecipeError(
                f"override {key}: the recipe has {len(stages)} stage(s); use an index from 0 "
                f"to {len(stages) - 1}"
            ) from None
        for index in chosen:
            stages[index][parts[2]] = value
        return
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {key}: {part} is not a table in {source}")
    node[parts[-1]] = value


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _lists_to_tuples(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_lists_to_tuples(item) for item in value)
    return value


def _describe(error: ValidationError) -> str:
    """One line naming each bad key, the value received and what is valid."""
    messages: dict[str, str] = {}
    for item in error.errors():
        # Drop the union-member names pydantic adds ("unfreeze.int", "unfreeze.literal[...]").
        loc = [str(part) for part in item["loc"] if not str(part).startswith(("int", "literal["))]
        key = ".".join(loc)
        kind = item["type"]
        received = item.get("input")
        if kind == "extra_forbidden":
            parent = _section_fields(loc[:-1])
            text = f"unknown key {key!r}" + (f"; valid keys here: {', '.join(parent)}" if parent else "")
        elif kind == "value_error":
            text = str(item["msg"]).removeprefix("Value error, ")
            if key:
                text = f"{key}: {text}"
        elif kind in ("tuple_type", "list_type"):
            text = f"{key} = {received!r}: expected a list" + _list_hint(received)
        else:
            text = f"{key} = {received!r}: {item['msg']}"
        if key in messages and kind not in ("extra_forbidden",):
            if "'all'" in item["msg"] or "'all'" in messages[key]:
                low = 1 if key == "devices" else 0
                messages[key] = f"{key} = {received!r}: expected an integer >= {low} or 'all'"
            continue
        messages[key] = text
    return "; ".join(messages.values())


def _list_hint(received) -> str:
    """How the value received would read as a list, where that is a fair guess."""
    if isinstance(received, str) and received.lstrip().startswith("["):
        return " (TOML writes one in brackets, both of them: [256, 64])"
    if isinstance(received, bool) or (isinstance(received, int | float) and received <= 0):
        return ""
    return f", e.g. [{received!r}]"


def _section_fields(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if annotation is None:
            return []
        if hasattr(annotation, "__args__"):  # tuple[StageConfig, ...]
            annotation = annotation.__args__[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def parse_override(assignment: str) -> tuple[str, Any]:
    """Parse a ``--set key=value`` flag; the value is read as TOML, else as a string.

    Raises:
        RecipeError: no '=' in the assignment.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set head.dropout=0.5")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.strip(), value
