"""masked_lm with ``data.extend_vocabulary``: words of the training text the tokenizer can only read as [UNK] become
tokens the model learns to predict, and a tagging run started from the result finds them known.

The text is templated English in which each of twelve Chinese characters that MiniLM's vocabulary lacks follows
its own cue word ("the old river holds 泽 today."), so a masked character can be told from its context; their
counts fall from 40 to 7, and a few words test the rules (seen twice or not, training text only, normalised).
Sentences repeat, so the runs keep duplicates (``data.deduplicate: false``) and every sighting counts; each
sentence has a row of its own (``data.packing: false``), which the tiny model learns from in fewer steps.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import minilm_path
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification, AutoTokenizer

import lmtune
from lmtune.config import load_config
from lmtune.data.features import IGNORE_INDEX
from lmtune.models.methods import build_task_model
from lmtune.models.vocabulary import grow_embeddings, pretokenized_words, unknown_words
from lmtune.tasks import get_task
from lmtune.tasks.masked_lm.masking import NO_WORD
from lmtune.workflows.export import export_merged
from lmtune.workflows.inspect import inspect_data

# Characters MiniLM's vocabulary lacks (asserted below), each told by the cue word before it.
NEW = list("泽在华们这个说对为种经过")
CUES = ["river", "garden", "castle", "forest", "market", "harbor", "meadow", "valley", "bridge", "tower", "island",
        "village"]
ADJECTIVES = ["old", "quiet", "bright", "green", "small", "heavy"]
TRAIN_COUNTS = [40 - 3 * i for i in range(len(NEW))]  # 40, 37, ... 7: the order the words must be added in
# A word spelt in two cases (the normaliser lower-cases both: 5 sightings), one seen exactly twice, one seen once,
# and one seen only in the validation text.
MIXED_CASE = ["Ab✓cd"] * 3 + ["ab✓cd"] * 2
TWICE, ONCE, HELD_OUT_ONLY = "系", "☃", "⚡"
EXPECTED = [*NEW, "ab✓cd", TWICE]  # by count: 40 ... 7, then 5, then 2


def _sentence(i: int, rng: random.Random) -> str:
    return f"the {rng.choice(ADJECTIVES)} {CUES[i]} holds {NEW[i]} today."


def _write(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train / validation / test JSON Lines with a text column."""
    folder = tmp_path_factory.mktemp("mlm-vocab")
    rng = random.Random(0)
    train = [_sentence(i, rng) for i, n in enumerate(TRAIN_COUNTS) for _ in range(n)]
    train += [f"the {w} sign stands here." for w in MIXED_CASE]
    train += [f"a {TWICE} stone lies here number {k}." for k in range(2)] + [f"one {ONCE} only."]
    rng.shuffle(train)
    held = {split: [_sentence(i, random.Random(seed + i)) + f" {k}" for k in range(4) for i in range(len(NEW))]
            for split, seed in (("validation", 100), ("test", 200))}
    held["validation"] += [f"the {HELD_OUT_ONLY} flash {k}." for k in range(30)]
    return {"train": _write(folder / "train.jsonl", train),
            **{s: _write(folder / f"{s}.jsonl", docs) for s, docs in held.items()}}


