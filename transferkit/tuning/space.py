"""The search space of ``transferkit tune``: the recipe's ``[tune]`` section (or a default one)
turned into Optuna distributions, and each trial's values turned back into recipe overrides.

A parameter is named by its recipe key ("stages.0.learning_rate", "head.units"), so a
trial's parameters read as the ``--set`` flags that would reproduce it. Choices that are not
plain values (``head.units = {choices = [[64], [256, 64]]}``) reach Optuna as their JSON text
("[256, 64]"), which its samplers and plots take as categories.

No Optuna import at module level: the distributions are built only when a study runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transferkit.errors import RecipeError
from transferkit.recipe import Recipe, TuneParam, keys_meet, load_recipe

# The space searched when the recipe has no [tune] section (stage keys only where the
# recipe has such a stage that trains).
DEFAULT_HEAD_RATES = TuneParam(low=1e-4, high=1e-2, log=True)
DEFAULT_FINE_RATES = TuneParam(low=1e-6, high=1e-3, log=True)
DEFAULT_DROPOUT = TuneParam(low=0.0, high=0.5)
DEFAULT_UNITS = TuneParam(choices=((128,), (256,), (512,), (256, 128)))
DEFAULT_MAX_UNFREEZE = 3


@dataclass(frozen=True)
class Parameter:
    """One searched recipe key.

    Attributes:
        key: the dotted recipe key, also the Optuna parameter's name.
        spec: its ``TuneParam``.
        kind: "float", "int" or "choice".
        repeat: for a range on a list key (``head.units``), the list's length (every entry
            takes the value); else None.
    """

    key: str
    spec: TuneParam
    kind: str
    repeat: int | None = None

    def recipe_value(self, sampled: Any) -> Any:
        """A sampled value as the recipe key takes it."""
        if self.kind == "choice":
            return _decoded(sampled, self.spec.choices)
        sampled = float(sampled) if self.kind == "float" else int(sampled)
        return [sampled] * self.repeat if self.repeat is not None else sampled

    def sampled_value(self, recipe_value: Any) -> Any | None:
        """The sampled value that gives ``recipe_value``, or None when the space lacks it."""
        if self.kind == "choice":
            encoded = _encoded(_plain(recipe_value))
            return encoded if encoded in [_encoded(value) for value in self.spec.choices] else None
        if self.repeat is not None:
            values = set(recipe_value) if isinstance(recipe_value, (list, tuple)) else set()
            if len(values) != 1:
                return None
            recipe_value = values.pop()
        if isinstance(recipe_value, bool) or not isinstance(recipe_value, (int, float)):
            return None
        if not self.spec.low <= recipe_value <= self.spec.high:
            return None
        if self.kind == "int":
            step = self.spec.step or 1
            on_grid = recipe_value == int(recipe_value) and (recipe_value - self.spec.low) % step == 0
            return int(recipe_value) if on_grid else None
        if self.spec.step is not None:  # on the grid low + k * step, within float rounding
            steps = (recipe_value - self.spec.low) / self.spec.step
            if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
                return None
        return float(recipe_value)


def default_space(recipe: Recipe) -> dict[str, TuneParam]:
    """The space searched when the recipe has no ``[tune]`` section: the head stage's
    learning rate (log-uniform 1e-4..1e-2), the head's dropout (0..0.5) and units (128, 256,
    512 or 256+128), and for each later stage that trains its own learning rate
    (log-uniform 1e-6..1e-3) and how many blocks it unfreezes (0..3, or up to the recipe's
    own depth when that is more).

    Args:
        recipe: the study's recipe.

    Returns:
        Recipe key -> ``TuneParam``.
    """
    from transferkit.backbones import get_spec

    space = {"stages.0.learning_rate": DEFAULT_HEAD_RATES, "head.dropout": DEFAULT_DROPOUT, "head.units": DEFAULT_UNITS}
    blocks = len(get_spec(recipe.backbone).blocks)
    for index, stage in enumerate(recipe.stages[1:], start=1):
        if stage.epochs == 0:
            continue
        deepest = max(min(DEFAULT_MAX_UNFREEZE, blocks), stage.unfreeze if isinstance(stage.unfreeze, int) else 0)
        space[f"stages.{index}.learning_rate"] = DEFAULT_FINE_RATES
        space[f"stages.{index}.unfreeze"] = TuneParam(low=0, high=deepest)
    return space


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys over one base recipe, resolved as ``load_recipe(source, overrides)``
    resolves it.

    Attributes:
        source: the recipe file (or shipped name, or None for the defaults).
        overrides: the user's overrides over it.
        parameters: the searched keys.
        fixed: keys of the default space left out because the overrides set them (a key
            given with --set or a flag stays as given); empty with a ``[tune]`` section.
    """

    source: str | os.PathLike | None
    overrides: Mapping[str, Any]
    parameters: tuple[Parameter, ...]
    fixed: tuple[str, ...] = ()

    def recipe(self, values: Mapping[str, Any] | None = None) -> Recipe:
        """The recipe with the searched keys set to ``values`` (recipe values, by key).

        Raises:
            RecipeError: the combination is not a valid recipe.
        """
        return load_recipe(self.source, {**self.overrides, **(values or {})})

    def suggest(self, trial) -> dict[str, Any]:
        """Sample every parameter for an Optuna trial.

        Returns:
            Recipe key -> value, the trial's overrides.
        """
        return {parameter.key: parameter.recipe_value(_suggest(trial, parameter)) for parameter in self.parameters}

    def recipe_params(self, recipe: Recipe) -> dict[str, Any]:
        """The sampled values that reproduce ``recipe``'s own settings of the searched keys
        (those the space holds), for enqueuing the recipe as given as a trial."""
        values = {}
        for parameter in self.parameters:
            sampled = parameter.sampled_value(recipe_value(recipe, parameter.key))
            if sampled is not None:
                values[parameter.key] = sampled
        return values

    def outside(self, recipe: Recipe) -> list[str]:
        """The searched keys whose value in ``recipe`` the space does not hold (the first
        trial, the recipe as given, samples them instead), as "key value"."""
        held = self.recipe_params(recipe)
        return [f"{parameter.key} {_plain(recipe_value(recipe, parameter.key))!r}"
                for parameter in self.parameters if parameter.key not in held]


