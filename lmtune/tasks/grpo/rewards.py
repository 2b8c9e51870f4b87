"""The rewards of ``task: grpo``: built-in reward functions, your own functions named ``module:function``, and a
reward run's model (``grpo.reward_model``), scored together by :class:`Rewards`.

A reward function follows TRL's convention: it is called with keyword arguments only and returns one float (or
None: "cannot score this one") per completion::

    def my_reward(prompts, completions, **kwargs) -> list[float | None]: ...

- ``prompts``: each completion's prompt as the data gave it (text, or a list of messages);
- ``completions``: the answers' text (end-of-turn token left out);
- ``completion_ids``: the answers' token ids; ``stopped``: whether each answer ended by itself (end-of-turn)
  rather than being cut at ``generation.max_new_tokens``;
- every other column of the data, as a list beside the completions (``answer=[...]``).

A function that takes no ``**kwargs`` gets the arguments it names only. ``module`` is imported as ``python``
imports it: from the current folder (put on ``sys.path`` as ``python -m`` does) or anything installed. Several
rewards are summed with ``grpo.reward_weights`` (the reward model, if any, counts last); a completion that every
reward leaves unscored (None) is left out of the statistics and gets no advantage, as in TRL.

Built-ins (:data:`BUILTIN_REWARDS`): ``exact_answer`` and ``answer_in_completion`` compare with the row's
``answer`` column (``data.columns: {answer: your_column}`` names another), ``stops`` rewards answers that end by
themselves. Light on purpose (no torch): ``lmtune tasks`` lists the built-ins when lmtune starts.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from lmtune.data.table import column_suggestion
from lmtune.errors import ConfigError
from lmtune.tasks.base import get_predictor

# The config keys errors name.
REWARDS_KEY = "grpo.rewards"
REWARD_MODEL_KEY = "grpo.reward_model"
# Arguments every reward function may take besides the data's columns (a column of the same name is not passed).
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "stopped")
# The name of the reward model's figures in the metrics.
REWARD_MODEL_NAME = "reward_model"

# A number as answers write it: an optional sign (not glued to a word or a digit before it), digits with optional
# thousands commas, an optional fraction.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])|(?<![\w.])[-+]?\.\d+")


# ------------------------------------------------------------------------------------------ built-ins
def normalise_text(text: Any) -> str:
    """``text`` lower-cased, its white space collapsed, a final full stop dropped (how answers are compared)."""
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def parse_number(text: Any) -> Decimal | None:
    """``text`` as a number when the whole of it is one (``"1,000"``, ``"-8"``, ``"3.50"``), else None."""
    stripped = str(text).strip().rstrip(".")
    match = _NUMBER.fullmatch(stripped)
    return _decimal(match.group(0)) if match else None


def final_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (``"17 + 25 = 42."`` gives 42), or None."""
    numbers = _NUMBER.findall(text)
    return _decimal(numbers[-1]) if numbers else None


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact_answer(completions: list[str], answer: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion gives the row's ``answer``: its final number equals a numeric answer (``42``,
    ``42.0`` and ``42.`` are one number), or its last line equals the answer once case, spaces and a final full
    stop are set aside; else 0.0. None where the row has no answer."""
    scores: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        if reference is None or not str(reference).strip():
            scores.append(None)
            continue
        number = parse_number(reference)
        same_number = number is not None and final_number(completion) == number
        same_line = normalise_text(_last_line(completion)) == normalise_text(reference)
        scores.append(1.0 if same_number or same_line else 0.0)
    return scores


def answer_in_completion(completions: list[str], answer: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the row's ``answer`` appears anywhere in the completion as a whole word or number (case and spaces
    set aside; a numeric answer matches any number of the same value), else 0.0. None where the row has no answer."""
    scores: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        if reference is None or not str(reference).strip():
            scores.append(None)
            continue
        number = parse_number(reference)
        if number is not None:
            found = any(_decimal(n) == number for n in _NUMBER.findall(completion))
        else:
            pattern = r"(?<!\w)" + re.escape(normalise_text(reference)) + r"(?!\w)"
            found = re.search(pattern, " ".join(completion.lower().split())) is not None
        scores.append(1.0 if found else 0.0)
    return scores