def _config(model: Path, texts: dict[str, Path], out: Path, *, extend: int = 50, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": "masked_lm", "model": str(model),
        "data": {"train": str(texts["train"]), "validation": str(texts["validation"]), "test": str(texts["test"]),
                 "max_length": 64, "extend_vocabulary": extend, "deduplicate": False,
                 "packing": False},
        "train": {"epochs": 8, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 5,
                  "precision": "fp32", "seed": 0},
        "baselines": [],
        "output_dir": str(out),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def _prepared(model: Path, texts: dict[str, Path], tmp_path: Path, **kwargs: Any) -> tuple[Any, Any, Any]:
    task = get_task("masked_lm")(load_config(_config(model, texts, tmp_path / "run", **kwargs)))
    tok = task.load_tokenizer(model)
    return task, tok, task.prepare(tok)


# ------------------------------------------------------------------------------------------ which words
def test_the_characters_are_unknown_to_the_model() -> None:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    for word in [*NEW, "ab✓cd", TWICE, ONCE, HELD_OUT_ONLY]:
        assert tok(word, add_special_tokens=False)["input_ids"] == [tok.unk_token_id], word


def test_words_are_the_tokenizer_s_own_and_chosen_by_count() -> None:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    # the normaliser lower-cases and strips accents, and makes every CJK character a word
    assert list(pretokenized_words(tok, ["Ab✓cd 江泽民, Café!"])) == ["ab✓cd", "江", "泽", "民", ",", "cafe", "!"]
    counts = Counter({"泽": 5, "river": 9, "在": 7, "华": 1, "ab✓cd": 2})
    assert unknown_words(tok, counts, 10) == ["在", "泽", "ab✓cd"]  # known 'river' and once-seen 华 left out
    assert unknown_words(tok, counts, 2) == ["在", "泽"]
    assert unknown_words(tok, counts, 0) == []


def test_the_training_text_s_unknown_words_are_added(tiny_bert_nodrop_dir: Path, texts: dict[str, Path],
                                                     tmp_path: Path) -> None:
    base = len(AutoTokenizer.from_pretrained(tiny_bert_nodrop_dir))
    task, tok, data = _prepared(tiny_bert_nodrop_dir, texts, tmp_path)
    # most frequent first; the twice-seen word in, the once-seen and the validation-only ones out
    assert task.added_tokens == EXPECTED
    assert len(tok) == base + len(EXPECTED) and data.info["added_tokens"] == len(EXPECTED)
    ids = task.new_token_ids()
    assert ids == list(range(base, base + len(EXPECTED)))
    assert tok("the river holds 泽 today.", add_special_tokens=False)["input_ids"][3] == ids[0]
    assert tok("AB✓CD", add_special_tokens=False)["input_ids"] == [ids[len(NEW)]]  # matched on the normalised text
    # no [UNK] left in train but the once-seen word's; the held-out-only word is still unknown in validation
    assert data.info["train"]["unknown_tokens"] == 1 and data.info["validation"]["unknown_tokens"] == 30
    # each new token is a word of its own, so masking may choose it, and it is chosen and predicted as a label
    rows = data.splits["train"]
    new = set(ids)
    labels: Counter[int] = Counter()
    for epoch in range(3):
        rows.set_epoch(epoch)
        for i in range(len(rows)):
            row, item = rows.rows[i], rows[i]
            words = [w for t, w in zip(row["input_ids"], row["word_ids"], strict=True) if t in new]
            assert NO_WORD not in words and len(set(words)) == len(words)
            labels.update(t for t in item["labels"] if t in new)
    assert set(labels) >= set(ids[:len(NEW)])  # every frequent one (the twice-seen one may go unpicked)
    # a smaller limit keeps the most frequent
    small, _, _ = _prepared(tiny_bert_nodrop_dir, texts, tmp_path / "small", extend=5)
    assert small.added_tokens == NEW[:5]


def test_embeddings_output_and_bias_grow(tiny_bert_nodrop_dir: Path, texts: dict[str, Path], tmp_path: Path) -> None:
    task, tok, data = _prepared(tiny_bert_nodrop_dir, texts, tmp_path)
    model = task.build_model(tiny_bert_nodrop_dir, data, tok)
    head = model.cls.predictions
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tok) == model.config.vocab_size
    assert head.decoder.weight is embeddings  # still tied: the new output rows are the new input rows
    assert head.bias.shape[0] == len(tok) and head.decoder.bias is head.bias
    logits = task.logits(model, {"input_ids": torch.tensor([tok("the river holds 泽 today.")["input_ids"]])})
    assert logits.shape[-1] == len(tok)
    # full fine-tuning: the grown embeddings train with the head; LoRA: as trainable tokens, not as head
    assert task.head_module_names(model) == {"transform", "word_embeddings"}
    lora, _, lora_data = _prepared(tiny_bert_nodrop_dir, texts, tmp_path / "lora", method={"name": "lora"})
    assert lora.head_module_names(lora.build_model(tiny_bert_nodrop_dir, lora_data, lora.tokenizer)) == {"transform"}