def build_space(source, overrides: Mapping[str, Any] | None, base: Recipe) -> SearchSpace:
    """The search space of ``base`` (its ``[tune]`` section, or ``default_space``), each
    range's ends and each choice checked against the recipe.

    Args:
        source: what ``base`` was loaded from (a file, a shipped name, or None).
        overrides: the overrides ``base`` was loaded with.
        base: the study's recipe.

    Returns:
        The ``SearchSpace``.

    Raises:
        RecipeError: a range end or a choice that the key does not take, named.
    """
    overrides = dict(overrides or {})
    specs, fixed = dict(base.tune.root), ()
    if not specs:  # transferkit's own space: a key the user set stays as set
        specs = default_space(base)
        fixed = tuple(key for key in specs if any(keys_meet(override, key, len(base.stages)) for override in overrides))
        specs = {key: spec for key, spec in specs.items() if key not in fixed}
    parameters = []
    for key, spec in specs.items():
        current = recipe_value(base, key)
        parameter = _parameter(key, spec, current)
        candidates = spec.choices if spec.choices is not None else (spec.low, spec.high)
        for candidate in candidates:
            value = parameter.recipe_value(_encoded(candidate) if parameter.kind == "choice" else candidate)
            try:
                load_recipe(source, {**overrides, key: value})
            except RecipeError as error:
                raise RecipeError(f"[tune] {key}: the value {_plain(value)!r} does not fit the recipe: "
                                  f"{error}") from None
        parameters.append(parameter)
    return SearchSpace(source, overrides, tuple(parameters), fixed)


def recipe_value(recipe: Recipe, key: str) -> Any:
    """The recipe's value of a dotted key (a stage range names its first stage), or None."""
    node: Any = recipe.model_dump(mode="json")
    for part in key.split("."):
        if isinstance(node, list):
            try:
                node = node[int(part.rstrip(":"))]
            except (ValueError, IndexError):
                return None
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _parameter(key: str, spec: TuneParam, current: Any) -> Parameter:
    """A key's kind: choices; a range on a list key (its length kept); a float range where
    the recipe's value is a float, even between integer ends; else by the ends' types."""
    if spec.choices is not None:
        return Parameter(key, spec, "choice")
    repeat = None
    if isinstance(current, list):
        repeat = max(1, len(current))
        current = current[0] if current else None
    integers = all(isinstance(value, int) for value in (spec.low, spec.high, spec.step) if value is not None)
    kind = "int" if integers and not isinstance(current, float) else "float"
    return Parameter(key, spec, kind, repeat)


def _suggest(trial, parameter: Parameter):
    spec = parameter.spec
    if parameter.kind == "choice":
        return trial.suggest_categorical(parameter.key, [_encoded(value) for value in spec.choices])
    if parameter.kind == "int":
        return trial.suggest_int(parameter.key, spec.low, spec.high, step=spec.step or 1, log=spec.log)
    step = float(spec.step) if spec.step is not None else None
    return trial.suggest_float(parameter.key, float(spec.low), float(spec.high), step=step, log=spec.log)


def _plain(value: Any) -> Any:
    """Tuples (as the recipe holds lists) as lists, all the way down."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _encoded(choice: Any) -> Any:
    """A choice as Optuna takes it: plain values as they are, lists as their JSON text."""
    if isinstance(choice, (list, tuple)):
        return json.dumps(_plain(choice))
    return choice


def _decoded(sampled: Any, choices) -> Any:
    for choice in choices:
        if _encoded(choice) == sampled:
            return _plain(choice)
    raise AssertionError(f"{sampled!r} is none of the choices {choices!r}")
