"""The BiLSTM tagger baseline for token classification (NER): exact shapes and masking however a batch is padded,
learning word-tokenised English and character-tokenised Chinese entities on the one loop (``model:
baseline:bilstm``), a saved folder that plain transformers and ``lmtune predict`` use, embeddings started from
word2vec, and a row in a fine-tuned model's comparison table when listed in ``baselines``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_token_classification import synthetic_conll

import lmtune
from lmtune.errors import ConfigError
from lmtune.models.neural_baselines import NeuralBaselineConfig, NeuralBaselineForTokenClassification

# Tiny sizes: a run takes a second or two.
TINY = {"embedding_dim": 16, "hidden_size": 16, "vocab_min_count": 1, "dropout": 0.1}
TRAIN = {"epochs": 6, "batch_size": 16, "learning_rate": 2e-2, "precision": "fp32", "log_every": 5}

# ------------------------------------------------------------------------------------------ data
# English sentences: test_token_classification.synthetic_conll (names and places among filler).
ZH_PEOPLE = ["江泽民", "李鹏", "朱镕基", "乔石"]
ZH_PLACES = ["北京", "上海", "广州", "香港"]
ZH_ORGS = ["新华社", "国务院"]
ZH_FILLER = list("的在了会见到去和说是有今天我们他来")


def chinese_jsonl(n: int, seed: int = 0) -> str:
    """People's-Daily-like rows: characters as tokens, BIO tags for PER / LOC / ORG names among filler characters."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens: list[str] = []
        tags: list[str] = []
        for _ in range(rng.randint(3, 8)):
            r = rng.random()
            kind, names = ("PER", ZH_PEOPLE) if r < 0.15 else ("LOC", ZH_PLACES) if r < 0.3 else \
                ("ORG", ZH_ORGS) if r < 0.38 else ("O", ZH_FILLER)
            name = rng.choice(names)
            tokens += list(name)
            tags += ["O"] * len(name) if kind == "O" else [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        rows.append(json.dumps({"tokens": tokens, "tags": tags}, ensure_ascii=False))
    return "\n".join(rows) + "\n"


# (language, file name, data, word split saved with the model, a raw text to tag, the entities in it)
CASES = [
    ("english", "train.conll", synthetic_conll(300), "whitespace", "yesterday  Okonkwo Nakamura visited Zanzibar with Alice",
     [("PER", "Okonkwo Nakamura"), ("LOC", "Zanzibar"), ("PER", "Alice")]),
    ("chinese", "train.jsonl", chinese_jsonl(300), "chars", "今天江泽民在北京会见了新华社的他们",
     [("PER", "江泽民"), ("LOC", "北京"), ("ORG", "新华社")]),
]


def _config(train_file: Path, out: Path, model: str = "baseline:bilstm", **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {"task": "token_classification", "model": model,
                           "data": {"train": str(train_file), "max_length": 32}, "baseline": dict(TINY),
                           "train": dict(TRAIN), "output_dir": str(out)}
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tagged(language)``: a run of the tagger on that language's data, trained once per module."""
    runs: dict[str, Any] = {}

    def get(language: str) -> Any:
        if language not in runs:
            _, name, content, *_ = next(c for c in CASES if c[0] == language)
            folder = tmp_path_factory.mktemp(f"tagger-{language}")
            (folder / name).write_text(content, encoding="utf-8")
            runs[language] = lmtune.train(_config(folder / name, folder / "run"), show_progress=False)
        return runs[language]

    return get


# ------------------------------------------------------------------------------------------ the model alone
def _tiny_tagger(labels: int = 5, dropout: float = 0.0) -> NeuralBaselineForTokenClassification:
    cfg = NeuralBaselineConfig(architecture="bilstm", vocab_size=30, embedding_dim=8, hidden_size=6,
                               dropout=dropout, num_labels=labels, max_position_embeddings=32)
    torch.manual_seed(0)
    return NeuralBaselineForTokenClassification(cfg).eval()


def _padded(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_tagger_gives_one_logit_row_per_token_whatever_the_padding() -> None:
    model = _tiny_tagger()
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14]]
    ids, mask = _padded(rows, 12)  # more padding than any row needs
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        assert batched.shape == (3, 12, 5)
        for i, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r])).logits  # (1, len, 5): no padding, no mask given
            assert alone.shape == (1, len(r), 5)
            torch.testing.assert_close(alone[0], batched[i, : len(r)], atol=1e-6, rtol=1e-6)
            # Past a row's end the LSTM output is zero: the logits are the classifier's bias alone.
            torch.testing.assert_close(batched[i, len(r):], model.classifier.bias.expand(12 - len(r), 5))
        # The mask is read from the pad id when none is given.
        torch.testing.assert_close(model(input_ids=ids).logits, batched)