def test_grown_output_bias_starts_at_the_mean(tiny_bert_nodrop_dir: Path) -> None:
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_nodrop_dir)
    old = model.config.vocab_size
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.linspace(-2.0, 0.0, old))
    assert grow_embeddings(model, old + 3) and not grow_embeddings(model, old + 3)
    bias = model.cls.predictions.bias
    assert torch.allclose(bias[old:], torch.full((3,), -1.0), atol=1e-5)  # transformers alone pads with 0
    assert model.cls.predictions.decoder.bias is bias


def test_lora_trains_the_new_rows_as_trainable_tokens(tiny_bert_nodrop_dir: Path, texts: dict[str, Path],
                                                      tmp_path: Path) -> None:
    task, tok, data = _prepared(tiny_bert_nodrop_dir, texts, tmp_path, method={"name": "lora"})
    torch.manual_seed(0)
    model, _ = build_task_model(task, tiny_bert_nodrop_dir, data, tok)
    before = model.get_input_embeddings().weight.detach().clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert not any("word_embeddings.weight" in n or "decoder.weight" in n for n in trainable)
    batch = task.collator(tok)([data.splits["train"][i] for i in range(16)])
    assert any(int(t) in task.new_token_ids() for t in batch["labels"][batch["labels"] != IGNORE_INDEX])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    task.loss(model, batch).backward()
    opt.step()
    merged = model.merge_and_unload()
    after = merged.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero()[:, 0].tolist()
    assert changed == task.new_token_ids()  # exactly the new rows moved
    assert merged.cls.predictions.decoder.weight is merged.get_input_embeddings().weight


# ------------------------------------------------------------------------------------------ a run
@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path, texts: dict[str, Path]) -> Any:
    """A tiny BERT pre-trained with data.extend_vocabulary (full fine-tuning)."""
    return lmtune.train(_config(tiny_bert_nodrop_dir, texts, tmp_path_factory.mktemp("vocab-run") / "run"),
                        show_progress=False)


def _new_token_probabilities(model: Any, tok: Any) -> tuple[list[float], list[float]]:
    """Where each new character is masked after its cue in a test sentence: the probability the model gives that
    character, and the probability it gives the new characters together."""
    model.eval()
    texts = [f"the old {cue} holds {tok.mask_token} today." for cue in CUES]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)  # (B, T, vocab)
    at = (enc["input_ids"] == tok.mask_token_id).nonzero().tolist()  # one mask per text
    targets = tok.convert_tokens_to_ids(NEW)
    return ([float(probs[b, t, targets[b]]) for b, t in at], [float(probs[b, t, targets].sum()) for b, t in at])


def test_the_new_tokens_are_learned(vocab_run: Any, tiny_bert_nodrop_dir: Path, texts: dict[str, Path],
                                    tmp_path: Path) -> None:
    m = vocab_run.metrics
    before, after = m["starting_point"]["test"], m["test"]
    assert after["loss"] < before["loss"] - 3, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.05
    # where a new character is masked, the trained model gives it (and the new characters together) a probability
    # far above the starting model's (the same growth: about 1 / vocabulary each)
    task, tok, data = _prepared(tiny_bert_nodrop_dir, texts, tmp_path)
    torch.manual_seed(0)
    start, start_all = _new_token_probabilities(task.build_model(tiny_bert_nodrop_dir, data, tok), tok)
    tuned, tuned_all = _new_token_probabilities(AutoModelForMaskedLM.from_pretrained(vocab_run.model_dir), tok)
    assert max(start_all) < 0.01, start_all
    assert min(tuned) > 20 * max(start), (start, tuned)
    assert min(tuned_all) > 0.5, tuned_all
    # and the run's predictor (and so the server) fills such a mask with a new character, written as itself
    [answer] = vocab_run.predict([f"the quiet {CUES[2]} holds {tok.mask_token} today."])
    best = answer["masks"][0]["fillers"][0]["text"]
    assert best in NEW and answer["text"] == f"the quiet castle holds {best} today."


