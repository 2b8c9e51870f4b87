"""The memorisation audit (``evaluate.memorisation``): canaries inserted into the training text, their exposure
(Carlini et al. 2019) before and after training, and the extraction test, on tiny decoders trained for real."""

from __future__ import annotations

import json
import math
import random

import pytest
from helpers import story_text

import lmtune
from lmtune.config import load_config
from lmtune.config.schema import MemorisationConfig
from lmtune.errors import ConfigError
from lmtune.evaluate.memorisation import (
    Canary,
    canary_texts,
    exposure,
    exposure_figures,
    extraction_figures,
    fit_reference,
    fitted_exposure,
    make_canaries,
    reference_secrets,
    window_item,
)

AUDIT = {"canaries": 2, "canary_repeats": [1, 24], "canary_digits": 3, "extraction_prompts": 24,
         "extraction_prefix_tokens": 8, "extraction_suffix_tokens": 8}


# ------------------------------------------------------------------------------------------ the math
def test_exposure_is_exact_against_the_whole_space():
    reference = [float(x) for x in range(1, 1000)]  # 999 other secrets, each a distinct log-perplexity
    assert exposure(0.5, reference) == pytest.approx(math.log2(1000))  # ranked first: every bit of the space
    assert exposure(1000.5, reference) == pytest.approx(0.0)  # ranked last
    assert exposure(499.5, reference) == pytest.approx(math.log2(1000) - math.log2(500))
    assert exposure(500.0, reference) == pytest.approx(math.log2(1000) - math.log2(500.5))  # a tie counts half


def test_sampled_exposure_estimates_the_exact_one_and_the_fit_extrapolates():
    rng = random.Random(0)
    space = [rng.gauss(30.0, 3.0) for _ in range(100_000)]
    canary = 24.0  # two standard deviations below: about 2.3% of the space scores lower, exposure ~5.5 bits
    exact = exposure(canary, space)
    sample = rng.sample(space, 2000)
    assert exposure(canary, sample) == pytest.approx(exact, abs=0.4)
    fit = fit_reference(sample)
    assert fitted_exposure(canary, fit) == pytest.approx(exact, abs=0.5)
    # Far beyond the sample: the rank estimate is capped at log2(2001), the fit is not.
    assert exposure(0.0, sample) == pytest.approx(math.log2(2001))
    assert fitted_exposure(0.0, fit) > 40
    assert fit_reference([1.0] * 10) is None and fitted_exposure(1.0, None) is None


def test_canaries_are_seeded_distinct_and_repeated_as_asked():
    settings = MemorisationConfig(canaries=3, canary_repeats=[16, 1, 4], canary_format="the pin of {digits} is set",
                                  canary_digits=5)
    canaries = make_canaries(settings, seed=7)
    assert canaries == make_canaries(settings, seed=7) != make_canaries(settings, seed=8)
    assert len({c.secret for c in canaries}) == 9 and all(len(c.secret) == 5 for c in canaries)
    assert [c.repeats for c in canaries] == [1, 1, 1, 4, 4, 4, 16, 16, 16]  # repeat counts sorted
    assert canaries[0].text == f"the pin of {canaries[0].secret} is set"
    texts = canary_texts(canaries)
    assert len(texts) == 3 * (1 + 4 + 16) and texts.count(canaries[-1].text) == 16
    # Small space: every other secret is a reference (exact); large: a seeded sample; never an inserted one.
    small = MemorisationConfig(canaries=1, canary_repeats=[1, 2], canary_digits=3)
    refs, exact = reference_secrets(small, make_canaries(small, 0), seed=0)
    assert exact and len(refs) == 998 and not {c.secret for c in make_canaries(small, 0)} & set(refs)
    refs, exact = reference_secrets(settings, canaries, seed=0)
    assert not exact and len(refs) == len(set(refs)) == settings.canary_candidates
    assert not {c.secret for c in canaries} & set(refs)


