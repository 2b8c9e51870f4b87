"""Using trained sft and causal_lm runs: Run.generate / chat / predict_file / evaluate, and the CLI
commands predict, chat, export, eval and data list.

Two runs are trained once for the module (a few steps on a tiny Llama with SmolLM2's tokenizer). The
base model's weights are redrawn at std 0.3 first: at the default 0.02 every greedy answer is a run of
newlines, which would make "same text" checks hold trivially.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import story_text
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import lmtune
from lmtune.cli import app, main
from lmtune.errors import DataError, ModelError, RunError
from lmtune.models import generation
from lmtune.workflows.run import Run

CAPITALS = {"France": "Paris", "Spain": "Madrid", "Peru": "Lima", "Japan": "Tokyo"}
MAX_NEW = 8  # the runs' generation.max_new_tokens


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _qa_rows(n: int) -> list[dict[str, Any]]:
    countries = list(CAPITALS)
    return [{"messages": [{"role": "user", "content": f"Capital of {countries[i % 4]}? ({i})"},
                          {"role": "assistant", "content": CAPITALS[countries[i % 4]]}]} for i in range(n)]


def _run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``lmtune ARGS`` through main() (errors become exit codes, as for a user): (code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lmtune", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def noisy_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_chat_llama_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("noisy-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_chat_llama_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, noisy_llama_dir: Path) -> Run:
    """A LoRA sft run (adapter/ and a merged model/)."""
    root = tmp_path_factory.mktemp("sft")
    data = _write_jsonl(root / "qa.jsonl", _qa_rows(60))
    cfg = {
        "task": "sft", "model": str(noisy_llama_dir), "method": {"name": "lora"},
        "data": {"train": str(data), "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 5e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": MAX_NEW, "eval_examples": 4},
        "output_dir": str(root / "run"),
    }
    return lmtune.train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, noisy_llama_dir: Path) -> Run:
    """A fully fine-tuned causal_lm run on short stories."""
    root = tmp_path_factory.mktemp("lm")
    text = root / "stories.txt"
    text.write_text(story_text(60), encoding="utf-8")
    cfg = {
        "task": "causal_lm", "model": str(noisy_llama_dir),
        "data": {"train": str(text), "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": MAX_NEW},
        "output_dir": str(root / "run"),
    }
    return lmtune.train(cfg, show_progress=False)


# ------------------------------------------------------------------------------------------ Python API
def test_sft_generate_renders_prompts_with_the_chat_template(sft_run: Run) -> None:
    prompts = ["Capital of France?", "hello there", "北京?"]
    out = sft_run.generate(prompts)
    assert [r["prompt"] for r in out] == prompts
    g = sft_run.generator()
    for r, p in zip(out, prompts, strict=True):
        assert set(r) == {"prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens"}
        rendered = g.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True)
        assert r["prompt_tokens"] == len(g.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert r["completion_tokens"] <= MAX_NEW  # the run's generation section is the default
    assert any(r["text"].strip() for r in out)
    # greedy answers do not depend on the batch; arguments override the run's settings
    assert [sft_run.generate(p, batch_size=1)[0] for p in prompts] == out
    short = sft_run.generate("Capital of France?", max_new_tokens=2)[0]
    assert short["completion_tokens"] <= 2
    sampled = sft_run.generate(prompts * 2, do_sample=True, temperature=1.5, top_p=1.0, seed=3)
    assert sampled == sft_run.generate(prompts * 2, do_sample=True, temperature=1.5, top_p=1.0, seed=3)
    with pytest.raises(Exception, match="top_p"):
        sft_run.generate("x", top_p=2.0)


def test_causal_lm_generate_continues_raw_text(lm_run: Run) -> None:
    prompt = "The small cat watched"
    r = lm_run.generate(prompt)[0]
    tok = AutoTokenizer.from_pretrained(lm_run.model_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_run.model_dir)
    ids = tok(prompt, return_tensors="pt")
    assert r["prompt_tokens"] == ids["input_ids"].shape[1]  # no chat template around it
    new = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert r["text"] == tok.decode(new, skip_special_tokens=True)
    assert r["text"].strip()


def test_chat_answers_a_conversation(sft_run: Run) -> None:
    messages = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima"},
                {"role": "user", "content": "And of Japan?"}]
    answer = sft_run.chat(messages)
    g = sft_run.generator()
    rendered = generation.chat_prompt(g.tokenizer, messages)
    expected = generation.generate(g.model, g.tokenizer, [rendered], sft_run.generation_settings(),
                                   eos_token_ids=g.eos_token_ids)[0]
    assert answer["text"] == expected["text"] and answer["prompt_tokens"] == expected["prompt_tokens"]
    assert answer["message"] == {"role": "assistant", "content": answer["text"]}
    assert sft_run.chat(messages, max_new_tokens=1)["completion_tokens"] == 1


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "end with a user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "system", "content": "be kind"}], "end with a user message"),
        ([], "no messages"),
        ([{"role": "user", "text": "hi"}], "content"),
    ],
    ids=["ends with assistant", "two users", "system only", "empty", "no content"],
)
def test_chat_rejects_bad_conversations(sft_run: Run, messages: list[dict[str, Any]], fragment: str) -> None:
    with pytest.raises(DataError, match=fragment):
        sft_run.chat(messages)


def test_wrong_use_of_a_run_is_a_clear_error(sft_run: Run, lm_run: Run) -> None:
    with pytest.raises(ModelError, match="sft") as err:
        lm_run.chat([{"role": "user", "content": "hi"}])
    assert "lmtune predict" in str(err.value)
    for call in (sft_run.predictor, lambda: sft_run.predict(["text"])):
        with pytest.raises(RunError, match="generate"):
            call()


def test_predict_file_with_prompts_and_with_messages(sft_run: Run, lm_run: Run, tmp_path: Path) -> None:
    prompts = ["Capital of France?", "hello there", "Capital of Spain?"]
    src = _write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    assert sft_run.predict_file(src, tmp_path / "out.jsonl", show_progress=False) == 3
    rows = _read_jsonl(tmp_path / "out.jsonl")
    expected = sft_run.generate(prompts)
    assert [r["id"] for r in rows] == [0, 1, 2]
    for row, e in zip(rows, expected, strict=True):
        assert row["prompt"] == e["prompt"] and row["generated"] == e["text"]
        assert (row["finish_reason"], row["prompt_tokens"], row["completion_tokens"]) == \
            (e["finish_reason"], e["prompt_tokens"], e["completion_tokens"])

    conversations = [
        [{"role": "user", "content": "Capital of Peru?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
         {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "And Japan?"}],
    ]
    src = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": m, "topic": "geo"} for m in conversations])
    sft_run.predict_file(src, tmp_path / "chats-out.jsonl", show_progress=False)
    rows = _read_jsonl(tmp_path / "chats-out.jsonl")
    assert [r["messages"] for r in rows] == conversations and rows[0]["topic"] == "geo"
    assert [r["generated"] for r in rows] == [sft_run.chat(m)["text"] for m in conversations]

    # causal_lm: raw text, CSV out (a .txt file's lines are prompts too)
    txt = tmp_path / "starts.txt"
    txt.write_text("The small cat\nThe old river\n", encoding="utf-8")
    lm_run.predict_file(txt, tmp_path / "out.csv", show_progress=False, max_new_tokens=3)
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["text"] for r in table] == ["The small cat", "The old river"]
    assert [r["generated"] for r in table] == [r["text"] for r in lm_run.generate(["The small cat", "The old river"],
                                                                                  max_new_tokens=3)]
    assert all(int(r["completion_tokens"]) <= 3 for r in table)


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         ["bad.jsonl:2", "messages", "alternate"]),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         ["bad.jsonl:2", "end with a user message"]),
        ({"messages": "hello"}, ["bad.jsonl:2", "expected a list of messages"]),
        ({"messages": [{"role": "robot", "content": "{}"}]}, ["bad.jsonl:2", "unknown role 'robot'"]),
    ],
    ids=["alternation", "ends with assistant", "not a list", "unknown role"],
)
def test_bad_messages_row_names_file_and_line(sft_run: Run, tmp_path: Path, row: dict[str, Any],
                                              fragments: list[str], monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, row])
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = _run_cli(["predict", sft_run.path, "-i", src, "-o", out, "--no-progress"],
                                    monkeypatch, capsys)
    assert code == 2
    assert "Traceback" not in stdout + stderr
    for fragment in fragments:
        assert fragment in _flat(stderr), (fragment, stderr)
    assert not out.exists()


def test_predict_cli_generation_options(sft_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_jsonl(tmp_path / "in.jsonl", [{"question": "Capital of France?"}, {"question": "hello"}])
    out = tmp_path / "out.jsonl"
    code, stdout, _ = _run_cli(["predict", sft_run.path, "-i", src, "-o", out, "--text-column", "question",
                                "--max-new-tokens", "3", "--greedy", "--batch-size", "1", "--no-progress"],
                               monkeypatch, capsys)
    assert code == 0 and "wrote 2 answers" in stdout
    rows = _read_jsonl(out)
    assert [r["generated"] for r in rows] == [r["text"] for r in sft_run.generate(["Capital of France?", "hello"],
                                                                                  max_new_tokens=3)]
    # a missing prompt column names the columns there are
    code, _, stderr = _run_cli(["predict", sft_run.path, "-i", src, "-o", out], monkeypatch, capsys)
    assert code == 2 and "'prompt'" in stderr and "'question'" in stderr and "--text-column" in _flat(stderr)


# ------------------------------------------------------------------------------------------ chat
@pytest.fixture
def stream_spy(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, str]]]:
    """Records the messages of every streamed answer (stream_chat still runs)."""
    calls: list[list[dict[str, str]]] = []
    real = generation.stream_chat

    def spy(model: Any, tokenizer: Any, messages: list[dict[str, str]], *args: Any, **kwargs: Any) -> Any:
        calls.append([dict(m) for m in messages])
        yield from real(model, tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(generation, "stream_chat", spy)
    return calls


def test_chat_cli_streams_and_keeps_history(sft_run: Run, stream_spy: list[list[dict[str, str]]]) -> None:
    first = sft_run.chat([{"role": "user", "content": "hello"}])["text"]
    assert first.strip()
    result = CliRunner().invoke(app, ["chat", str(sft_run.path)],
                                input="hello\n/system Be brief.\nhello\n/reset\nhello\n/exit\nnever sent\n")
    assert result.exit_code == 0, result.output
    user = {"role": "user", "content": "hello"}
    system = {"role": "system", "content": "Be brief."}
    assert stream_spy == [
        [user],
        [system, user, {"role": "assistant", "content": first.strip()}, user],  # history kept
        [system, user],  # /reset cleared the history, the system prompt stays
    ]
    # the streamed answers are printed as they come
    after_reset = sft_run.chat([system, user])["text"].strip()
    assert f"model> {first.strip()}" in " ".join(result.output.split())
    assert f"model> {after_reset}" in " ".join(result.output.split())
    assert "history cleared" in result.output


def test_chat_cli_ends_at_eof(sft_run: Run, stream_spy: list[list[dict[str, str]]]) -> None:
    result = CliRunner().invoke(app, ["chat", str(sft_run.path), "--system", "Be kind.", "--max-new-tokens", "2"],
                                input="hi\n")
    assert result.exit_code == 0, result.output
    assert stream_spy == [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]]


def test_chat_cli_drops_the_oldest_turns_to_fit(sft_run: Run, tmp_path: Path,
                                               stream_spy: list[list[dict[str, str]]]) -> None:
    model = tmp_path / "model"
    shutil.copytree(sft_run.model_dir, model)
    meta = json.loads((model / "lmtune.json").read_text())
    meta["max_length"] = 70  # the default system prompt (~20 tokens) plus two or three short exchanges
    (model / "lmtune.json").write_text(json.dumps(meta))
    messages = [f"message number {i}" for i in range(6)]
    huge = "word " * 100  # does not fit even alone: refused, and the chat goes on
    result = CliRunner().invoke(app, ["chat", str(model)],
                                input="\n".join([*messages[:3], huge, *messages[3:]]) + "\n")
    assert result.exit_code == 0, result.output
    assert _flat(result.output).count("oldest turns are dropped") == 1
    assert "the message is too long" in result.output
    assert len(stream_spy) == 6
    session = Run.load(model).chat_session()
    for call, text in zip(stream_spy, messages, strict=True):
        assert call[-1] == {"role": "user", "content": text}
        assert session.prompt_tokens(call) <= 70  # no --system: the calls hold user/assistant turns only
    assert stream_spy[-1][0]["content"] != messages[0]  # the first exchange was dropped


def test_chat_cli_refuses_a_causal_lm_run(lm_run: Run, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = _run_cli(["chat", lm_run.path], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in stdout + stderr
    assert "instruction-tuned (sft)" in _flat(stderr) and "lmtune predict" in _flat(stderr)


# ------------------------------------------------------------------------------------------ export, eval, data
def test_export_cli_merged_equals_run_generation(sft_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exported"
    code, stdout, _ = _run_cli(["export", sft_run.path, "--format", "merged", "--output", out], monkeypatch, capsys)
    assert code == 0, stdout
    assert "max logit difference" in _flat(stdout) and out.name in stdout
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = "Capital of Japan?"
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    ids = tok(rendered, return_tensors="pt", add_special_tokens=False)
    new = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids["input_ids"].shape[1]:]
    expected = sft_run.generate(prompt, do_sample=False)[0]["text"]
    assert expected.strip() and tok.decode(new, skip_special_tokens=True) == expected
    # a second export needs --overwrite; ONNX is not there
    code, _, stderr = _run_cli(["export", sft_run.path, "--output", out], monkeypatch, capsys)
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = _run_cli(["export", sft_run.path, "--format", "onnx", "--output", tmp_path / "o"],
                               monkeypatch, capsys)
    assert code == 2 and "not implemented" in stderr and "merged" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


def test_eval_cli_and_api_on_generative_runs(sft_run: Run, lm_run: Run, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _run_cli(["eval", sft_run.path, "--output", tmp_path / "m.json"], monkeypatch, capsys)
    assert code == 0
    for name in ("rouge_l", "token_f1", "perplexity", "stopped_fraction", "validation", "test"):
        assert name in stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    # the saved (merged) model scores as the run did at its end
    assert metrics["test"]["loss"] == pytest.approx(sft_run.metrics["test"]["loss"], rel=1e-4)
    assert metrics["test"]["rouge_l"] == pytest.approx(sft_run.metrics["test"]["rouge_l"])

    data = _write_jsonl(tmp_path / "held_out.jsonl", _qa_rows(5))
    on_file = sft_run.evaluate(data)
    assert on_file["data"] == str(data) and on_file["generated_examples"] == 4  # generation.eval_examples
    assert {"loss", "perplexity", "exact_match", "rouge_l", "chrf"} <= set(on_file)

    text = tmp_path / "more.txt"
    text.write_text(story_text(6, seed=5), encoding="utf-8")
    code, stdout, _ = _run_cli(["eval", lm_run.path, "--data", text], monkeypatch, capsys)
    assert code == 0 and "perplexity" in stdout and "rouge_l" not in stdout
    own = lm_run.evaluate()
    assert own["test"]["loss"] == pytest.approx(lm_run.metrics["test"]["loss"], rel=1e-4)


def test_data_list_cli() -> None:
    result = CliRunner().invoke(app, ["data", "list"])  # 80 columns
    assert result.exit_code == 0, result.output
    for name in ("rotten_tomatoes", "chatterbot", "chatterbot_french", "janeausten", "sft", "causal_lm", "yes"):
        assert name in result.output
    wide = CliRunner().invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert "chatterbot-corpus" in wide.output and "r-cran-janeaustenr" in wide.output
    assert "Jane Austen" in wide.output  # descriptions where there is room


# ------------------------------------------------------------------------------------------ precision
def test_inference_precision_is_measured_or_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtune.errors import ConfigError
    from lmtune.training import precision

    cpu = torch.device("cpu")
    assert precision.inference_dtype("fp32", cpu) is torch.float32
    assert precision.inference_dtype("bf16", cpu) is torch.bfloat16
    # auto follows the CPU's measured bf16 speed, as train.precision does
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.4)
    assert precision.inference_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.3)  # AVX2 only: bf16 emulated, slow
    assert precision.inference_dtype("auto", cpu) is torch.float32
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        precision.inference_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="must be one of auto, fp32, bf16, fp16"):
        precision.inference_dtype("fp64", cpu)


def test_run_generates_with_weights_in_the_precision_asked(sft_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtune.errors import ConfigError
    from lmtune.training import precision

    fp32 = Run.load(sft_run.path, precision="fp32")
    bf16 = Run.load(sft_run.path, precision="bf16")
    g32, g16 = fp32.generator(), bf16.generator()
    assert g32.dtype is torch.float32 and g16.dtype is torch.bfloat16
    assert {p.dtype for p in g16.model.parameters()} == {torch.bfloat16}
    # the same weights, rounded: next-token logits of a prompt agree to bf16's precision
    ids = g32.tokenizer(g32.render("Capital of France?"), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        a = g32.model(ids).logits[0, -1]
        b = g16.model(ids).logits[0, -1].float()
    assert (a - b).abs().max() < 0.05 * (a.max() - a.min())
    answers = bf16.generate(["Capital of France?", "hello"], max_new_tokens=MAX_NEW, do_sample=False)
    assert [r["finish_reason"] in ("stop", "length") for r in answers] == [True, True]
    assert all(0 < r["completion_tokens"] <= MAX_NEW for r in answers)
    # the default is fp32; auto takes bf16 only where the probe says this CPU runs it faster
    assert Run.load(sft_run.path).generator().dtype is torch.float32
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.3)
    assert Run.load(sft_run.path, precision="auto").generator().dtype is torch.float32
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.4)
    assert Run.load(sft_run.path, precision="auto").generator().dtype is torch.bfloat16
    # one-row decoding steps of bf16 weights go to ATen's gemv where the probe measures it faster
    monkeypatch.setattr(precision, "cpu_bf16_gemv_speedup", lambda: 2.5)
    routed = Run.load(sft_run.path, precision="bf16")
    assert routed.generator().small_forward_route is not None and fp32.generator().small_forward_route is None
    routed_answer = routed.generate(["Capital of France?"], max_new_tokens=MAX_NEW, do_sample=False)[0]
    assert 0 < routed_answer["completion_tokens"] <= MAX_NEW and torch._C._get_mkldnn_enabled()
    monkeypatch.setattr(precision, "cpu_bf16_gemv_speedup", lambda: 1.0)
    assert Run.load(sft_run.path, precision="bf16").generator().small_forward_route is None
    # bf16 linears are packed for oneDNN where the probe measures it faster; answers as without
    monkeypatch.setattr(precision, "cpu_bf16_packed_speedup", lambda: 1.8)
    packed = Run.load(sft_run.path, precision="bf16")
    assert packed.generator().packed_bytes > 0 and fp32.generator().packed_bytes == 0
    monkeypatch.setattr(precision, "cpu_bf16_packed_speedup", lambda: 1.0)
    unpacked = Run.load(sft_run.path, precision="bf16")
    assert unpacked.generator().packed_bytes == 0
    prompts = ["Capital of France?", "hello", "What is 2+2?"]
    assert (packed.generate(prompts, max_new_tokens=MAX_NEW, do_sample=False)
            == unpacked.generate(prompts, max_new_tokens=MAX_NEW, do_sample=False))
    # evaluation in fp32 gives the report's figures; in bf16 they move by its rounding only
    loss = sft_run.metrics["test"]["loss"]
    assert bf16.evaluate(precision="fp32")["test"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert bf16.evaluate()["test"]["loss"] == pytest.approx(loss, rel=0.05)
    with pytest.raises(ConfigError, match="precision must be one of"):
        Run.load(sft_run.path, precision="fp64")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        fp32.generator("fp16")
    with pytest.raises(ConfigError, match="precision must be one of"):
        fp32.generator("fp64")


def test_precision_options_of_predict_and_serve(sft_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from lmtune.errors import ConfigError
    from lmtune.serve import ServeOptions

    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Capital of France?"}])
    out = tmp_path / "out.jsonl"
    code, stdout, _ = _run_cli(["predict", sft_run.path, "-i", src, "-o", out, "--precision", "bf16",
                                "--no-progress"], monkeypatch, capsys)
    assert code == 0 and "wrote 1 answers" in stdout
    expected = Run.load(sft_run.path, precision="bf16").generate("Capital of France?")[0]["text"]
    assert _read_jsonl(out)[0]["generated"] == expected
    code, _, stderr = _run_cli(["predict", sft_run.path, "-i", src, "-o", tmp_path / "o2.jsonl", "--precision",
                                "fp64"], monkeypatch, capsys)
    assert code == 2 and "precision must be one of auto, fp32, bf16, fp16" in _flat(stderr)
    with pytest.raises(ConfigError, match="precision"):
        ServeOptions(precision="half")
