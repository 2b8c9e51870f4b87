"""The ``tune:`` section: a hyper-parameter search space and its budget (``lmtune tune``).

The space maps dotted config keys to a distribution::

    tune:
      space:
        train.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}
        train.warmup_ratio: {uniform: [0.0, 0.1]}
        train.batch_size: {int: [8, 32], step: 8}
        method.r: [8, 16, 32]          # a plain list: one of these values

It is checked when the config loads (:func:`check_tune_space`): every key must be a real config field,
every range must be ordered (and positive for a log range), and both ends must be values the field
accepts, so a typo or an impossible range fails before the first trial, not after an hour of search.
This module does not import the schema (the schema imports it): it walks the config's own model class.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

RANGE_KINDS = ("log_uniform", "uniform", "int")
# Keys a trial may not change: the study decides where each trial's run goes, and a trial carries no search.
_NOT_SEARCHABLE = ("output_dir", "tune")


class TuneConfig(BaseModel):
    """How ``lmtune tune`` searches: the space, the budget, pruning, and where the study lives."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    space: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted config key -> distribution: {log_uniform: [lo, hi]}, {uniform: [lo, hi]}, "
        "{int: [lo, hi], step: N} or a plain list of values to choose from.",
    )
    trials: int = Field(10, ge=1, le=100_000, description="Trials in the study, all workers together.")
    timeout: float | None = Field(None, gt=0, description="Stop starting trials after this many seconds (per worker).")
    max_tokens: int | None = Field(
        None, ge=1, description="Stop starting trials once the study's trials have trained on this many tokens "
        "in all; a trial that `lmtune plan` says would pass it is refused.",
    )
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="Whether the objective (the best validation train.metric) is maximised (default: from "
        "train.metric / train.greater_is_better).",
    )
    pruner: Literal["median", "successive_halving", "none"] = Field(
        "median", description="Stop poor trials at an evaluation: `median` (worse than the median of earlier trials "
        "at that step), `successive_halving`, or `none`.",
    )
    prune_startup_trials: int = Field(2, ge=0, description="Median pruner: trials that run in full before any is pruned.")
    prune_warmup_steps: int = Field(0, ge=0, description="Median pruner: no trial is pruned before this training step.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="How trials are proposed: `tpe` (Bayesian) or `random`.")
    seed: int | None = Field(None, description="Sampler seed (default: train.seed).")
    include_default: bool = Field(
        True, description="Run the config's own values first, so the best is never worse than the config as written.",
    )
    storage: str | None = Field(
        None, description="Optuna storage URL shared by the workers (default: sqlite:///<output_dir>/study.db; "
        "postgresql://user:password@host/db for workers on several machines).",
    )
    study_name: str | None = Field(None, description="The study's name (default: the last part of output_dir).")
    output_dir: str | None = Field(None, description="The study folder (default: studies/<study_name>).")
    retrain_best: bool = Field(False, description="Train the best config again into <study folder>/best and test it.")

    @field_validator("space")
    @classmethod
    def _specs_well_formed(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key, spec in space.items():
            describe_spec(key, spec)
        return space


def describe_spec(key: str, spec: Any) -> tuple[str, list[Any], int | None]:
    """``(kind, values, step)`` of one search-space entry: kind is a range kind with ``values == [lo, hi]``,
    or ``categorical``; a ValueError naming ``key`` when the entry is malformed or the range impossible."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"tune.space.{key}: an empty list has nothing to choose from")
        if len({repr(v) for v in spec}) != len(spec):
            raise ValueError(f"tune.space.{key}: the list {spec} repeats a value")
        return "categorical", list(spec), None
    if not isinstance(spec, dict):
        raise ValueError(f"tune.space.{key}: expected a list of values or one of {{{': [lo, hi]}, {'.join(RANGE_KINDS)}"
                         f": [lo, hi]}}, got {spec!r}")
    kinds = [k for k in spec if k in RANGE_KINDS]
    extra = [k for k in spec if k not in (*RANGE_KINDS, "step")]
    if len(kinds) != 1 or extra:
        raise ValueError(f"tune.space.{key}: name exactly one of {', '.join(RANGE_KINDS)} (and `step` for int); "
                         f"got {sorted(spec)}")
    kind = kinds[0]
    bounds = spec[kind]
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
        raise ValueError(f"tune.space.{key}: {kind} takes two numbers [lo, hi], got {bounds!r}")
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"tune.space.{key}: impossible range [{lo}, {hi}]: lo must be below hi")
    if kind == "log_uniform" and lo <= 0:
        raise ValueError(f"tune.space.{key}: a log_uniform range must be above 0, got [{lo}, {hi}]")
    step = spec.get("step")
    if step is not None and (kind != "int" or not isinstance(step, int) or isinstance(step, bool) or step < 1):
        raise ValueError(f"tune.space.{key}: `step` is a whole number >= 1 and only for int ranges, got {step!r}")
    if kind == "int" and not all(isinstance(b, int) for b in bounds):
        raise ValueError(f"tune.space.{key}: an int range takes whole numbers, got {bounds!r}")
    return kind, [lo, hi], step


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class an annotation names (``PrivacyConfig | None`` -> PrivacyConfig), if any."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config class: its fields, and the fields of its sections, recursively."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        section = _section_model(info.annotation)
        if section is not None and section is not TuneConfig:
            keys.extend(config_keys(section, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    for part in dotted.split(".")[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[dotted.split(".")[-1]] = value


def check_tune_space(config: BaseModel, space: dict[str, Any]) -> None:
    """Check ``space`` against the config it belongs to: known keys (with close matches when not), and both
    ends of each range (every listed value) accepted by the field; a ValueError naming the key otherwise."""
    model = type(config)
    known = config_keys(model)
    for key in space:
        if key.split(".")[0] in _NOT_SEARCHABLE:
            raise ValueError(f"tune.space.{key}: {key.split('.')[0]} cannot be searched (the study sets it)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else \
                "; keys look like train.learning_rate or method.r (see `lmtune config` / the README)"
            raise ValueError(f"tune.space: unknown config key '{key}'{hint}")
    base = config.model_dump(mode="json")
    base["tune"] = None  # the probes below must not check the space again
    for key, spec in space.items():
        _, values, _ = describe_spec(key, spec)
        for value in values:
            probe = copy.deepcopy(base)
            _set_dotted(probe, key, value)
            try:
                model.model_validate(probe)
            except ValidationError as exc:
                first = exc.errors()[0]
                msg = str(first["msg"]).removeprefix("Value error, ")
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"tune.space.{key}: the value {value!r} is not accepted"
                                 f"{'' if where == key else f' ({where})'}: {msg}") from None


__all__ = ["RANGE_KINDS", "TuneConfig", "check_tune_space", "config_keys", "describe_spec"]