def test_exposure_figures_and_extraction_figures():
    canaries = [Canary(0, "01", "a 01", 1), Canary(1, "02", "a 02", 4), Canary(2, "03", "a 03", 4)]
    reference = [float(x) for x in range(10, 107)]
    figures = exposure_figures(canaries, [50.0, 5.0, 9.0], reference, exact=True, digits=2)
    by = {g["repeats"]: g for g in figures["by_repeats"]}
    assert by[4]["canaries"] == 2 and by[4]["mean_exposure"] == pytest.approx(math.log2(98))
    assert by[1]["mean_exposure"] < by[4]["mean_exposure"]
    assert figures["space_bits"] == pytest.approx(math.log2(100)) and figures["exact"]
    x = extraction_figures([[1, 2, 3], [1, 9, 3], [5, 5, 5]], [[1, 2, 3], [1, 2, 3], [1, 2]])
    assert x["extracted"] == 1 and x["rate"] == pytest.approx(1 / 3)
    assert x["mean_matched_fraction"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert window_item([1, 2, 3, 4, 5], 2, 3) == ([1, 2], [3, 4, 5]) and window_item([1, 2, 3], 2, 3) is None


# ------------------------------------------------------------------------------------------ config errors
def _base(tmp_path, task="causal_lm", **audit):
    return {"task": task, "model": "unused", "data": {"train": str(tmp_path / "x.txt"), "max_length": 64},
            "evaluate": {"memorisation": audit}, "output_dir": str(tmp_path / "run")}


@pytest.mark.parametrize(("audit", "task", "data", "words"), [
    ({"canaries": 0}, "causal_lm", {}, ["evaluate.memorisation.canaries", "greater than or equal to 1"]),
    ({"canary_repeats": []}, "causal_lm", {}, ["evaluate.memorisation.canary_repeats", "at least one"]),
    ({"canary_repeats": [0, 4]}, "causal_lm", {}, ["evaluate.memorisation.canary_repeats", "from 1 to 10000"]),
    ({"canary_repeats": [4, 4]}, "causal_lm", {}, ["evaluate.memorisation.canary_repeats", "twice"]),
    ({"canary_format": "no secret here"}, "causal_lm", {}, ["evaluate.memorisation.canary_format", "exactly once"]),
    ({"canary_format": "{digits} and {digits}"}, "causal_lm", {}, ["canary_format", "found it 2 times"]),
    ({"canary_format": " {digits} "}, "causal_lm", {}, ["canary_format", "needs words"]),
    ({"canary_digits": 1}, "causal_lm", {}, ["evaluate.memorisation.canary_digits"]),
    ({"canary_digits": 40}, "causal_lm", {}, ["evaluate.memorisation.canary_digits"]),
    ({"canary_candidates": 5}, "causal_lm", {}, ["evaluate.memorisation.canary_candidates"]),
    ({"canaries": 10, "canary_digits": 2}, "causal_lm", {}, ["evaluate.memorisation", "canary_digits 2"]),
    ({"unknown": 1}, "causal_lm", {}, ["evaluate.memorisation.unknown"]),
    ({}, "classification", {}, ["evaluate.memorisation is for task causal_lm or sft", "'classification'"]),
    ({}, "causal_lm", {"streaming": True, "validation_size": 10, "test_size": 10},
     ["evaluate.memorisation", "data.streaming"]),
    ({"extraction_prefix_tokens": 40, "extraction_suffix_tokens": 40}, "causal_lm", {},
     ["extraction_prefix_tokens + extraction_suffix_tokens (80)", "data.max_length (64)"]),
])
def test_bad_settings_fail_naming_the_key(tmp_path, audit, task, data, words):
    cfg = _base(tmp_path, task, **audit)
    cfg["data"].update(data)
    if data.get("streaming"):
        cfg["train"] = {"max_steps": 2, "eval_every": 1}
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_settings_load_with_defaults(tmp_path):
    cfg = load_config(_base(tmp_path))
    m = cfg.evaluate.memorisation
    assert m is not None and m.canaries == 4 and m.canary_repeats == [1, 4, 16] and "{digits}" in m.canary_format
    assert load_config({**_base(tmp_path), "evaluate": {}}).evaluate.memorisation is None  # off by default


# ------------------------------------------------------------------------------------------ a real run
def _causal_config(tmp_path, model, paragraphs, **train):
    text = tmp_path / "stories.txt"
    text.write_text(story_text(paragraphs, seed=3), encoding="utf-8")
    return {
        "task": "causal_lm", "model": model,
        "data": {"train": str(text), "max_length": 64, "validation_size": 0.25, "test_size": 0.1},
        "train": {"batch_size": 8, "warmup_ratio": 0.0, "precision": "fp32", "log_every": 50, **train},
        "evaluate": {"memorisation": AUDIT},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, tiny_chat_llama_dir):
    """A tiny pretrained-shaped Llama (SmolLM2's tokenizer: one token per digit) trained about 20 epochs on a
    little text holding two canaries once and two 24 times (trained once for the tests below)."""
    tmp = tmp_path_factory.mktemp("memorisation-causal")
    cfg = _causal_config(tmp, str(tiny_chat_llama_dir), 32, max_steps=60, eval_every=60, learning_rate=3e-2)
    return lmtune.train(cfg, show_progress=False)


def test_canary_seen_many_times_is_exposed(causal_run):
    m = causal_run.metrics["memorisation"]
    tuned, start = m["tuned"]["exposure"], m["starting_point"]["exposure"]
    assert tuned["exact"] and tuned["references"] == 1000 - 4 and tuned["space_bits"] == pytest.approx(math.log2(1000))
    after = {g["repeats"]: g["mean_exposure"] for g in tuned["by_repeats"]}
    before = {g["repeats"]: g["mean_exposure"] for g in start["by_repeats"]}
    # Inserted 24 times: near the top of the space after training; far above the once-seen canaries and above
    # the untrained model's figure for the same canaries.
    assert after[24] > 7.0, (before, after)
    assert after[24] > after[1] + 2.0, (before, after)
    assert after[24] > before[24] + 3.0, (before, after)
    # The model's log-perplexity of the repeated secrets fell below the references'.
    rows = {r["repeats"]: r for r in tuned["canaries"]}
    assert rows[24]["log_perplexity"] < tuned["mean_reference_log_perplexity"]


def test_training_records_are_extracted_more_than_held_out_ones(tmp_path):
    # A small model from scratch (its tokenizer trained on the text, canaries left out) trained ~100 epochs on ten
    # short documents: it reproduces its training documents, not held-out ones of the same little language.
    model = {"name": "unused", "init": "scratch", "tokenizer": "train", "vocab_size": 400, "layers": 2,
             "hidden_size": 64, "heads": 4, "context_length": 128}
    run = lmtune.train(_causal_config(tmp_path, model, 10, max_steps=300, eval_every=300, learning_rate=1e-2),
                       show_progress=False)
    m = run.metrics["memorisation"]
    x, xs = m["tuned"]["extraction"], m["starting_point"]["extraction"]
    assert x["heldout_split"] == "validation" and x["train"]["prompts"] >= 5 and x["heldout"]["prompts"] >= 2
    assert x["train"]["rate"] >= 0.5 > x["heldout"]["rate"], x
    assert x["train"]["mean_matched_fraction"] > x["heldout"]["mean_matched_fraction"] + 0.3, x
    assert xs["train"]["rate"] == 0.0 and xs["heldout"]["rate"] == 0.0  # the untrained model continues nothing
    # Its tokenizer never saw the canaries: before training no secret is ranked ahead by how it tokenises.
    before = m["starting_point"]["exposure"]["by_repeats"]
    assert all(g["mean_exposure"] < 5.0 for g in before), before
    vocab = json.loads((run.model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any(c["secret"] in token for c in json.loads((run.path / "canaries.json").read_text())["canaries"]
                   for token in vocab)


def test_canaries_are_recorded_counted_and_only_in_training(causal_run, tiny_chat_llama_dir):
    from lmtune.tasks.causal_lm.task import CausalLMTask

    record = json.loads((causal_run.path / "canaries.json").read_text())
    assert record["inserted_records"] == 2 * 1 + 2 * 24 and len(record["canaries"]) == 4
    secrets = [c["secret"] for c in record["canaries"]]
    data = json.loads((causal_run.path / "data.json").read_text())
    assert data["train"]["canary_documents"] == 50
    assert "canary_documents" not in data["validation"] and "canary_documents" not in data["test"]
    # The task's own splits, rebuilt from the saved config: canaries in train as often as recorded, never held out.
    task = CausalLMTask(load_config(causal_run.path / "config.yaml"))
    for c in record["canaries"]:
        assert task.documents("train").count(c["text"]) == c["repeats"]
    held = " ".join(task.documents("validation") + task.documents("test"))
    assert "secret" not in held and not any(s in held for s in secrets)
    # The report's section and plot, and the card's line.
    report = (causal_run.path / "report.md").read_text()
    assert "## Memorisation audit" in report and "plots/memorisation_exposure.png" in report
    assert (causal_run.path / "plots" / "memorisation_exposure.png").stat().st_size > 1000
    card = (causal_run.model_dir / "README.md").read_text()
    assert "memorisation audit: mean canary exposure" in card


def test_sft_canaries_answer_the_canary_prompt(tmp_path, tiny_chat_llama_dir):
    rows = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                          {"role": "assistant", "content": f"Word {i} is {w}."}]}
            for i, w in enumerate(["apple", "river", "stone", "cloud", "grass", "tiger"] * 4)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "task": "sft", "model": str(tiny_chat_llama_dir),
        "data": {"train": str(data), "max_length": 64, "validation_size": 0.2, "test_size": 0.1},
        "train": {"max_steps": 30, "eval_every": 30, "batch_size": 8, "learning_rate": 3e-2, "warmup_ratio": 0.0,
                  "precision": "fp32"},
        "generation": {"max_new_tokens": 4, "eval_examples": 2},
        "evaluate": {"memorisation": {**AUDIT, "extraction_suffix_tokens": 4}},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    facts = json.loads((run.path / "data.json").read_text())
    assert facts["train"]["canary_conversations"] == 50
    m = run.metrics["memorisation"]
    after = {g["repeats"]: g["mean_exposure"] for g in m["tuned"]["exposure"]["by_repeats"]}
    before = {g["repeats"]: g["mean_exposure"] for g in m["starting_point"]["exposure"]["by_repeats"]}
    assert after[24] > after[1] and after[24] > before[24] + 2.0, (before, after)
    assert m["tuned"]["extraction"]["train"]["prompts"] > 0
