"""The config schema: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtune.config import Config, load_config, parse_override_args, save_config
from lmtune.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "lmtune" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_model_shorthand_and_defaults() -> None:
    cfg = load_config({"model": "minilm", "data": {"train": "x.csv"}})
    assert cfg.model.name == "minilm"
    assert cfg.task == "classification"
    assert cfg.train.resolved_metric("accuracy") == ("accuracy", True)
    assert cfg.train.model_copy(update={"metric": "loss"}).resolved_metric("accuracy") == ("loss", False)


def test_overrides_parse_like_yaml() -> None:
    got = parse_override_args(["--train.epochs", "1", "--method.name=lora", "--data.labels", "[a, b]",
                               "--train.max_grad_norm", "null", "--output_dir", "runs/x"])
    assert got == {"train.epochs": 1, "method.name": "lora", "data.labels": ["a", "b"],
                   "train.max_grad_norm": None, "output_dir": "runs/x"}
    cfg = load_config({"model": "minilm", "data": {"train": "x.csv"}}, got)
    assert cfg.train.epochs == 1 and cfg.method.name == "lora" and cfg.train.max_grad_norm is None
    # a nested key under the string shorthand
    cfg = load_config({"model": "minilm", "data": {"train": "x.csv"}}, {"model.trust_remote_code": True})
    assert cfg.model.name == "minilm" and cfg.model.trust_remote_code


@pytest.mark.parametrize(
    ("raw", "overrides", "expected"),
    [
        ({"data": {"train": "x"}}, {"train.epoch": 1}, ["unknown key 'train.epoch'", "allowed here:", "epochs"]),
        ({"data": {"train": "x"}, "trian": {}}, {}, ["unknown key 'trian'", "train"]),
        ({"data": {"train": "x"}}, {"train.batch_size": "many"}, ["'train.batch_size'", "integer", "many"]),
        ({"data": {"train": "x"}}, {"method.name": "adapter"}, ["'method.name'", "full", "lora"]),
        ({"data": {"train": "x"}}, {"train.precision": "fp8"}, ["'train.precision'", "bf16"]),
        ({}, {}, ["missing required key 'data'"]),
        ({"data": {}}, {}, ["missing required key 'data.train'"]),
        ({"data": {"train": "x"}, "task": "telepathy"}, {}, ["unknown task 'telepathy'", "classification"]),
        ({"data": {"train": "x"}}, {"train.learning_rate": -1}, ["'train.learning_rate'", "greater than 0"]),
        ({"data": {"train": "x", "validation_size": 0.5, "test_size": 0.5}}, {}, ["at least 10%"]),
        ({"data": {"train": "x"}, "baselines": ["magic"]}, {}, ["unknown baseline", "tfidf_logreg"]),
    ],
)
def test_bad_config_names_the_key(raw: dict, overrides: dict, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(raw, overrides)
    for fragment in expected:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("task: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "must be a mapping"), (b"\xff\xfe\x00", "not UTF-8")],
)
def test_bad_yaml_file(tmp_path: Path, text: str | bytes, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_override_into_non_section_fails() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        load_config({"data": {"train": "x"}, "output_dir": "y"}, {"output_dir.sub": 1})


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config({"model": "minilm", "data": {"train": "x.csv"}}, {"method.name": "lora", "method.r": 4})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override", [["--train.batch_size", "1" * 30], ["--train.epochs", "1" * 5000],
                                      ["--train.max_steps", "1" * 20]])
def test_absurd_numbers_are_config_errors(override: list[str]) -> None:
    from lmtune.config import parse_override_args

    with pytest.raises(ConfigError, match="train\\."):
        load_config({"data": {"train": "x.csv"}}, parse_override_args(override))


# ------------------------------------------------------------------------------------------ method-aware defaults
@pytest.mark.parametrize(("extra", "lr", "head_lr"), [
    ({}, 5e-5, 1e-3),                                                   # full: the body gently, a new head fast
    ({"method": {"name": "freeze", "unfrozen_layers": 1}}, 5e-5, 1e-3),
    ({"method": {"name": "lora"}}, 2e-4, None),                         # adapters start at zero: a larger step
    ({"method": {"name": "qlora"}}, 2e-4, None),
    ({"task": "causal_lm", "model": {"name": "smollm2", "init": "scratch"}}, 1e-3, None),
    ({"model": "baseline:gru"}, 1e-3, None),                            # the baseline's own settings
    ({"method": {"name": "lora"}, "train": {"learning_rate": 1e-5}}, 1e-5, None),  # what the user says wins
    ({"train": {"head_learning_rate": 3e-4}}, 5e-5, 3e-4),
    ({"train": {"learning_rate": 1e-2}}, 1e-2, 1e-2),                  # a head never slower than the body
])
def test_learning_rate_defaults_follow_the_method(extra: dict, lr: float, head_lr: float | None) -> None:
    # Issue 13: `method: lora` and nothing else trained at the full-tuning rate, 4-10x too slowly.
    cfg = load_config({"data": {"train": "train.csv"}, **extra})
    assert cfg.train.learning_rate == pytest.approx(lr)
    assert cfg.train.head_learning_rate == (pytest.approx(head_lr) if head_lr else None)
    rates = cfg.learning_rates()
    user_set = "learning_rate" in extra.get("train", {}) or extra.get("model") == "baseline:gru"
    assert ("learning_rate" in rates["defaults"]) is not user_set


def test_learning_rate_defaults_survive_a_saved_config(tmp_path: Path) -> None:
    # A run's config.yaml holds the values it trained with: a resumed run keeps them, and an old run that
    # trained with head_learning_rate null keeps training that way.
    cfg = load_config({"data": {"train": "train.csv"}, "method": {"name": "lora"}})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.train.learning_rate == pytest.approx(2e-4) and again.learning_rates()["defaults"] == {}
    old = cfg.to_dict()
    old["method"]["name"] = "full"
    old["train"]["learning_rate"], old["train"]["head_learning_rate"] = 5e-5, None
    assert load_config(old).train.head_learning_rate is None


def test_lmtune_tasks_lists_every_task(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from helpers import run_cli

    from lmtune.config.tasks import TASK_INFOS

    assert run_cli(["tasks", "--json"], monkeypatch) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(TASK_INFOS)
    for name, t in listed.items():
        assert t["summary"] and t["reads"] and t["metrics"], name
    assert [n for n, t in listed.items() if t["default"]] == [Config.model_fields["task"].default_factory()]
    assert run_cli(["tasks"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASK_INFOS) and "reads" in out
