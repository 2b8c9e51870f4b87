"""`lmtune export --format gguf`: a decoder as model.gguf + Ollama Modelfile, checked in llama.cpp itself.

Runs are built here from tiny models (no training): a Llama with SmolLM2's real tokenizer and a LoRA adapter
with random non-zero B matrices (the export merges it first), and a Gemma 3 with a sentencepiece-style
vocabulary converted by transformers from a GGUF, as the bundled Gemma 3 is. Their embeddings are scaled up so
the next-token distributions are peaked: a near-uniform distribution would hide a wrong conversion in the KL
and make top-1 agreement a coin toss.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.errors import RunError

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (it builds from source: pip install llama-cpp-python==0.3.36, "
    "or make install)")


def _write_meta(model_dir: Path, **meta: object) -> None:
    (model_dir / "lmtune.json").write_text(json.dumps(meta), encoding="utf-8")


def _sharpen(model: torch.nn.Module, factor: float) -> None:
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(factor)


@pytest.fixture(scope="module")
def lora_llama_run(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """An sft LoRA run on a tiny Llama (hidden 64) with SmolLM2's tokenizer: adapter/ and model/ (merged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    base_dir = tmp_path_factory.mktemp("tiny-llama64")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    base = LlamaForCausalLM(cfg).eval()
    _sharpen(base, 8.0)
    with torch.no_grad():  # sharp, position-dependent attention: a wrong rotary layout must show in the logits
        for layer in base.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(6.0)
            for proj in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                proj.weight.mul_(4.0)
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    run = tmp_path_factory.mktemp("gguf-lora-run")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(run / "adapter", safe_serialization=True)
    copy.deepcopy(model).merge_and_unload().save_pretrained(run / "model", safe_serialization=True)
    tok.save_pretrained(run / "model")
    _write_meta(run / "model", task="sft", method="lora", base_model_path=str(base_dir), saved_as="merged")
    return run


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fully fine-tuned sft run on a tiny Gemma 3 (2 layers, sliding window 8), tokenizer read from a GGUF."""
    from test_gemma import tiny_gemma, write_gguf

    from lmtune.models.registry import GEMMA_TEMPLATE

    model = tiny_gemma()
    # llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim), as the real models' query_pre_attn_scalar says.
    model.config.query_pre_attn_scalar = model.config.head_dim
    _sharpen(model, 4.0)
    source = tmp_path_factory.mktemp("tiny-gemma-gguf") / "tiny.gguf"
    write_gguf(model, source)
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tok.chat_template = GEMMA_TEMPLATE
    run = tmp_path_factory.mktemp("gguf-gemma-run")
    model.save_pretrained(run / "model", safe_serialization=True)
    tok.save_pretrained(run / "model")
    _write_meta(run / "model", task="sft", method="full", saved_as="full")
    return run


def _fields(path: Path) -> dict[str, object]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def llama_f16(lora_llama_run: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    """The LoRA run exported as f16 once (the quantized tests compare with it)."""
    from lmtune.workflows.export_gguf import export_gguf

    return export_gguf(lora_llama_run, tmp_path_factory.mktemp("llama-f16") / "gguf", quantization="f16")


@needs_llama_cpp
def test_llama_f16_matches_merged_model_with_chat_metadata(lora_llama_run: Path, llama_f16: Any) -> None:
    result = llama_f16
    out = result.folder
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "model.gguf"]
    # f16 rounds weights and activations: the distributions agree to ~1e-5 nats, every top-1 and continuation.
    assert result.mean_kl < 1e-3 and result.top1_agreement == 1.0
    assert result.greedy_identical == result.prompts == 8
    facts = json.loads((out / "export.json").read_text())
    assert facts["format"] == "gguf" and facts["quantization"] == "f16" and facts["mean_kl"] == result.mean_kl

    tok = AutoTokenizer.from_pretrained(lora_llama_run / "model")
    fields = _fields(out / "model.gguf")
    assert fields["general.architecture"] == "llama"
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert 'TEMPLATE """' in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert "You are a helpful AI assistant named SmolLM" in modelfile  # the template's default system turn
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