def test_the_folder_reloads_with_plain_transformers(vocab_run: Any) -> None:
    tok = AutoTokenizer.from_pretrained(vocab_run.model_dir)
    model = AutoModelForMaskedLM.from_pretrained(vocab_run.model_dir)
    base = len(AutoTokenizer.from_pretrained(minilm_path()))
    assert len(tok) == base + len(EXPECTED) == model.config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == model.cls.predictions.bias.shape[0] == len(tok)
    assert tok("泽", add_special_tokens=False)["input_ids"] == [base]
    saved = json.loads((vocab_run.model_dir / "config.json").read_text())
    assert saved["vocab_size"] == len(tok)
    assert vocab_run.meta["added_tokens"] == len(EXPECTED)
    # evaluating the saved run adds nothing again (its tokenizer knows the words) and scores as training did
    scores = vocab_run.evaluate()
    assert scores["test"]["loss"] == pytest.approx(vocab_run.metrics["test"]["loss"], rel=1e-4)


def test_a_tagging_run_from_the_folder_finds_the_words_known(vocab_run: Any, tiny_bert_nodrop_dir: Path,
                                                              tmp_path: Path) -> None:
    other = "现"  # unknown too, but not in the masked-LM text: the tagging run still adds it itself
    rows = [{"tokens": [NEW[i % 6], NEW[(i + 1) % 6], "在", "北", "京", other, str(i)],
             "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O"]} for i in range(24)]
    train = tmp_path / "ner.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def prepared(model: Path) -> tuple[Any, Any, Any]:
        cfg = {"task": "token_classification", "model": str(model),
               "data": {"train": str(train), "extend_vocabulary": 50, "max_length": 32},
               "baselines": [], "output_dir": str(tmp_path / "ner")}
        task = get_task("token_classification")(load_config(cfg))
        tok = task.load_tokenizer(model)
        return task, tok, task.prepare(tok)

    fresh, _, _ = prepared(tiny_bert_nodrop_dir)
    assert set(fresh.added_tokens) == {*NEW[:6], other}  # from the plain model: every unknown character
    task, tok, data = prepared(vocab_run.model_dir)
    assert task.added_tokens == [other]
    # the tagger starts from the pre-trained rows of those characters
    model = task.build_model(vocab_run.model_dir, data, tok)
    assert isinstance(model, AutoModelForTokenClassification._model_mapping[type(model.config)])
    trained = load_file(str(vocab_run.model_dir / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    ids = tok.convert_tokens_to_ids(NEW)
    assert torch.equal(model.get_input_embeddings().weight[ids].detach(), trained[ids])


def test_inspect_shows_the_unknown_share_before_and_after(tiny_bert_nodrop_dir: Path, texts: dict[str, Path],
                                                          tmp_path: Path) -> None:
    got = inspect_data(_config(tiny_bert_nodrop_dir, texts, tmp_path / "run"), examples=1)
    train = got["facts"]["train"]
    added = sum(TRAIN_COUNTS) + len(MIXED_CASE) + 2  # each added word was one [UNK] where it stood
    assert train["unknown_tokens"].startswith("1 (")
    assert train["unknown_before_extension"].startswith(f"{added + 1} (")
    assert got["summary"]["vocabulary extension"].startswith(f"{len(EXPECTED)} of up to 50 words added (泽 在")
    plain = inspect_data(_config(tiny_bert_nodrop_dir, texts, tmp_path / "plain", extend=0), examples=0)
    assert plain["facts"]["train"]["unknown_tokens"] == train["unknown_before_extension"]
    assert any("--data.extend_vocabulary 2000" in tip for tip in plain["suggestions"])


# ------------------------------------------------------------------------------------------ export
def test_export_merged(vocab_run: Any, tmp_path: Path) -> None:
    # export_merged reloads the folder in plain transformers and checks its logits against the run's model
    result = export_merged(vocab_run.path, tmp_path / "merged")
    assert result.max_abs_logit_diff <= result.tolerance
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForMaskedLM.from_pretrained(tmp_path / "merged")
    assert merged.config.vocab_size == len(tok) == len(AutoTokenizer.from_pretrained(minilm_path())) + len(EXPECTED)


def test_lora_run_exports_merged(tiny_bert_nodrop_dir: Path, texts: dict[str, Path], tmp_path: Path) -> None:
    run = lmtune.train(_config(tiny_bert_nodrop_dir, texts, tmp_path / "lora", method={"name": "lora"},
                               train={"epochs": 1}), show_progress=False)
    result = export_merged(run.path, tmp_path / "merged")
    assert result.max_abs_logit_diff <= result.tolerance
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "merged").config.vocab_size == len(
        AutoTokenizer.from_pretrained(run.model_dir))
