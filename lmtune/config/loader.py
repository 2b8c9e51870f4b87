"""Loading a config: YAML (data only), dotted overrides, and error messages that name the key.

Overrides from the command line use dotted keys (``--train.epochs 1``) and are applied to the raw
mapping before validation, so they get the same checks as the file.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmtune.config.schema import Config
from lmtune.errors import ConfigError


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        # A list given as data.train is validated as data.train_mix (config/mix.py): name what the user wrote.
        key = key.replace("data.train_mix.", "data.train.")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys_at(e["loc"][:-1])
            lines.append(f"unknown key '{key}'" + (f"; allowed here: {', '.join(allowed)}" if allowed else ""))
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            got = e.get("input")
            shown = f" (got {_CONFIG_REPR.repr(got)})" if isinstance(got, (str, int, float, bool, list)) else ""
            lines.append(f"'{key}': {msg}{shown}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


# ---- config loading limits (fuzzing, issue 6)
# A config holds a few hundred values. YAML aliases nested in each other ("billion laughs") make a
# short file expand to billions of values; walking or printing that would hang, so it is refused.
_MAX_CONFIG_VALUES = 100_000
# Values quoted in error messages are shortened (a wrong-typed list may hold anything).
_CONFIG_REPR = reprlib.Repr()
_CONFIG_REPR.maxlevel, _CONFIG_REPR.maxlist, _CONFIG_REPR.maxdict = 3, 20, 10
_CONFIG_REPR.maxstring = _CONFIG_REPR.maxother = 200


def _check_expansion(raw: Any, path: Path) -> None:
    """A ConfigError when the loaded YAML holds more than ``_MAX_CONFIG_VALUES`` values, counting a value
    reached through several aliases each time (stops at the limit, so its cost is bounded)."""
    stack, count = [raw], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > _MAX_CONFIG_VALUES:
            raise ConfigError(
                f"the config expands to more than {_MAX_CONFIG_VALUES:,} values (anchors and aliases "
                "repeated inside each other?)",
                file=path,
                hint="a config holds a few hundred settings: write them out instead of nesting aliases",
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _allowed_keys_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def parse_value(text: str) -> Any:
    """Parse a command-line override value the way YAML would (``1`` -> int, ``null`` -> None)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):  # as load_config: kept as text,
        return text  # so validation names the key (a 5000-digit int, "[[[[...", "\U80010000")


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.epochs``) in a raw config mapping; returns the same mapping."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif isinstance(child, str) and part == "model" and i == 0:
                # `model: minilm` then `--model.trust_remote_code true`
                child = {"name": child}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def parse_override_args(args: list[str]) -> dict[str, Any]:
    """Turn ``["--train.epochs", "1", "--method.name=lora"]`` into ``{"train.epochs": 1, ...}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' needs a value")
            text = args[i + 1]
            i += 2
        out[key.replace("-", "_") if "." not in key else key] = parse_value(text)
    return out


def load_config(
    source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None
) -> Config:
    """Load and validate a config from a YAML file or a mapping, applying dotted overrides.

    Raises :class:`ConfigError` naming every bad key; nothing is loaded before this passes.
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides must not change the caller's mapping
        name = "(mapping)"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ConfigError("config file not found", file=path)
        text = ""
        try:
            text = path.read_text(encoding="utf-8")
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            # Counted from the character index: PyYAML's own line also breaks at U+2028/U+2029/U+0085.
            line = text.count("\n", 0, mark.index) + 1 if mark is not None else None
            raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", file=path, line=line) from None
        except UnicodeDecodeError as exc:
            hint = "re-save the file as UTF-8"
            raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=path, hint=hint) from None
        except RecursionError:  # PyYAML's parser recurses once per level of [ or {
            raise ConfigError("not valid YAML for a config: nested too deeply", file=path) from None
        except (ValueError, OverflowError) as exc:  # a scalar PyYAML cannot convert: a 5000-digit int,
            # a date 2020-13-45, an escape "\U80010000" past the last code point
            raise ConfigError(f"not valid YAML: a value cannot be read ({exc})", file=path) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError("a config must be a mapping of sections (task, model, data, ...)", file=path)
        _check_expansion(raw, path)
    raw = apply_overrides(raw, overrides or {})
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, name)) from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (data only)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