def stops(completions: list[str], stopped: list[bool], **kwargs: Any) -> list[float]:
    """1.0 when the answer ended by itself (its end-of-turn token), 0.0 when ``generation.max_new_tokens`` cut it."""
    return [1.0 if done else 0.0 for done in stopped]


BUILTIN_REWARDS: dict[str, Callable[..., Sequence[float | None]]] = {
    "exact_answer": exact_answer,
    "answer_in_completion": answer_in_completion,
    "stops": stops,
}
# The data columns each built-in reads.
BUILTIN_COLUMNS: dict[str, tuple[str, ...]] = {"exact_answer": ("answer",), "answer_in_completion": ("answer",),
                                               "stops": ()}


def check_reward_names(names: list[str]) -> None:
    """Config-time checks of ``grpo.rewards`` (nothing is imported): ValueError naming the bad entry."""
    for name in names:
        if ":" in name:
            module, _, function = name.partition(":")
            if not module.strip() or not function.strip() or not function.isidentifier():
                raise ValueError(f"grpo.rewards: {name!r} is neither a built-in reward nor module:function "
                                 "(e.g. my_rewards:correct)")
        elif name not in BUILTIN_REWARDS:
            raise ValueError(f"grpo.rewards: unknown built-in reward {name!r}; built-ins: {', '.join(BUILTIN_REWARDS)}"
                             "; your own function: module:function")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"grpo.rewards lists {', '.join(repeated)} twice (weigh a reward with grpo.reward_weights)")


# ------------------------------------------------------------------------------------------ loading
@dataclass
class RewardFunction:
    """One configured reward function: its name in the metrics, its config entry, the callable and its weight."""

    name: str
    spec: str
    function: Callable[..., Any]
    weight: float
    # The keyword arguments it takes; None when it takes **kwargs (it gets them all).
    takes: frozenset[str] | None
    # The arguments it must have (no default): checked against the data's columns.
    required: frozenset[str] = field(default_factory=frozenset)


