"""The guides' classic models as neural baselines: a plain Elman RNN, a Transformer on lmtune's own
attention (equal to torch's scaled_dot_product_attention, with the paper's sinusoidal positions, still
loading models saved when it used torch's encoder layers), and the Keras Embedding -> Conv1D -> LSTM ->
Dense(1, sigmoid) classifier of examples/classification_keras_cnn_lstm.yaml, layer for layer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmtune
from lmtune.errors import ConfigError
from lmtune.models.neural_baselines import (
    EncoderStack,
    MultiHeadSelfAttention,
    NeuralBaselineConfig,
    NeuralBaselineForSequenceClassification,
    build_model,
    scaled_dot_product_attention,
    sinusoidal_positions,
)

ROOT = Path(__file__).resolve().parent.parent
KERAS_EXAMPLE = ROOT / "examples" / "classification_keras_cnn_lstm.yaml"


def _padded(seed: int = 0) -> tuple[torch.Generator, torch.Tensor]:
    """A seeded generator and ``keep`` (3, 7): a full row, a row of 4 real tokens, a row of 1."""
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[1, 4:] = False
    keep[2, 1:] = False
    return torch.Generator().manual_seed(seed), keep


# ------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padding mask"])
def test_attention_equals_torch_scaled_dot_product_attention(masked: bool) -> None:
    gen, keep = _padded()
    q, k, v = (torch.randn(3, 2, 7, 4, generator=gen) for _ in range(3))  # (B, H, T, d)
    mask = keep if masked else None
    ours = scaled_dot_product_attention(q, k, v, mask)
    torch_mask = keep[:, None, None, :] if masked else None
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask),
                               atol=1e-6, rtol=1e-5)
    if masked:  # a masked key changes nothing: scramble row 1's padded keys and values
        k2, v2 = k.clone(), v.clone()
        k2[1, :, 4:] = 100.0
        v2[1, :, 4:] = -100.0
        torch.testing.assert_close(scaled_dot_product_attention(q, k2, v2, mask)[1], ours[1])


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padding mask"])
def test_multi_head_attention_equals_torch_multihead_attention_with_the_same_weights(masked: bool) -> None:
    gen, keep = _padded(1)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = MultiHeadSelfAttention(8, 2, dropout=0.0).eval()
    ours.load_state_dict(ref.state_dict())  # the same parameter names
    x = torch.randn(3, 7, 8, generator=gen)
    expected, _ = ref(x, x, x, key_padding_mask=~keep if masked else None, need_weights=False)
    torch.testing.assert_close(ours(x, keep if masked else None), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("steps", "dim"), [(50, 16), (9, 7), (1, 2)])
def test_sinusoidal_positions_are_the_papers_formula(steps: int, dim: int) -> None:
    pe = sinusoidal_positions(steps, dim)
    assert pe.shape == (steps, dim)
    for pos in range(steps):
        for j in range(dim):
            i = j // 2  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
            angle = pos / 10000 ** (2 * i / dim)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert pe[pos, j].item() == pytest.approx(expected, abs=1e-5), (pos, j)


def test_encoder_layers_load_and_match_torch_transformer_encoder_weights() -> None:
    """The transformer baseline used torch's pre-norm GELU encoder layers: their weights load by name and
    compute the same on every real token (so models saved then still load and predict the same)."""
    gen, keep = _padded(2)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, activation="gelu", batch_first=True,
                                       norm_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ours = EncoderStack(8, 2, 0.1, depth=2).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 7, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, keep)[keep], ref(x, src_key_padding_mask=~keep)[keep], atol=1e-5,
                                   rtol=1e-5)


def test_a_transformer_saved_before_sinusoidal_positions_still_loads_and_predicts_the_same(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    # A config.json from before: no position_encoding key, a learned position table in the weights.
    old = NeuralBaselineConfig(architecture="transformer", vocab_size=30, embedding_dim=8, num_heads=2,
                               transformer_layers=1, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = NeuralBaselineForSequenceClassification(old).eval()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("position_encoding", "binary_sigmoid_head", "conv_activation"):
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    expected_keys = {"encoder.positions.weight", "encoder.layers.layers.0.self_attn.in_proj_weight",
                     "encoder.layers.layers.0.self_attn.out_proj.weight", "encoder.layers.layers.0.linear1.weight",
                     "encoder.layers.layers.0.norm2.bias", "encoder.norm.weight", "embeddings.weight",
                     "classifier.weight"}
    assert expected_keys <= set(model.state_dict())
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.position_encoding == "learned"
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("sizes", [
    {"architecture": "rnn"},
    {"architecture": "transformer", "position_encoding": "sinusoidal"},
    {"architecture": "cnn_lstm", "conv_activation": "linear", "pool_size": 1},
    {"architecture": "cnn_lstm", "conv_activation": "linear", "pool_size": 3},
    {"architecture": "cnn_lstm", "binary_sigmoid_head": True},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_new_variants_predict_the_same_however_a_batch_is_padded(sizes: dict[str, Any]) -> None:
    cfg = NeuralBaselineConfig(vocab_size=30, embedding_dim=8, hidden_size=8, conv_filters=8, kernel_size=3,
                               num_heads=2, transformer_layers=1, num_labels=2, max_position_embeddings=32,
                               **{"pool_size": 2, **sizes})
    torch.manual_seed(0)
    model = NeuralBaselineForSequenceClassification(cfg).eval()
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14]]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits  # (3, 2)
        assert torch.isfinite(batched).all()
        for i, r in enumerate(rows):
            torch.testing.assert_close(model(input_ids=torch.tensor([r])).logits[0], batched[i], atol=1e-5,
                                       rtol=1e-5)


def test_rnn_is_a_plain_elman_rnn() -> None:
    cfg = NeuralBaselineConfig(architecture="rnn", vocab_size=30, embedding_dim=8, hidden_size=6, num_labels=3)
    model = NeuralBaselineForSequenceClassification(cfg)
    rnn = model.encoder.rnn  # type: ignore[union-attr]
    assert type(rnn) is nn.RNN and rnn.nonlinearity == "tanh" and not rnn.bidirectional
    assert model.classifier.weight.shape == (3, 6)
    # orthogonal recurrent start (Keras's recurrent_initializer)
    torch.testing.assert_close(rnn.weight_hh_l0 @ rnn.weight_hh_l0.T, torch.eye(6), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ sigmoid head
def test_binary_sigmoid_head_is_binary_cross_entropy_on_one_logit() -> None:
    cfg = NeuralBaselineConfig(architecture="gru", vocab_size=30, embedding_dim=8, hidden_size=8, num_labels=2,
                               binary_sigmoid_head=True)
    torch.manual_seed(0)
    model = NeuralBaselineForSequenceClassification(cfg).eval()
    assert model.classifier.weight.shape == (1, 8)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0], [10, 11, 12], [13, 0, 0]])
    labels = torch.tensor([1, 0, 0, 1])
    out = model(input_ids=ids, labels=labels)
    z = model.classifier(model.encoder(model.embeddings(ids) * (ids != 0)[:, :, None], (ids != 0).long()))[:, 0]
    torch.testing.assert_close(out.logits, torch.stack([torch.zeros_like(z), z], -1))
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(z, labels.float()))
    torch.testing.assert_close(torch.softmax(out.logits, -1)[:, 1], torch.sigmoid(z))


@pytest.mark.parametrize(("labels", "multi_label"), [(["a", "b", "c"], False), (["a", "b"], True)])
def test_binary_sigmoid_head_needs_two_labels(labels: list[str], multi_label: bool) -> None:
    from lmtune.models.neural_baselines import build_tokenizer

    settings = lmtune.load_config({"model": "baseline:gru", "data": {"train": "x.csv"},
                                   "baseline": {"binary_sigmoid_head": True}}).baseline
    tok = build_tokenizer(["a b c"], settings, 16)
    with pytest.raises(ConfigError, match="needs exactly two labels") as err:
        build_model("gru", settings, tok, ["a b c"], labels, multi_label=multi_label, max_length=16, seed=0)
    assert err.value.field == "baseline.binary_sigmoid_head" and "false" in (err.value.hint or "")


# ------------------------------------------------------------------------------------------ the Keras example
def test_the_keras_example_builds_the_guides_model_layer_for_layer() -> None:
    """Embedding(10000, 64) -> Conv1D(64, 3, same) -> LSTM(64) -> Dense(1, sigmoid): the same shapes and
    parameters as Keras (torch's LSTM carries a second bias vector: 4 x 64 more)."""
    cfg = lmtune.load_config(KERAS_EXAMPLE)
    b = cfg.baseline
    assert cfg.model.name == "baseline:cnn_lstm" and cfg.data.max_length == 100
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.schedule, cfg.train.max_grad_norm) == \
        (1e-3, 0.0, "constant", None)
    texts = [" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 12000, 50)]  # 12,000 distinct words
    from lmtune.models.neural_baselines import build_tokenizer

    tok = build_tokenizer(texts, b, cfg.data.max_length)
    model, _ = build_model("cnn_lstm", b, tok, texts, ["fresh", "rotten"], multi_label=False, max_length=100, seed=0)
    assert model.embeddings.weight.shape == (10000, 64)
    conv = model.encoder.conv  # type: ignore[union-attr]
    assert conv.weight.shape == (64, 64, 3) and conv.padding == (1,)
    assert model.encoder.lstm.hidden_size == 64 and model.classifier.weight.shape == (1, 64)  # type: ignore[union-attr]
    keras = 10000 * 64 + (3 * 64 * 64 + 64) + 4 * (64 * 64 + 64 * 64 + 64) + (64 + 1)
    assert keras == 685_441
    assert sum(p.numel() for p in model.parameters()) == keras + 4 * 64
    # linear Conv1D, no pooling: the LSTM reads the convolution's outputs directly
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        h = conv(x.transpose(1, 2)).transpose(1, 2)  # (1, 5, 64), may be negative: no relu
        _, (state, _) = model.encoder.lstm(h)  # type: ignore[union-attr]
        torch.testing.assert_close(model.encoder(x, torch.ones(1, 5, dtype=torch.long)), state[-1])


def test_the_keras_example_trains_with_binary_cross_entropy(sentiment_csv: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    run = lmtune.train(KERAS_EXAMPLE, overrides={"data.train": str(sentiment_csv), "train.epochs": 3,
                                                 "data.validation_size": 0.1, "data.test_size": 0.1,
                                                 "output_dir": str(tmp_path / "run"), "baselines": []},
                       show_progress=False)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert run.metrics["test"]["accuracy"] >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert model.config.binary_sigmoid_head and model.classifier.weight.shape == (1, 64)
    assert [p["label"] for p in run.predict(["dull awful boring plot", "great wonderful superb"])] == ["neg", "pos"]


def test_rnn_trains_beside_the_main_model_as_a_listed_baseline(sentiment_csv: Path, tmp_path: Path) -> None:
    cfg = {"task": "classification", "model": "baseline:gru", "data": {"train": str(sentiment_csv), "max_length": 32},
           "baseline": {"embedding_dim": 16, "hidden_size": 16, "epochs": 4, "batch_size": 16, "learning_rate": 5e-3},
           "train": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "precision": "fp32"},
           "baselines": ["majority", "rnn"], "output_dir": str(tmp_path / "run")}
    run = lmtune.train(cfg, show_progress=False)
    baselines = json.loads((run.path / "baselines.json").read_text())
    rnn = baselines["rnn"]
    assert "error" not in rnn and rnn["kind"] == "neural" and rnn["run"] == "baselines/rnn"
    assert rnn["description"].startswith("word Embedding(16) -> RNN(16, tanh) -> last state -> Dense")
    assert rnn["metrics"]["test"]["accuracy"] > baselines["majority"]["metrics"]["test"]["accuracy"]