def test_tagger_loss_is_the_mean_over_labelled_tokens_only() -> None:
    model = _tiny_tagger()
    rows = [[5, 6, 7, 8], [9, 10]]
    labels_of = [[1, 2, 0, 3], [4, 0]]
    losses = []
    for width in (4, 9):  # the same labelled tokens, more padding
        ids, mask = _padded(rows, width)
        labels = torch.full((2, width), -100)
        for i, lab in enumerate(labels_of):
            labels[i, : len(lab)] = torch.tensor(lab)
        labels[0, 1] = -100  # a continuation sub-token: not scored either
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        keep = labels != -100
        expected = F.cross_entropy(out.logits[keep], labels[keep])
        torch.testing.assert_close(out.loss, expected)
        losses.append(out.loss)
    torch.testing.assert_close(losses[0], losses[1])


def test_only_the_bilstm_has_a_tagger_form() -> None:
    with pytest.raises(ValueError, match="tagger"):
        NeuralBaselineForTokenClassification(NeuralBaselineConfig(architecture="gru", vocab_size=5, num_labels=3))


# ------------------------------------------------------------------------------------------ trained on the loop
@pytest.mark.parametrize(("language", "name", "content", "split", "text", "entities"), CASES, ids=[c[0] for c in CASES])
def test_tagger_learns_entities_and_its_folder_predicts(language: str, name: str, content: str, split: str,
                                                        text: str, entities: list[tuple[str, str]],
                                                        tagged: Any) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    run = tagged(language)
    m = run.metrics
    # Chance: the same network untrained (its starting point) finds almost no entity.
    assert m["starting_point"]["test"]["f1"] < 0.3 and m["test"]["f1"] >= 0.9, m["test"]
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["loss"] for r in rows if r["split"] == "train"]
    assert train_loss[-1] < 0.3 * train_loss[0]
    # model/ is safetensors + config.json + tokenizer.json; plain transformers loads it (lmtune registered it)
    assert (run.model_dir / "model.safetensors").is_file() and (run.model_dir / "tokenizer.json").is_file()
    model = AutoModelForTokenClassification.from_pretrained(run.model_dir)
    assert isinstance(model, NeuralBaselineForTokenClassification) and model.config.architecture == "bilstm"
    assert model.config.id2label[0] == "O" and "B-PER" in model.config.label2id
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    assert tok.num_special_tokens_to_add() == 0 and len(tok) == model.config.vocab_size
    meta = json.loads((run.model_dir / "lmtune.json").read_text())
    assert meta["base_model"] == "baseline:bilstm" and meta["base_model_path"] is None
    assert meta["word_split"] == split and meta["tag_scheme"] == "bio"
    assert "reload check: max logit difference" in (run.path / "report.md").read_text()
    # raw text in, entities with character offsets out
    [out] = run.predict([text])
    assert [(e["entity"], e["text"]) for e in out["entities"]] == entities
    for e in out["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    if split == "chars":
        assert out["tokens"] == list(text)
    # evaluating the saved folder again gives the run's own test score
    assert run.evaluate()["test"]["f1"] == pytest.approx(m["test"]["f1"])


def test_word2vec_starts_the_tagger_embeddings(tmp_path: Path) -> None:
    data = tmp_path / "zh.jsonl"
    data.write_text(chinese_jsonl(300, seed=1), encoding="utf-8")
    run = lmtune.train(_config(data, tmp_path / "run", baseline={"embeddings": "word2vec", "word2vec_epochs": 2}),
                       show_progress=False)
    emb = json.loads((run.model_dir / "lmtune.json").read_text())["embeddings"]
    assert emb["source"].startswith("word2vec cbow") and emb["vocabulary_coverage"] == 1.0 and emb["dim"] == 16
    assert run.metrics["test"]["f1"] >= 0.9


@pytest.mark.parametrize(("changes", "message"), [
    ({"baselines": ["cnn_lstm"]}, r"baselines \['cnn_lstm'\] do not apply to task 'token_classification'"),
    ({"model": "baseline:gru"}, "is a text classifier"),
])
def test_sentence_classifiers_are_refused_for_token_classification(changes: dict[str, Any], message: str,
                                                                   tmp_path: Path) -> None:
    raw = _config(tmp_path / "t.conll", tmp_path / "run")
    raw.update(changes)
    with pytest.raises(ConfigError, match=message):
        lmtune.load_config(raw)


# ------------------------------------------------------------------------------------------ beside the tuned model
def test_tagger_baseline_joins_the_comparison_table(tiny_bert_nodrop_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import run_cli

    data = tmp_path / "train.conll"
    data.write_text(synthetic_conll(200), encoding="utf-8")
    cfg = _config(data, tmp_path / "run", str(tiny_bert_nodrop_dir),
                  baseline={"epochs": 6, "batch_size": 16, "learning_rate": 2e-2},
                  train={"epochs": 2, "learning_rate": 3e-3})
    cfg["baselines"] = ["bilstm"]
    run = lmtune.train(cfg, show_progress=False)
    baselines = json.loads((run.path / "baselines.json").read_text())
    assert list(baselines) == ["bilstm"]
    b = baselines["bilstm"]
    assert "error" not in b, b.get("error")
    assert b["kind"] == "neural" and b["run"] == "baselines/bilstm" and b["metrics"]["test"]["f1"] >= 0.7
    assert b["parameters"] > 0 and b["size_bytes"] > 0 and b["train_seconds"] > 0 and b["predict_ms_per_example"] > 0
    assert "BiLSTM(16) per token -> Dense over the tags (no CRF)" in b["description"]
    # the same split as the tuned model, its own (baseline.*) training settings
    sub = run.path / "baselines" / "bilstm"
    data_json, sub_json = (json.loads((p / "data.json").read_text()) for p in (run.path, sub))
    for split in ("train", "validation", "test"):
        assert sub_json[split]["examples"] == data_json[split]["examples"]
        assert sub_json[split]["label_counts"] == data_json[split]["label_counts"]
    assert lmtune.load_config(sub / "config.yaml").train.learning_rate == 2e-2
    # one table: tuned model, its starting point and the tagger, by entity F1, all timed on the same texts
    assert run.metrics["summary"]["predict_ms_per_example"] > 0
    rows = json.loads((run.path / "comparison.json").read_text())["rows"]
    assert [r["name"] for r in rows].count("baseline: bilstm") == 1 and len(rows) == 3
    scores = [r["metrics"]["f1"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    report = (run.path / "report.md").read_text()
    table = report.split("## Results on the test split")[1].split("\n\n")[1].splitlines()
    assert table[0].startswith("| model | entity F1 |") and "latency (ms/example)" in table[0]
    assert any(line.startswith("| baseline: bilstm |") for line in table[2:])
    # the sub-run folder is a run `lmtune predict` uses
    inputs = tmp_path / "texts.jsonl"
    inputs.write_text(json.dumps({"text": "Alice visited Kyoto"}) + "\n", encoding="utf-8")
    out = tmp_path / "tagged.jsonl"
    assert run_cli(["predict", str(sub), "-i", str(inputs), "-o", str(out), "--no-progress"], monkeypatch) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["tokens"] == ["Alice", "visited", "Kyoto"] and len(row["tags"]) == 3