def load_reward_function(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names: a built-in reward, or ``module:function`` imported (the current folder on
    ``sys.path``, as ``python -m`` has it). A ConfigError naming ``grpo.rewards`` when it cannot be had."""
    if ":" not in spec:
        if spec not in BUILTIN_REWARDS:
            raise ConfigError(f"unknown built-in reward {spec!r}; built-ins: {', '.join(BUILTIN_REWARDS)}",
                              field=REWARDS_KEY, hint="your own function: module:function")
        return BUILTIN_REWARDS[spec]
    module_name, _, name = spec.partition(":")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        # `lmtune` runs as an installed script, whose sys.path lacks the current folder that `python -m` puts first:
        # a reward module next to the config must import as the user expects.
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(f"reward {spec!r}: no module named {module_name!r}", field=REWARDS_KEY,
                              hint="the module must be importable from the current folder (or PYTHONPATH): "
                              f"{module_name.replace('.', '/')}.py") from None
        raise ConfigError(f"reward {spec!r}: importing {module_name!r} needs the module {missing!r}, which is not "
                          "installed", field=REWARDS_KEY) from exc
    except Exception as exc:  # the user's module failed while importing: say where, keep the cause chained
        raise ConfigError(f"reward {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}",
                          field=REWARDS_KEY) from exc
    function = getattr(module, name, None)
    if function is None:
        public = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(f"reward {spec!r}: module {module_name!r} has no function {name!r}", field=REWARDS_KEY,
                          hint=column_suggestion(name, public) or (f"its functions: {', '.join(sorted(public))}"
                                                                   if public else None))
    if not callable(function):
        raise ConfigError(f"reward {spec!r}: {module_name}.{name} is a {type(function).__name__}, not a function",
                          field=REWARDS_KEY)
    return function


def reward_function(spec: str, weight: float) -> RewardFunction:
    """A :class:`RewardFunction` for one ``grpo.rewards`` entry, with the arguments its signature takes."""
    function = load_reward_function(spec)
    name = spec if ":" not in spec else getattr(function, "__name__", spec.partition(":")[2])
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin or extension callable without a signature: give it everything
        return RewardFunction(name, spec, function, weight, None)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        takes = None
    else:
        takes = frozenset(p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                   inspect.Parameter.KEYWORD_ONLY))
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    if positional:
        raise ConfigError(f"reward {spec!r}: the arguments {', '.join(positional)} are positional-only; reward "
                          "functions are called with keywords (prompts=..., completions=..., column=...)",
                          field=REWARDS_KEY)
    required = frozenset(p.name for p in parameters if p.default is inspect.Parameter.empty
                         and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    return RewardFunction(name, spec, function, weight, takes, required)


class RewardModel:
    """A ``task: reward`` run's model as a reward (``grpo.reward_model``): the folder is checked at once, the model
    loaded when it first scores (its predictor's ``score(prompts, completions)``)."""

    name = REWARD_MODEL_NAME

    def __init__(self, folder: str, weight: float, *, batch_size: int = 32) -> None:
        path = Path(folder).expanduser()
        model_dir = path / "model" if (path / "model" / "lmtune.json").is_file() else path
        meta_file = model_dir / "lmtune.json"
        if not meta_file.is_file():
            raise ConfigError(f"{folder} is not an lmtune run or model folder (no model/lmtune.json)",
                              field=REWARD_MODEL_KEY, hint="name the folder of a finished `task: reward` run")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {meta_file}: {exc}", field=REWARD_MODEL_KEY) from None
        task = meta.get("task") if isinstance(meta, dict) else None
        if task != "reward":
            raise ConfigError(f"{folder} holds a {task or 'unknown'} model, not a reward model", field=REWARD_MODEL_KEY,
                              hint="train one with `task: reward` on preference pairs, then name its run folder")
        self.model_dir, self.meta, self.weight, self.batch_size = model_dir, meta, weight, batch_size
        self._predictor: Any = None

    def score(self, messages: list[list[dict[str, str]]], completions: list[str], *, device: str | None
              ) -> list[float]:
        """One score per (prompt messages, completion), loading the model on ``device`` the first time."""
        if self._predictor is None:
            try:
                predictor_class = get_predictor("reward")
            except KeyError:
                raise ConfigError("this version of lmtune cannot load reward models (no `reward` predictor)",
                                  field=REWARD_MODEL_KEY) from None
            self._predictor = predictor_class(self.model_dir, self.meta, device=device)
        return [float(s) for s in self._predictor.score(messages, completions, batch_size=self.batch_size)]


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class Scored:
    """The rewards of N completions: ``per_reward[name]`` one float per completion (NaN: left unscored)."""

    per_reward: dict[str, list[float]]
    weights: dict[str, float]

    def totals(self) -> list[float]:
        """The weighted sum per completion (NaN where every reward left it unscored)."""
        out = []
        for i in range(len(next(iter(self.per_reward.values()), []))):
            values = [(self.weights[name], scores[i]) for name, scores in self.per_reward.items()]
            scored = [w * v for w, v in values if not math.isnan(v)]
            out.append(sum(scored) if scored else math.nan)
        return out


class Rewards:
    """Every configured reward, scoring completions together (:meth:`score`)."""

    def __init__(self, functions: list[RewardFunction], model: RewardModel | None) -> None:
        self.functions = functions
        self.model = model
        names = [f.name for f in functions] + ([model.name] if model else [])
        # Two functions of one name (`a:score`, `b:score`): the later ones keep their whole entry as name.
        for f in functions:
            if names.count(f.name) > 1:
                f.name = f.spec
        self.names = [f.name for f in functions] + ([model.name] if model else [])

    @classmethod
    def from_config(cls, rewards: list[str], weights: list[float] | None, reward_model: str | None) -> Rewards:
        """The rewards ``grpo.rewards``/``reward_weights``/``reward_model`` name (functions imported now)."""
        count = len(rewards) + (1 if reward_model else 0)
        weights = list(weights) if weights is not None else [1.0] * count
        if len(weights) != count:
            raise ConfigError(f"grpo.reward_weights has {len(weights)} weights for {count} rewards",
                              field="grpo.reward_weights", hint="one weight per reward; the reward model counts last")
        functions = [reward_function(spec, w) for spec, w in zip(rewards, weights, strict=False)]
        model = RewardModel(reward_model, weights[-1]) if reward_model else None
        return cls(functions, model)

    def check_columns(self, columns: set[str], *, source: str) -> None:
        """Each function's required arguments are among :data:`REWARD_ARGUMENTS` and the data's ``columns``."""
        for f in self.functions:
            needed = set(BUILTIN_COLUMNS.get(f.spec, ())) | (set(f.required) - set(REWARD_ARGUMENTS))
            missing = sorted(needed - columns)
            if missing:
                listed = ", ".join(sorted(columns)) or "none besides the prompt"
                raise ConfigError(
                    f"reward {f.spec!r} reads the column(s) {', '.join(missing)}, which {source} does not have "
                    f"(its other columns: {listed})", field=REWARDS_KEY,
                    hint="name your column with data.columns, e.g. {answer: solution}" if "answer" in missing
                    else "add the column, or give the argument a default")

    def score(self, *, prompts: list[Any], messages: list[list[dict[str, str]]], completions: list[str],
              completion_ids: list[list[int]], stopped: list[bool], columns: dict[str, list[Any]],
              device: str | None = None) -> Scored:
        """Every reward of N completions; ``prompts`` as the data gave them, ``messages`` the same as messages,
        ``columns`` the data's other columns (N values each)."""
        n = len(completions)
        arguments = {**columns, "prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                     "stopped": stopped}
        per_reward: dict[str, list[float]] = {}
        for f in self.functions:
            given = arguments if f.takes is None else {k: v for k, v in arguments.items() if k in f.takes}
            try:
                out = f.function(**given)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"reward {f.spec!r} failed: {type(exc).__name__}: {exc}", field=REWARDS_KEY) from exc
            per_reward[f.name] = _checked(out, n, f.spec)
        if self.model is not None:
            per_reward[self.model.name] = self.model.score(messages, completions, device=device)
        weights = {f.name: f.weight for f in self.functions}
        if self.model is not None:
            weights[self.model.name] = self.model.weight
        return Scored(per_reward, weights)


def _checked(out: Any, n: int, spec: str) -> list[float]:
    """A reward function's result as N floats (None -> NaN); a ConfigError naming ``grpo.rewards`` otherwise."""
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):
        out = out.tolist()  # a numpy array or a tensor
    if not isinstance(out, (list, tuple)):
        raise ConfigError(f"reward {spec!r} returned {type(out).__name__}; it must return a list of {n} numbers "
                          "(one per completion, None for one it cannot score)", field=REWARDS_KEY)
    if len(out) != n:
        raise ConfigError(f"reward {spec!r} returned {len(out)} rewards for {n} completions (one per completion "
                          "expected)", field=REWARDS_KEY)
    values = []
    for i, value in enumerate(out):
        if value is None:
            values.append(math.nan)
        elif isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
            values.append(float(value))
        else:
            raise ConfigError(f"reward {spec!r} returned {type(value).__name__} for completion {i}; rewards are "
                              "numbers (or None)", field=REWARDS_KEY)
    return values
