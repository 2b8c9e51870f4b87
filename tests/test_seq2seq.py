"""seq2seq (summarization / translation): both routes on tiny models with real tokenizers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EncoderDecoderModel,
    T5ForConditionalGeneration,
)

import lmtune
from lmtune.config import load_config
from lmtune.errors import ConfigError, DataError
from lmtune.tasks.seq2seq.task import (
    EncoderDecoderSeq2SeqTask,
    PromptSeq2SeqTask,
    Seq2SeqCollator,
    Seq2SeqTask,
    seq2seq_metrics,
)

EN = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
IT = ["uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto"]


def number_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """English number words -> Italian ones, word for word (a learnable 'translation')."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        idx = [rng.randrange(len(EN)) for _ in range(rng.randint(2, 4))]
        rows.append({"source": " ".join(EN[i] for i in idx), "target": " ".join(IT[i] for i in idx)})
    return rows


def first_word_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """English number words -> the Italian of the first one (a one-word answer a tiny decoder learns fast)."""
    return [{"source": r["source"], "target": IT[EN.index(r["source"].split()[0])]} for r in number_pairs(n, seed)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(tmp_path: Path, model: str | dict, rows: list[dict] | None = None, **sections: dict) -> dict:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows if rows is not None else number_pairs(300))
    cfg: dict = {
        "task": "seq2seq", "model": model,
        "data": {"train": str(data), "seq2seq_task": "translation", "source_language": "English",
                 "target_language": "Italian", "max_length": 32, "max_target_length": 32},
        "train": {"epochs": 6, "batch_size": 16, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": 12, "eval_examples": 16},
        "output_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def test_t5_learns_translation_and_predicts(tmp_path, tiny_t5_dir):
    before = {k: v.clone() for k, v in T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).state_dict().items()}
    run = lmtune.train(_config(tmp_path, str(tiny_t5_dir)), show_progress=False)
    m = run.metrics
    test, start = m["test"], m["starting_point"]["test"]
    assert test["loss"] < start["loss"] / 2
    assert test["chrf"] > start["chrf"] + 10
    assert test["stopped_fraction"] > start["stopped_fraction"]
    assert run.meta["route"] == "encoder_decoder"
    after = T5ForConditionalGeneration.from_pretrained(run.model_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the report states the route and shows the job's metrics and example outputs
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "encoder-decoder model" in report and "chrf" in report and "Example outputs" in report
    assert "route: encoder-decoder model" in (run.model_dir / "README.md").read_text(encoding="utf-8")
    # predict (Python API and files) generates from source texts
    out = run.predict(["one two three"])
    assert out[0]["text"] and out[0]["finish_reason"] in ("stop", "length")
    src = write_jsonl(tmp_path / "in.jsonl", [{"source": "five six"}, {"source": "seven"}])
    assert run.predict_file(src, tmp_path / "out.csv", show_progress=False) == 2
    assert "generated" in (tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()[0]
    # `lmtune eval` rebuilds the splits and scores the saved model as the final evaluation did
    again = run.evaluate()
    assert again["test"]["chrf"] == pytest.approx(test["chrf"], abs=1e-6)


def test_warm_started_bert2bert_trains_and_reloads_with_transformers(tmp_path, tiny_bert_nodrop_dir):
    model = {"name": str(tiny_bert_nodrop_dir), "seq2seq": "encoder_decoder"}
    cfg = _config(tmp_path, model, number_pairs(200), train={"epochs": 3},
                  generation={"num_beams": 2, "max_new_tokens": 8, "eval_examples": 8})
    run = lmtune.train(cfg, show_progress=False)
    m = run.metrics
    assert run.meta["route"] == "warm_start"
    assert m["test"]["loss"] < m["starting_point"]["test"]["loss"] / 2
    assert m["summary"]["best_step"] is not None
    # the workflow compared logits after reloading with AutoModelForSeq2SeqLM; plain EncoderDecoderModel works too
    assert m["summary"]["trainable_parameters"] > 0
    reloaded = EncoderDecoderModel.from_pretrained(run.model_dir)
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    assert reloaded.generation_config.decoder_start_token_id == tok.cls_token_id
    assert reloaded.config.decoder.add_cross_attention and reloaded.config.decoder.is_decoder
    ids = tok(["one two"], return_tensors="pt")
    out = reloaded.generate(**ids, max_new_tokens=8)
    assert out[0, 0].item() == tok.cls_token_id
    # beam search from the run's settings (num_beams 2) gives what transformers' beam search gives
    pred = run.predict(["one two"])[0]["text"]
    beams = reloaded.generate(**ids, max_new_tokens=8, num_beams=2, eos_token_id=tok.sep_token_id)
    assert pred == tok.decode(beams[0], skip_special_tokens=True).strip()


def test_decoder_route_learns_and_stops(tmp_path, tiny_chat_llama_dir):
    # A short prompt and system message keep the sequences (and this test) short.
    cfg = _config(tmp_path, str(tiny_chat_llama_dir), first_word_pairs(120), train={"epochs": 6, "batch_size": 8, "learning_rate": 2e-2},
                  data={"max_length": 64, "prompt_template": "{source_language}->{target_language}: {source}",
                        "system_prompt": "Translate."},
                  generation={"max_new_tokens": 10, "eval_examples": 8})
    run = lmtune.train(cfg, show_progress=False)
    m = run.metrics
    test, start = m["test"], m["starting_point"]["test"]
    assert run.meta["route"] == "decoder" and run.meta["prompt_template"].startswith("{source_language}->")
    assert test["loss"] < start["loss"] / 3
    assert test["chrf"] > start["chrf"]
    # SmolLM2's tokenizer pads with its EOS <|im_end|>: the tuned model still learned to stop
    assert test["stopped_fraction"] >= 0.5 > start["stopped_fraction"]
    assert {"source", "reference", "generated"} <= set(test["examples"][0])
    assert test["examples"][0]["source"] in {r["source"] for r in number_pairs(140)}
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    assert model.config.model_type == "llama"
    out = run.predict(["one two"])
    assert out[0]["finish_reason"] == "stop"
    # `lmtune eval` of the saved folder goes through the same prompt and scores
    assert run.evaluate()["test"]["chrf"] == pytest.approx(test["chrf"], abs=1e-6)


def test_route_is_chosen_by_the_model(tmp_path, tiny_t5_dir, tiny_bert_dir, tiny_chat_llama_dir):
    def task(model):
        return Seq2SeqTask(load_config(_config(tmp_path, model)))

    assert isinstance(task(str(tiny_t5_dir)), EncoderDecoderSeq2SeqTask)
    assert isinstance(task(str(tiny_bert_dir)), EncoderDecoderSeq2SeqTask)  # warm start
    assert isinstance(task(str(tiny_chat_llama_dir)), PromptSeq2SeqTask)
    with pytest.raises(ConfigError, match="decoder-only"):
        task({"name": str(tiny_chat_llama_dir), "seq2seq": "encoder_decoder"})
    with pytest.raises(ConfigError, match="not a causal LM"):
        task({"name": str(tiny_bert_dir), "seq2seq": "decoder"})


def test_collator_shifts_targets_behind_the_start_token():
    batch = Seq2SeqCollator(pad_token_id=0, decoder_start_token_id=101)(
        [{"input_ids": [101, 5, 6, 102], "labels": [7, 8, 102]}, {"input_ids": [101, 9, 102], "labels": [102]}])
    assert batch["decoder_input_ids"].tolist() == [[101, 7, 8], [101, 0, 0]]
    assert batch["labels"].tolist() == [[7, 8, 102], [102, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["num_real_tokens"].tolist() == [7, 4]


def test_metrics_follow_the_job():
    refs = ["the cat sat on the mat", "a dog ran"]
    summ = seq2seq_metrics(["the cat sat on the mat", "a cat ran"], refs, "summarization")
    assert summ["rouge1"] == pytest.approx((1 + 2 / 3) / 2) and summ["rouge_l"] <= summ["rouge1"]
    assert "bleu" not in summ and summ["rouge2"] < summ["rouge1"]
    trans = seq2seq_metrics(refs, refs, "translation")
    assert trans["bleu"] == pytest.approx(100) and trans["chrf"] == pytest.approx(100) and "rouge1" not in trans
    # CJK: sacreBLEU's zh tokenisation, so a near-miss is not scored as zero
    zh = seq2seq_metrics(["我喜欢谈论机器人的历史"], ["我喜欢谈论机器人和电脑的历史"], "translation")
    assert zh["bleu"] > 20


@pytest.mark.parametrize(
    ("rows", "data", "message", "field", "line"),
    [
        ([{"source": "one", "target": "uno"}, {"source": "two", "target": ""}], {"empty_text": "error"},
         "empty line value", "target", 2),
        ([{"source": "one", "target": "uno"}, {"source": ["two"], "target": "due"}], {}, "expected text", "source", 2),
        ([{"text": "one", "target": "uno"}], {}, "no column named 'source'", None, None),
    ],
)
def test_bad_data_is_a_data_error(tmp_path, tiny_t5_dir, rows, data, message, field, line):
    cfg = _config(tmp_path, str(tiny_t5_dir), rows, data=data)
    with pytest.raises(DataError, match=message) as info:
        lmtune.train(cfg, show_progress=False)
    assert info.value.field == field and info.value.line == line


def test_empty_rows_are_skipped_and_counted(tmp_path, tiny_t5_dir):
    rows = [*number_pairs(60), {"source": "", "target": "x"}, {"source": "y", "target": None}]
    task = EncoderDecoderSeq2SeqTask(load_config(_config(tmp_path, str(tiny_t5_dir), rows)))
    tok = task.load_tokenizer(tiny_t5_dir)
    data = task.prepare(tok)
    assert data.info["train"]["skipped_empty"] == 2 and data.info["train"]["skipped_lines"] == [61, 62]
    # one row per distinct source, so no held-out source is also a training source
    splits, _ = task._pair_splits()
    train = {r["source"] for r in splits["train"]}
    held = [r["source"] for s in ("validation", "test") for r in splits[s]]
    assert held and not train & set(held) and len(set(held)) == len(held)
    assert data.info["train"]["duplicate_sources_removed"] == 60 - len({r["source"] for r in number_pairs(60)})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source_language": None}, "translation needs data.source_language"),
        ({"prompt_template": "Translate this"}, "must contain {source}"),
        ({"prompt_template": "{source} in {dialect}"}, "only {source}"),
        ({"target_column": "source"}, "both 'source'"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, tiny_t5_dir, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, str(tiny_t5_dir), data=data))


def test_bundled_parallel_pairs_are_aligned_translations():
    from lmtune.data.readers import read_table

    table = read_table("bundled:chatterbot_en_it")
    pairs = {(r["source"], r["target"]) for r in table.rows}
    assert len(table) == 881 and set(table.columns) == {"source", "target", "topic"}
    assert ("tell me about the american civil war", "dimmi della guerra civile americana") in pairs
    assert ("do you think the south was right?", "pensi che il sud fosse nel giusto?") in pairs
    assert len({r["topic"] for r in table.rows}) == 12
