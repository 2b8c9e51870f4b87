"""Masked-language-model pre-training (task masked_lm): BERT's masking, learning, exact resume, a classifier
started from the result, fill-mask predictions and bad input."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from helpers import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    crash_after_checkpoint,
    minilm_path,
    story_text,
    tiny_llama,
    write_csv,
)
from safetensors.torch import load_file
from serve_helpers import get, post, running
from transformers import AutoModelForMaskedLM, AutoTokenizer

import lmtune
from lmtune.config import load_config
from lmtune.data.features import IGNORE_INDEX
from lmtune.data.readers import read_table
from lmtune.errors import ConfigError, DataError, ModelError
from lmtune.tasks import get_task
from lmtune.tasks.masked_lm.masking import NO_WORD, TRAIN_STREAM, MaskedRows, Masker, row_generator
from lmtune.tasks.masked_lm.task import cut_rows, special_frame, tokenised_words

# Words WordPiece cuts into several pieces, so whole-word masking has something to keep together.
LONG_WORDS = ["unbelievably", "extraordinarily", "counterintuitive", "photosynthesis", "misunderstanding",
              "bioluminescence", "incomprehensibly", "thermodynamics"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(minilm_path())


def _masker(tok: Any, *, whole_words: bool = True, probability: float = 0.15) -> Masker:
    return Masker(probability=probability, mask_id=tok.mask_token_id, vocab_size=len(tok),
                  special_ids=frozenset(tok.all_special_ids), whole_words=whole_words)


def _rows(tok: Any, docs: list[str], *, whole_words: bool = True, max_length: int = 64,
          packing: bool = True) -> list[dict[str, Any]]:
    prefix, suffix = special_frame(tok)
    return cut_rows(tokenised_words(tok, docs, whole_words), capacity=max_length - len(prefix) - len(suffix),
                    prefix=prefix, suffix=suffix, separator=tok.sep_token_id if packing else None,
                    special=set(tok.all_special_ids), packing=packing)


def _mixed_docs(n: int) -> list[str]:
    rng = random.Random(0)
    docs = []
    for _ in range(n):
        words = [rng.choice(LONG_WORDS + FILLER + POSITIVE) for _ in range(rng.randint(5, 30))]
        docs.append(" ".join(words) + rng.choice([".", " 人民日报社论。", "!"]))
    return docs


# ------------------------------------------------------------------------------------------ masking
def test_masking_is_bert_s_15_percent_whole_words_80_10_10(tokenizer: Any) -> None:
    rows = _rows(tokenizer, _mixed_docs(400))
    masker = _masker(tokenizer)
    special = set(tokenizer.all_special_ids)
    maskable = chosen = 0
    outcome: Counter[str] = Counter()
    for epoch in range(3):
        for i, row in enumerate(rows):
            item = masker.mask(row["input_ids"], row["word_ids"], row_generator(TRAIN_STREAM, 7, epoch, i))
            words = row["word_ids"]
            maskable += sum(w != NO_WORD for w in words)
            picked = {p for p, label in enumerate(item["labels"]) if label != IGNORE_INDEX}
            chosen += len(picked)
            assert all(words[p] != NO_WORD for p in picked)  # never a special token or [UNK]
            for p in picked:
                assert item["labels"][p] == row["input_ids"][p]
                shown = item["input_ids"][p]
                outcome["mask" if shown == tokenizer.mask_token_id else "kept" if shown == row["input_ids"][p]
                        else "random"] += 1
                if shown not in (tokenizer.mask_token_id, row["input_ids"][p]):
                    assert shown not in special  # a random replacement is a real token
            # whole words: every piece of a word is chosen, or none is
            by_word: dict[int, set[bool]] = {}
            for p, w in enumerate(words):
                if w != NO_WORD:
                    by_word.setdefault(w, set()).add(p in picked)
            assert all(len(v) == 1 for v in by_word.values())
            # untouched positions are the row as it was
            assert all(item["input_ids"][p] == row["input_ids"][p] for p in range(len(words)) if p not in picked)
    assert 0.14 < chosen / maskable < 0.16, chosen / maskable
    total = sum(outcome.values())
    assert abs(outcome["mask"] / total - 0.8) < 0.02, outcome
    assert abs(outcome["random"] / total - 0.1) < 0.02, outcome
    assert abs(outcome["kept"] / total - 0.1) < 0.02, outcome


def test_words_come_from_the_tokenizer_and_cjk_characters_are_words(tokenizer: Any) -> None:
    [doc] = tokenised_words(tokenizer, ["unbelievably 人民日报, ok"], True)
    pieces = [tokenizer.convert_ids_to_tokens(w) for w in doc]
    assert pieces[0] == ["un", "##bel", "##ie", "##va", "##bly"]  # one word of five sub-tokens
    assert pieces[1:5] == [["人"], ["民"], ["日"], ["[UNK]"]]  # each character its own word
    assert pieces[5:] == [[","], ["ok"]]
    [tokens] = tokenised_words(tokenizer, ["unbelievably ok"], False)
    assert all(len(w) == 1 for w in tokens)  # data.whole_word_mask false: one sub-token at a time


def test_rows_hold_whole_words_and_documents_apart(tokenizer: Any) -> None:
    docs = ["unbelievably " * 5 + "the end.", "a short one.", "x " * 200]
    packed = _rows(tokenizer, docs, max_length=16)
    sep, cls = tokenizer.sep_token_id, tokenizer.cls_token_id
    for row in packed:
        assert len(row["input_ids"]) <= 16 and row["input_ids"][0] == cls and row["input_ids"][-1] == sep
        assert row["input_ids"][-2] != sep  # no empty document at a row's end
        assert len(row["word_ids"]) == len(row["input_ids"])
        # a row never starts inside a word: its first text token opens a word
        assert not tokenizer.convert_ids_to_tokens(row["input_ids"][1]).startswith("##")
    first = tokenizer.convert_ids_to_tokens(packed[0]["input_ids"])
    assert first[1:6] == ["un", "##bel", "##ie", "##va", "##bly"]
    # documents share rows with a separator between them ...
    assert any(tokenizer.sep_token_id in r["input_ids"][1:-1] for r in packed)
    assert sum(r["documents"] for r in packed) > len(docs)  # the long documents were cut across rows
    # ... unless packing is off: then every document starts a row
    unpacked = _rows(tokenizer, docs, max_length=16, packing=False)
    assert all(sep not in r["input_ids"][1:-1] for r in unpacked)
    assert len(unpacked) > len(packed)
    assert sum(r["documents"] for r in unpacked) == len(unpacked)


def test_masks_depend_on_seed_epoch_and_row_only(tokenizer: Any) -> None:
    rows = _rows(tokenizer, _mixed_docs(40))
    ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                     "word_ids": [r["word_ids"] for r in rows]})
    split = MaskedRows(ds, [len(r["input_ids"]) for r in rows], _masker(tokenizer), stream=TRAIN_STREAM, seed=3)
    batch = split.__getitems__([5, 2, 9])
    # the same row gives the same masks alone or in any batch, in any order
    assert [split[5], split[2], split[9]] == batch
    assert split.__getitems__([9, 5]) == [batch[2], batch[0]]
    split.set_epoch(1)
    assert split[5] != batch[0]  # a new epoch, new masks
    split.set_epoch(0)
    assert split[5] == batch[0]
    other = MaskedRows(ds, split.lengths, split.masker, stream=TRAIN_STREAM, seed=4)
    assert other[5] != batch[0]
    # held-out rows keep one masking, whatever epoch Accelerate's evaluation loader announces
    held = MaskedRows(ds, split.lengths, split.masker, stream=TRAIN_STREAM, seed=3, per_epoch=False)
    held.set_epoch(5)
    assert held[5] == batch[0]


# ------------------------------------------------------------------------------------------ training
def _stories(folder: Path, paragraphs: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stories.txt"
    path.write_text(story_text(paragraphs), encoding="utf-8")
    return path


def _config(model: Path, text: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": "masked_lm", "model": str(model),
        "data": {"train": str(text), "max_length": 64},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 5,
                  "precision": "fp32"},
        "output_dir": str(out),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path) -> Any:
    """A tiny BERT pre-trained on the templated stories (full fine-tuning, 30 steps)."""
    folder = tmp_path_factory.mktemp("mlm")
    return lmtune.train(_config(tiny_bert_nodrop_dir, _stories(folder), folder / "run"), show_progress=False)


def test_loss_falls_and_masked_accuracy_rises(mlm_run: Any, tiny_bert_nodrop_dir: Path) -> None:
    m = mlm_run.metrics
    before, after = m["starting_point"]["test"], m["test"]
    assert after["loss"] < before["loss"] - 3, (before, after)
    assert after["perplexity"] < before["perplexity"] / 100
    assert after["accuracy"] > before["accuracy"] + 0.15
    # the same held-out positions are scored before and after, about 15% of the tokens in words
    assert after["masked_tokens"] == before["masked_tokens"]
    data = json.loads((mlm_run.path / "data.json").read_text())
    assert 0.13 < after["masked_tokens"] / data["test"]["words"] < 0.17  # one token per word in the stories
    log = [json.loads(line) for line in (mlm_run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["split"] == "train"]
    assert losses[-1] < losses[0] / 2, losses
    # the encoder itself moved (not only the new head), and the folder is a plain masked LM
    start = load_file(str(tiny_bert_nodrop_dir / "model.safetensors"))
    tuned = AutoModelForMaskedLM.from_pretrained(mlm_run.model_dir).state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(start[key], tuned[f"bert.{key}"])
    assert mlm_run.meta["task"] == "masked_lm" and mlm_run.meta["mask_token"] == "[MASK]"
    report = (mlm_run.path / "report.md").read_text()
    assert "Masked-token prediction" in report and "before pre-training" in report


def test_fill_mask_predictions(mlm_run: Any, tmp_path: Path) -> None:
    [answer] = mlm_run.predict(["the [MASK] cat watched the river."])
    fillers = answer["masks"][0]["fillers"]
    assert len(fillers) == 5 and fillers == sorted(fillers, key=lambda f: -f["score"])
    assert answer["text"] == f"the {fillers[0]['text']} cat watched the river."
    # the saved folder is a plain transformers fill-mask model, ranking the fillers as lmtune does
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(mlm_run.model_dir), top_k=5)
    theirs = fill("the [MASK] cat watched the river.")
    assert [t["token_str"].replace(" ", "") for t in theirs] == [f["text"] for f in fillers]
    assert [t["score"] for t in theirs] == pytest.approx([f["score"] for f in fillers], abs=1e-4)
    predictor = mlm_run.predictor()
    assert predictor.check_item("no mask here") and "[MASK]" in predictor.check_item("no mask here")
    assert predictor.check_item(["a", "list"]) is not None
    two = predictor.predict(["The [MASK] [MASK] painted the garden."])[0]
    assert len(two["masks"]) == 2 and "[MASK]" not in two["text"]
    # the server answers as Run.predict does (tests/test_conformance.py posts to /v1/fill-mask itself); an item
    # without the mask token is a 400
    from lmtune.serve.app import create_app

    with running(create_app(mlm_run)) as base:
        assert "/v1/fill-mask" in json.loads(get(base, "/v1/run")[1])["endpoints"]
        status, body = post(base, "/v1/predict", {"input": ["the [MASK] cat watched the river."]})
        assert status == 200 and body["data"][0]["masks"] == json.loads(json.dumps(answer["masks"]))
        status, body = post(base, "/v1/predict", {"input": ["no mask here"]})
        assert status == 400 and "[MASK]" in body["error"]["message"]
    # a file: one row per input; a row without the mask token is a DataError naming its line
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"text": "the old [MASK] found the horse."}\n{"text": "nothing to fill"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        predictor.predict_table(read_table(rows))
    assert err.value.line == 2 and "[MASK]" in str(err.value)


def test_resume_equals_uninterrupted(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after a checkpoint mid-epoch and resumed: bit-identical weights and log rows (dropout on), whether
    masks are drawn anew every epoch (the loop hands the train split its epoch) or, with that switched off, once."""
    text = _stories(tmp_path, paragraphs=60)  # ~20 rows: 3 steps an epoch, so 12 steps cross 3 epoch ends
    train = {"max_steps": 12, "save_every": 4, "eval_every": 6, "keep_checkpoints": 5, "epochs": 10}

    def run(name: str, resume: bool = False) -> Any:
        return lmtune.train(_config(tiny_bert_dir, text, tmp_path / name, train=train), resume=resume,
                            show_progress=False)

    def crash_after_step_8(path: str) -> None:
        with crash_after_checkpoint(monkeypatch, 8):
            run(path)

    def rows(run_dir: Path) -> list[dict[str, Any]]:
        keep = ("step", "split", "loss", "accuracy")
        return [{k: r.get(k) for k in keep} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]

    finals = {}
    for variant in ("static", "per_epoch"):
        # The loop's dataset wrapper passes on the epoch Accelerate hands it (DataLoaderShard.set_epoch calls
        # dataset.set_epoch), so the masks change each epoch; "static" stops that, to show it changes something.
        if variant == "static":
            monkeypatch.setattr("lmtune.training.loop._WithIndex.set_epoch", lambda self, epoch: None)
        else:
            monkeypatch.undo()
        whole = run(f"{variant}-whole")
        crash_after_step_8(f"{variant}-broken")
        resumed = run(f"{variant}-broken", resume=True)
        a, b = load_file(str(whole.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), variant
        assert rows(whole.path) == rows(resumed.path), variant
        finals[variant] = a
    # the per-epoch variant did draw other masks (else the comparison above proves nothing about it)
    assert any(not torch.equal(finals["static"][k], finals["per_epoch"][k]) for k in finals["static"])


def test_batch_layout_does_not_change_the_masks(tiny_bert_nodrop_dir: Path, tmp_path: Path) -> None:
    """batch 8 x accumulation 1 == batch 4 x accumulation 2 == batch 8 fetched by DataLoader workers: every row is
    masked the same wherever it lands."""
    text = _stories(tmp_path, paragraphs=80)
    weights = []
    for bs, acc, workers in ((8, 1, 0), (4, 2, 0), (8, 1, 2)):
        cfg = _config(tiny_bert_nodrop_dir, text, tmp_path / f"b{bs}a{acc}w{workers}",
                      train={"batch_size": bs, "gradient_accumulation": acc, "num_workers": workers, "max_steps": 5,
                             "group_by_length": False, "eval_every": 100, "learning_rate": 1e-3})
        weights.append(load_file(str(lmtune.train(cfg, show_progress=False).model_dir / "model.safetensors")))
    a, b, c = weights
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------------ what comes after
def test_a_classifier_starts_from_the_masked_lm_model(mlm_run: Any, tmp_path: Path) -> None:
    rng = random.Random(0)
    rows = []
    for i in range(120):
        good = i % 2 == 0
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if good else NEGATIVE, 2)
        rows.append({"text": " ".join(words), "label": "pos" if good else "neg"})
    data = write_csv(tmp_path / "sentiment.csv", rows)
    cfg = {"task": "classification", "model": str(mlm_run.model_dir), "data": {"train": str(data), "max_length": 32},
           "train": {"max_steps": 4, "batch_size": 16, "precision": "fp32"}, "baselines": [],
           "output_dir": str(tmp_path / "clf")}
    # the classifier is built on the pre-trained encoder, weight for weight, with a new head
    task = get_task("classification")(load_config(cfg))
    tok = task.load_tokenizer(mlm_run.model_dir)
    model = task.build_model(mlm_run.model_dir, task.prepare(tok), tok)
    encoder = AutoModelForMaskedLM.from_pretrained(mlm_run.model_dir).bert.state_dict()
    built = model.bert.state_dict()
    carried = [k for k in encoder if k in built]
    assert len(carried) == len(encoder) and all(torch.equal(encoder[k], built[k]) for k in carried)
    assert "classifier" in task.head_module_names(model)
    # and it trains through lmtune train like any other start
    run = lmtune.train(cfg, show_progress=False)
    assert run.metrics["summary"]["steps"] == 4 and run.predict("warm and sharp")[0]["label"] in ("pos", "neg")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_clean_error(tiny_bert_nodrop_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as err:
        lmtune.train(_config(tiny_bert_nodrop_dir, empty, tmp_path / "a"), show_progress=False)
    assert "empty.txt" in str(err.value)
    blank = tmp_path / "blank.csv"
    blank.write_text("text\n\n\"  \"\n", encoding="utf-8")
    with pytest.raises(DataError, match="no text to train on"):
        lmtune.train(_config(tiny_bert_nodrop_dir, blank, tmp_path / "b"), show_progress=False)
    # a decoder (here a Llama even with BERT's tokenizer, which has a [MASK] token) is refused by architecture
    decoder = tiny_llama(tmp_path / "llama")
    with pytest.raises(ModelError) as err:
        lmtune.train(_config(decoder, _stories(tmp_path), tmp_path / "c"), show_progress=False)
    assert "llama" in err.value.message and "causal_lm" in (err.value.hint or "")
    # settings that cannot apply fail at load time, naming the key
    text = _stories(tmp_path)
    for data, key in (({"text_pair_column": "other"}, "data.text_pair_column"),
                      ({"mlm_probability": 1.0}, "mlm_probability")):
        with pytest.raises(ConfigError, match=key):
            load_config(_config(tiny_bert_nodrop_dir, text, tmp_path / "d", data=data))


def test_plan_counts_the_vocabulary_logits(tmp_path: Path, tiny_bert_nodrop_dir: Path) -> None:
    """The masked-LM head scores every position over the whole vocabulary: lmtune plan sizes those logits."""
    from lmtune.workflows.plan import plan

    result = plan(_config(tiny_bert_nodrop_dir, _stories(tmp_path, paragraphs=40), tmp_path / "run"), suggest=False)
    logits = result.memory["per_device"]["logits"]
    tokens = result.tokens
    vocab = len(AutoTokenizer.from_pretrained(tiny_bert_nodrop_dir))
    assert logits == tokens["batch_size"] * tokens["sequence_length"] * vocab * 4 * 2