@needs_llama_cpp
def test_gemma3_f16_matches_with_shifted_norms_and_sentencepiece_vocab(gemma_run: Path, tmp_path: Path) -> None:
    import gguf

    from lmtune.workflows.export_gguf import export_gguf

    out = tmp_path / "gguf"
    result = export_gguf(gemma_run, out, quantization="f16")
    # f16 KL ~1e-7; a random tiny model has a near tie or two, where f16 rounding may pick the other token.
    assert result.mean_kl < 1e-4 and result.top1_agreement >= 0.99 and result.greedy_identical >= result.prompts - 1
    fields = _fields(out / "model.gguf")
    assert fields["general.architecture"] == "gemma3"
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.add_bos_token"]) == ("llama", True)
    assert fields["gemma3.attention.sliding_window"] == 8
    tok = AutoTokenizer.from_pretrained(gemma_run / "model")
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<end_of_turn>")
    assert fields["tokenizer.ggml.bos_token_id"] == 2 and fields["tokenizer.ggml.eos_token_id"] == 1
    # Gemma's RMSNorm scales by 1 + w; llama.cpp stores that factor.
    model = AutoModelForCausalLM.from_pretrained(gemma_run / "model", dtype=torch.float32)
    norm = next(t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors if t.name == "output_norm.weight")
    assert torch.allclose(torch.tensor(norm.data), model.model.norm.weight + 1.0)
    modelfile = (out / "Modelfile").read_text()
    assert "<start_of_turn>model" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile


@needs_llama_cpp
@pytest.mark.parametrize("quantization", ["q8_0", "q4_k_m"])
def test_quantized_gguf_within_its_bounds_and_smaller(lora_llama_run: Path, llama_f16: Any, tmp_path: Path,
                                                      quantization: str) -> None:
    from lmtune.models.export_gguf import CHECKS
    from lmtune.workflows.export_gguf import export_gguf

    f16 = llama_f16
    result = export_gguf(lora_llama_run, tmp_path / quantization, quantization=quantization)
    # Rows of 64 are too short for 4-bit k-quants (blocks of 256): llama.cpp falls back to q5_0/q8_0 there.
    assert result.bytes < f16.bytes * 0.7  # the tokenizer metadata (~1.5 MB here) does not shrink
    assert result.mean_kl <= CHECKS[quantization].max_mean_kl
    assert result.top1_agreement >= CHECKS[quantization].min_top1
    assert result.mean_kl > f16.mean_kl  # quantizing really changed the weights
    fields = _fields(tmp_path / quantization / "model.gguf")
    assert fields["general.file_type"] == (7 if quantization == "q8_0" else 15)  # llama_ftype MOSTLY_Q8_0 / Q4_K_M


@needs_llama_cpp
def test_failed_check_leaves_nothing(lora_llama_run: Path, tmp_path: Path) -> None:
    from lmtune.workflows.export_gguf import export_gguf

    out = tmp_path / "gguf"
    with pytest.raises(RunError, match="differs from the merged model"):
        export_gguf(lora_llama_run, out, quantization="f16", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_wrong_conversion_is_caught_by_llama_cpp(lora_llama_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the q/k row permutation llama.cpp rotates the wrong pairs: the check refuses the file."""
    from lmtune.models import gguf_convert
    from lmtune.workflows.export_gguf import export_gguf

    monkeypatch.setattr(gguf_convert, "_permute", lambda weights, n_head: weights)
    with pytest.raises(RunError, match="differs from the merged model"):
        export_gguf(lora_llama_run, tmp_path / "gguf", quantization="f16")
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_held_out_perplexity_recorded_and_max_drop_gate(lora_llama_run: Path, tmp_path: Path) -> None:
    from helpers import story_text

    from lmtune.models.export_gguf import export_gguf_folder

    tok = AutoTokenizer.from_pretrained(lora_llama_run / "model")
    sequences = []
    for paragraph in story_text(6).split("\n\n"):
        ids = tok(paragraph)["input_ids"]
        sequences.append((ids, [-100] * 3 + ids[3:]))  # the first tokens unscored, as a prompt would be
    meta = json.loads((lora_llama_run / "model" / "lmtune.json").read_text())
    result = export_gguf_folder(lora_llama_run, lora_llama_run / "model", meta, tmp_path / "ok",
                                quantization="q8_0", sequences=sequences, max_drop=1e9)
    quality = result.quality
    assert quality is not None and quality["sequences"] == 6
    assert quality["tokens"] == sum(len(ids) - 3 for ids, _ in sequences)  # labels[1:] scored from the 4th
    assert abs(quality["nll_gguf"] - quality["nll_merged"]) < 0.05
    assert json.loads((tmp_path / "ok" / "export.json").read_text())["quality"]["perplexity_gguf"] == \
        quality["perplexity_gguf"]
    with pytest.raises(RunError, match="--max-drop"):  # a perplexity can never fall by all of the merged model's
        export_gguf_folder(lora_llama_run, lora_llama_run / "model", meta, tmp_path / "refused",
                           quantization="q8_0", sequences=sequences, max_drop=-quality["perplexity_merged"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


@needs_llama_cpp
def test_cli_exports_gguf(lora_llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import run_cli

    code = run_cli(["export", str(lora_llama_run), "--format", "gguf", "-o",
                    str(tmp_path / "out")], monkeypatch)
    assert code == 0
    assert (tmp_path / "out" / "model.gguf").is_file()
    assert "top-1 agreement" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_quantization_is_refused(lora_llama_run: Path, tmp_path: Path) -> None:
    from lmtune.workflows.export_gguf import export_gguf

    with pytest.raises(RunError, match=r"unknown GGUF quantization 'q3_k'.*f16, q8_0, q4_k_m"):
        export_gguf(lora_llama_run, tmp_path / "out", quantization="q3_k")
    assert not (tmp_path / "out").exists()


def test_missing_llama_cpp_says_how_to_install(lora_llama_run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtune.models import export_gguf as module
    from lmtune.workflows.export_gguf import export_gguf

    monkeypatch.setattr(module, "llama_cpp", None)
    with pytest.raises(RunError, match="llama-cpp-python is not installed") as info:
        export_gguf(lora_llama_run, tmp_path / "out")
    assert "pip install llama-cpp-python==0.3.36" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_encoder_task_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from lmtune.workflows.export_gguf import export_gguf

    run = tmp_path / "run"
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(run / "model")
    _write_meta(run / "model", task="classification", method="full", saved_as="full", labels=["a", "b"])
    with pytest.raises(RunError, match=r"GGUF export is for decoders.*'classification'"):
        export_gguf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_llama_cpp
def test_unsupported_decoder_architecture_is_refused(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtune.workflows.export_gguf import export_gguf

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    run = tmp_path / "run"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)).save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    _write_meta(run / "model", task="sft", method="full", saved_as="full")
    with pytest.raises(RunError, match=r"converts Llama .* not model_type 'gpt2'"):
        export_gguf(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_modelfile_template_only_for_a_known_chat_family(smollm2_tokenizer_dir: Path) -> None:
    from lmtune.models.ollama import PROBES, _chatml, go_template, modelfile
    from lmtune.models.registry import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tok.chat_template = CHATML_TEMPLATE
    found = go_template(tok)
    assert found is not None and found[1] == ["<|im_end|>"]
    head = str(tok.apply_chat_template(PROBES[0], tokenize=False, add_generation_prompt=True)).split("<|im_start|>user")[0]
    for probe in PROBES:  # the Python twin of the Go template renders as the Jinja one does
        assert _chatml(head)(probe) == tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    text, templated = modelfile(tok, "model.gguf")
    assert not templated and "TEMPLATE" not in text.replace("No TEMPLATE", "")
    assert text.startswith("FROM ./model.gguf\n") and f'PARAMETER stop "{tok.eos_token}"' in text


GO_RENDER = """package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	text, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var convs [][]map[string]string
	json.Unmarshal(raw, &convs)
	t := template.Must(template.New("t").Parse(string(text)))
	for _, conv := range convs {
		var msgs []Message
		for _, m := range conv {
			msgs = append(msgs, Message{m["role"], m["content"]})
		}
		var buf bytes.Buffer
		if err := t.Execute(&buf, map[string]any{"Messages": msgs}); err != nil {
			panic(err)
		}
		out, _ := json.Marshal(buf.String())
		fmt.Println(string(out))
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain to run the Modelfile TEMPLATE with Go's "
                    "text/template (apt-get install golang-go)")
@pytest.mark.parametrize("family", ["chatml", "gemma"])
def test_modelfile_template_renders_in_go_as_the_jinja_template(family: str, smollm2_tokenizer_dir: Path,
                                                                tmp_path: Path) -> None:
    import subprocess

    from lmtune.models.ollama import PROBES, go_template
    from lmtune.models.registry import CHATML_TEMPLATE, GEMMA_TEMPLATE

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tok.chat_template = CHATML_TEMPLATE if family == "chatml" else GEMMA_TEMPLATE
    if family == "gemma":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    found = go_template(tok)
    assert found is not None
    (tmp_path / "main.go").write_text(GO_RENDER)
    (tmp_path / "t.tmpl").write_text(found[0])
    (tmp_path / "probes.json").write_text(json.dumps(PROBES))
    env = {**os.environ, "GOCACHE": str(tmp_path / "cache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    out = subprocess.run(["go", "run", "main.go", "t.tmpl", "probes.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    rendered = [json.loads(line) for line in out.stdout.strip().splitlines()]
    # Gemma's Jinja template writes <bos> itself; in Ollama llama.cpp adds it (add_bos_token), the TEMPLATE does not.
    prefix = tok.bos_token if family == "gemma" else ""
    assert [prefix + r for r in rendered] == [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROBES]
