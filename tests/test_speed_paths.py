"""The training speed paths of issue 17 give the results of the plain paths.

- Decoder losses run the language-model head on the positions that carry a loss only
  (``lmtune.models.target_logits``): same loss and gradients as scoring the full logits with the rest ignored.
- ``train.fast_dropout`` draws CPU dropout masks with numpy's PCG64 (``lmtune.models.dropout``): the same
  Bernoulli distribution and scaling as torch's dropout, fixed by torch's seed, identity in eval mode.
- A BERT-style classifier runs its last encoder layer on position 0 only (``lmtune.models.first_token``):
  the same logits, loss and gradients as the full layer, and the same logged losses end to end.
- A BERT-style encoder's attention dropout draws fast masks in CPU training (``lmtune.models.encoder_attention``):
  the math attention with that mask, and otherwise the same outputs, gradients and logged losses as the plain block.
- A bf16 decoder's one- and two-row forwards run their matmuls on ATen's gemv (``lmtune.models.decode_matmuls``):
  oneDNN is off during those forwards only, back on after (errors and nesting included), same logits within bf16.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import lmtune
from lmtune.config import load_config
from lmtune.data.features import IGNORE_INDEX
from lmtune.models import decode_matmuls, encoder_attention, first_token
from lmtune.models import dropout as fast
from lmtune.models.target_logits import Selection, selected_rows
from lmtune.tasks.base import get_task


# ------------------------------------------------------------------------------------------ target logits
def _batch(vocab: int, *, packed: bool) -> dict[str, torch.Tensor]:
    """Three rows of 24 tokens with about a third of the labels kept; padded (mask) or packed (positions)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[torch.rand(3, 24, generator=g) < 0.67] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row with no target at all
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.cat([torch.arange(10), torch.arange(14)]).repeat(3, 1)
    else:
        mask = torch.ones(3, 24, dtype=torch.long)
        mask[1, 18:] = 0
        labels[1, 18:] = IGNORE_INDEX
        batch["attention_mask"] = mask
    return batch


def _full_logits_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain path: every position's logits, the positions without a target ignored."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none")
    return per_token.view(targets.shape).sum(dim=1)


@pytest.fixture
def sft_task(tmp_path, tiny_chat_llama_dir):
    cfg = load_config({"task": "sft", "model": str(tiny_chat_llama_dir), "data": {"train": "x.jsonl"},
                       "output_dir": str(tmp_path / "run")})
    return get_task("sft")(cfg)


@pytest.mark.parametrize("packed", [False, True])
def test_head_on_target_positions_gives_the_full_logits_loss_and_gradients(sft_task, tiny_chat_llama_dir, packed):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32)
    batch = _batch(model.config.vocab_size, packed=packed)
    calls = []
    layer = model.get_output_embeddings()
    handle = layer.register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape)))
    selected = sft_task._row_losses(model, batch)
    handle.remove()
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert calls == [(n, model.config.vocab_size)]  # the head saw the target positions only
    selected.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    plain = _full_logits_losses(model, batch)
    plain.sum().backward()
    assert selected[2] == 0 and plain[2] == 0
    torch.testing.assert_close(selected, plain, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_a_model_without_an_output_layer_is_scored_on_full_logits(sft_task, tiny_chat_llama_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32)
    batch = _batch(model.config.vocab_size, packed=False)
    expected = _full_logits_losses(model, batch)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    with selected_rows(model, torch.ones(3, 24, dtype=torch.bool)) as selection:
        pass
    assert selection == Selection(applied=False, calls=0)
    torch.testing.assert_close(sft_task._row_losses(model, batch), expected)


def test_masked_lm_scores_the_chosen_positions_only(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForMaskedLM

    cfg = load_config({"task": "masked_lm", "model": str(tiny_bert_dir), "data": {"train": "x.txt"},
                       "output_dir": str(tmp_path / "run")})
    task = get_task("masked_lm")(cfg)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (4, 20), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    chosen = torch.rand(4, 20, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    losses, hits, rows = task._token_losses(model, batch)
    handle.remove()
    assert shapes == [(int(chosen.sum()), model.config.vocab_size)]
    losses.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits  # the plain path
    plain = F.cross_entropy(logits[chosen], labels[chosen], reduction="none")
    plain.sum().backward()
    torch.testing.assert_close(losses, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(hits, logits[chosen].argmax(-1) == labels[chosen])
    assert torch.equal(rows, chosen.nonzero()[:, 0])
    for k, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[k].grad, rtol=1e-4, atol=1e-6, msg=k)


def test_sft_lora_run_equals_the_full_logits_run(tmp_path, tiny_chat_llama_dir, monkeypatch):
    """End to end (LoRA, packed rows, evaluation): every logged loss within 1e-4 of the full-logits path's."""
    rows = [{"messages": [{"role": "user", "content": f"Say the number {i} in words, please."},
                          {"role": "assistant", "content": f"It is {i}. " * (1 + i % 3)}]} for i in range(48)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def run(name: str) -> list[dict]:
        cfg = {"task": "sft", "model": str(tiny_chat_llama_dir), "method": {"name": "lora"},
               "data": {"train": str(data), "max_length": 64, "packing": True},
               "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "precision": "fp32",
                         "log_every": 1, "eval_every": 3},
               "generation": {"max_new_tokens": 4, "eval_examples": 2}, "output_dir": str(tmp_path / name)}
        out = lmtune.train(cfg, show_progress=False)
        return [json.loads(x) for x in (out.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]

    selected = run("selected")
    monkeypatch.setattr("lmtune.models.target_logits.output_layer", lambda model: None)  # never cut: full logits
    plain = run("plain")
    losses = [(r["split"], r["step"], r["loss"]) for r in selected if "loss" in r]
    expected = [(r["split"], r["step"], r["loss"]) for r in plain if "loss" in r]
    assert len(losses) == len(expected) >= 8
    for (split, step, loss), (split2, step2, loss2) in zip(losses, expected, strict=True):
        assert (split, step) == (split2, step2)
        assert loss == pytest.approx(loss2, rel=1e-4), (split, step)


# ------------------------------------------------------------------------------------------ fast dropout
def test_fast_dropout_keeps_one_minus_p_and_scales_to_the_same_expectation():
    torch.manual_seed(0)
    x = torch.ones(1024, 1024)
    y = fast.fast_dropout(x, 0.1)
    kept = y != 0
    threshold = round(0.9 * fast.LEVELS)
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 1M draws: the standard error is 3e-4
    assert torch.all(y[kept] == fast.LEVELS / threshold)  # the inverse of the exact (16-bit) keep probability
    assert y.double().mean().item() == pytest.approx(1.0, abs=3e-3)
    # rows and columns alike: no stripes from the 4 x 16-bit split of each 64-bit draw
    assert kept.float().mean(dim=0).std().item() < 0.02 and kept.float().mean(dim=1).std().item() < 0.02
    bf16 = fast.fast_dropout(torch.ones(64, 128, dtype=torch.bfloat16), 0.5)
    assert bf16.dtype == torch.bfloat16 and set(bf16.unique().tolist()) <= {0.0, 2.0}


def test_fast_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 96, requires_grad=True)
    y = fast.fast_dropout(x, 0.25)
    y.backward(torch.ones_like(y))
    scale = fast.LEVELS / round(0.75 * fast.LEVELS)
    torch.testing.assert_close(x.grad, (y != 0).float() * scale)
    torch.testing.assert_close(y, x.detach() * x.grad)


def test_fast_dropout_masks_follow_torch_seed():
    x = torch.ones(128, 64)
    torch.manual_seed(7)
    a, b = fast.fast_dropout(x, 0.3), fast.fast_dropout(x, 0.3)
    torch.manual_seed(7)
    a2 = fast.fast_dropout(x, 0.3)
    assert torch.equal(a, a2) and not torch.equal(a, b)


def test_fast_dropout_module_is_nn_dropout_in_eval_and_for_extreme_p():
    layer = torch.nn.Dropout(0.1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), layer, torch.nn.Dropout(0.0), torch.nn.Dropout(0.2, inplace=True))
    assert fast.use_fast_dropout(model) == 2  # p 0 stays as it is; in-place ones keep torch's path at run time
    assert type(layer) is fast.FastDropout and isinstance(layer, torch.nn.Dropout) and layer.p == 0.1
    x = torch.randn(128, 64)
    layer.eval()
    assert layer(x) is x
    layer.train()
    assert fast.keep_mask(x.shape, 1e-9) is None and fast.keep_mask(x.shape, 1 - 1e-9) is None
    torch.manual_seed(0)
    y = layer(x)
    assert 0.05 < (y == 0).float().mean().item() < 0.15


def test_fast_dropout_run_trains_like_torch_dropout(tmp_path, tiny_bert_dir, sentiment_csv, caplog):
    """Classification with dropout 0.1 (tiny BERT): both mask sources train the model to the same place."""

    def run(name: str, fast_dropout: bool) -> dict:
        cfg = {"task": "classification", "model": str(tiny_bert_dir),
               "data": {"train": str(sentiment_csv), "max_length": 32},
               "train": {"epochs": 3, "batch_size": 16, "learning_rate": 2e-3, "precision": "fp32",
                         "fast_dropout": fast_dropout},
               "baselines": [], "output_dir": str(tmp_path / name)}
        return lmtune.train(cfg, show_progress=False).metrics

    with caplog.at_level("INFO", logger="lmtune.training.loop"):
        fast_run = run("fast", True)
    assert "dropout layers draw their masks with numpy's PCG64" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="lmtune.training.loop"):
        torch_run = run("torch", False)
    assert "PCG64" not in caplog.text
    for m in (fast_run, torch_run):
        assert m["test"]["accuracy"] >= 0.9 > m["starting_point"]["test"]["accuracy"]
    assert fast_run["test"]["loss"] == pytest.approx(torch_run["test"]["loss"], abs=0.15)


# ------------------------------------------------------------------------------------------ first token only
def _tiny_classifier(kind: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 48, "max_position_embeddings": 64, "num_labels": 3}
    if kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**common, pad_token_id=1))
    elif kind == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64, num_labels=3))
    else:
        model = BertForSequenceClassification(BertConfig(**common))
    model.config._attn_implementation = attn
    return model


def _without_dropout(model: torch.nn.Module, checkpointing: bool) -> None:
    """Eval mode; or, with activation checkpointing, train mode with every dropout at p = 0. Either way both
    paths of a comparison see the same numbers."""
    model.eval()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0


def _stepper(model: torch.nn.Module, seed: int, padded: tuple[tuple[int, int], ...],
             labels: list[int]) -> Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A forward and backward on 4 rows of 20 tokens (row r padded from position t for each (r, t) in
    ``padded``): returns the logits and every gradient."""
    ids = torch.randint(3, 120, (4, 20), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(4, 20, dtype=torch.long)
    for row, start in padded:
        mask[row, start:] = 0
    targets = torch.tensor(labels)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        F.cross_entropy(logits, targets, reduction="sum").backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    return step


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_first_token_last_layer_gives_the_full_layers_logits_and_gradients(kind, attn, checkpointing):
    """BERT (MiniLM's layers), RoBERTa and DistilBERT heads read position 0 only; padded rows included."""
    model = _tiny_classifier(kind, attn)
    _without_dropout(model, checkpointing)
    step = _stepper(model, 1, ((1, 7), (3, 15)), [0, 2, 1, 2])
    plain_logits, plain_grads = step()
    assert first_token.first_token_last_layer(model)
    rows: list[int] = []
    if kind == "distilbert":
        feed_forward = model.base_model.transformer.layer[-1].ffn.lin1
    else:
        feed_forward = model.base_model.encoder.layer[-1].intermediate.dense
    handle = feed_forward.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    logits, grads = step()
    handle.remove()
    assert rows and set(rows) == {1}  # the feed-forward block saw position 0 only
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():  # key biases have zero gradient in exact arithmetic: atol covers their noise
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    first_token.plain_last_layer(model)
    assert torch.equal(step()[0], plain_logits)  # undone: the class's own forward again


def test_first_token_last_layer_leaves_other_heads_alone():
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=64)
    assert not first_token.first_token_last_layer(BertForTokenClassification(bert))  # reads every position
    assert not first_token.first_token_last_layer(AlbertForSequenceClassification(AlbertConfig(
        vocab_size=120, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64)))  # a head and layer this path does not know
    chunked = BertConfig(**{**bert.to_dict(), "chunk_size_feed_forward": 4})
    assert not first_token.first_token_last_layer(BertForSequenceClassification(chunked))


def test_classification_run_equals_the_full_last_layer_run(tmp_path, tiny_bert_nodrop_dir, sentiment_csv,
                                                           monkeypatch, caplog):
    """End to end (no dropout, so both runs draw the same numbers): every logged loss within 1e-4."""

    def run(name: str) -> tuple[list[tuple], dict]:
        cfg = {"task": "classification", "model": str(tiny_bert_nodrop_dir),
               "data": {"train": str(sentiment_csv), "max_length": 32},
               "train": {"max_steps": 12, "batch_size": 16, "learning_rate": 2e-3, "precision": "fp32",
                         "log_every": 2, "eval_every": 6},
               "baselines": [], "output_dir": str(tmp_path / name)}
        out = lmtune.train(cfg, show_progress=False)
        rows = [json.loads(x) for x in (out.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        return [(r["split"], r["step"], r["loss"]) for r in rows if "loss" in r], out.metrics

    with caplog.at_level("INFO", logger="lmtune.tasks.classification.task"):
        losses, metrics = run("first")
    assert "the last encoder layer runs on that position" in caplog.text
    monkeypatch.setattr(first_token, "first_token_last_layer", lambda model: False)
    expected, plain_metrics = run("plain")
    assert len(losses) == len(expected) >= 8
    for (split, step, loss), (split2, step2, loss2) in zip(losses, expected, strict=True):
        assert (split, step) == (split2, step2)
        assert loss == pytest.approx(loss2, rel=1e-4), (split, step)
    assert metrics["test"]["accuracy"] == plain_metrics["test"]["accuracy"]
    assert metrics["test"]["loss"] == pytest.approx(plain_metrics["test"]["loss"], rel=1e-4)


# ------------------------------------------------------------------------------------------ encoder attention
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_patched_attention_gives_the_plain_blocks_outputs_and_gradients(kind, attn, checkpointing):
    model = _tiny_classifier(kind, attn).eval()
    fast.use_fast_dropout(model)
    assert encoder_attention.patch_attention(model) == 2
    encoder_attention.unpatch_attention(model)
    _without_dropout(model, checkpointing)
    step = _stepper(model, 2, ((0, 11), (2, 4)), [1, 0, 2, 2])
    plain_logits, plain_grads = step()
    blocks = [m for m in model.modules() if type(m).__name__.endswith("SelfAttention")]
    for block in blocks:  # patched as patch_attention does (it skips blocks without dropout, as these now are)
        block.forward = types.MethodType(encoder_attention._patched_forward, block)
    logits, grads = step()
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert len(blocks) == 2 and all("forward" in vars(m) for m in blocks)
    encoder_attention.unpatch_attention(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(step()[0], plain_logits)  # undone: the class's own forward again


def test_attention_patch_keeps_adapters_and_leaves_decoders_alone():
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(4))
    lora = get_peft_model(_tiny_classifier("bert", "sdpa"), LoraConfig(r=2, target_modules=["query", "value"]))
    lora.eval()
    with torch.no_grad():  # B starts at zero: move it, so the adapters count
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    adapted = lora(input_ids=ids).logits.detach()
    assert encoder_attention.patch_attention(lora) == 0  # torch's dropout: nothing to speed up
    fast.use_fast_dropout(lora)
    assert encoder_attention.patch_attention(lora) == 2  # the blocks call their (adapted) modules as before
    torch.testing.assert_close(lora(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-6)
    decoder = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64, is_decoder=True)
    albert = AlbertForSequenceClassification(AlbertConfig(  # an attention class this path does not know
        vocab_size=120, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64))
    for other in (BertForSequenceClassification(decoder), albert):
        assert fast.use_fast_dropout(other) > 0
        assert encoder_attention.patch_attention(other) == 0


def test_classification_run_with_fast_attention_dropout_trains_like_the_plain_attention(tmp_path, tiny_bert_dir,
                                                                                       sentiment_csv, monkeypatch,
                                                                                       caplog):
    """End to end with dropout 0.1 (other draws, so not equal): both learn the task to the same test loss."""

    def run(name: str) -> dict:
        cfg = {"task": "classification", "model": str(tiny_bert_dir),
               "data": {"train": str(sentiment_csv), "max_length": 32},
               "train": {"epochs": 3, "batch_size": 16, "learning_rate": 2e-3, "precision": "fp32", "seed": 0},
               "baselines": [], "output_dir": str(tmp_path / name)}
        return lmtune.train(cfg, show_progress=False).metrics

    with caplog.at_level("INFO", logger="lmtune.training.loop"):
        patched = run("patched")
    assert "2 encoder attention blocks draw their attention-dropout masks" in caplog.text
    monkeypatch.setattr(encoder_attention, "patch_attention", lambda model: 0)
    plain = run("plain")
    for m in (patched, plain):
        assert m["test"]["accuracy"] >= 0.9 > m["starting_point"]["test"]["accuracy"]
    assert patched["test"]["loss"] == pytest.approx(plain["test"]["loss"], abs=0.15)


# ------------------------------------------------------------------------------------------ one-row decoding on gemv
def _decoder_bf16(model_dir) -> tuple[torch.nn.Module, list[bool]]:
    """The tiny Llama in bf16 and the list its first layer appends oneDNN's switch to at every forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    seen: list[bool] = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch._C._get_mkldnn_enabled()))
    return model, seen


def _prefilled(model: torch.nn.Module, ids: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_one_row_decoding_steps_run_on_aten_gemv_with_the_same_logits(tiny_chat_llama_dir):
    model, seen = _decoder_bf16(tiny_chat_llama_dir)
    ids = torch.tensor([[5, 17, 230, 4096, 77, 12]])
    step = torch.tensor([[901]])
    plain_cache = _prefilled(model, ids)
    with torch.inference_mode():
        plain = model(step, past_key_values=plain_cache, use_cache=True).logits.float()
    assert seen == [True, True]  # no route: oneDNN stays on
    route = decode_matmuls.route_small_forwards(model)
    seen.clear()
    cache = _prefilled(model, ids)  # a prompt of 6 tokens: oneDNN (far faster for many rows)
    with torch.inference_mode():
        routed = model(step, past_key_values=cache, use_cache=True).logits.float()  # one row: gemv
        model(torch.tensor([[3, 4]]), use_cache=False)  # two rows: gemv
        model(torch.tensor([[3], [4], [5]]), use_cache=False)  # three rows: oneDNN
        model(inputs_embeds=model.model.embed_tokens(step), use_cache=False)  # one row given as embeddings
    assert seen == [True, False, False, True, False]
    assert torch._C._get_mkldnn_enabled()
    # the same products accumulated in fp32 in another order: equal to bf16's rounding of the logits
    assert (routed - plain).abs().max() <= 0.02 * (plain.max() - plain.min())
    route.remove()
    seen.clear()
    with torch.inference_mode():
        model(step, use_cache=False)
    assert seen == [True]


def test_gemv_route_restores_onednn_after_errors_and_nested_forwards(tiny_chat_llama_dir):
    outer, outer_seen = _decoder_bf16(tiny_chat_llama_dir)
    inner, inner_seen = _decoder_bf16(tiny_chat_llama_dir)
    routes = [decode_matmuls.route_small_forwards(m) for m in (outer, inner)]
    step = torch.tensor([[901]])
    after_inner: list[bool] = []

    def run_inner(*_):  # a second routed model decoding while the first one holds oneDNN off
        with torch.inference_mode():
            inner(step, use_cache=False)
        after_inner.append(torch._C._get_mkldnn_enabled())

    hook = outer.model.layers[1].register_forward_pre_hook(run_inner)
    with torch.inference_mode():
        outer(step, use_cache=False)
    assert outer_seen == [False] and inner_seen == [False]
    assert after_inner == [False]  # the inner step ended, the outer one still holds it off
    assert torch._C._get_mkldnn_enabled()
    hook.remove()

    def fail(*_):
        raise RuntimeError("broken layer")

    hook = outer.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="broken layer"), torch.inference_mode():
        outer(step, use_cache=False)
    assert torch._C._get_mkldnn_enabled()  # switched back on although the forward raised
    hook.remove()
    for route in routes:
        route.remove()


def test_gemv_route_is_asked_of_the_measured_probe(monkeypatch):
    from lmtune.training import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_gemv_speedup", lambda: 2.4)
    assert precision.route_bf16_gemv(torch.bfloat16, cpu)
    assert not precision.route_bf16_gemv(torch.float32, cpu)  # fp32 matmuls are MKL's, not oneDNN's
    assert not precision.route_bf16_gemv(torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(precision, "cpu_bf16_gemv_speedup", lambda: 1.05)  # a CPU where oneDNN is as fast
    assert not precision.route_bf16_gemv(torch.bfloat16, cpu)
    # the probe itself: a positive ratio, and oneDNN's switch left as it was
    assert precision._bf16_gemv_speedup() > 0
    assert torch._C._get_mkldnn_enabled()


# ------------------------------------------------------------------------------- bf16 linears packed for oneDNN
def test_packed_linears_give_the_same_logits_and_keep_ties_and_state(tiny_chat_llama_dir):
    model, _ = _decoder_bf16(tiny_chat_llama_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.bfloat16).eval()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    packed_bytes = decode_matmuls.pack_linears(model)
    packed = [m for m in model.modules() if isinstance(m, decode_matmuls.PackedLinear)]
    assert len(packed) == linears and packed_bytes == sum(m.weight.numel() * 2 for m in packed)
    calls = []
    for m in packed:  # every product of a batch goes through the packed op
        m.register_forward_hook(lambda mod, args, out: calls.append(torch._C._get_mkldnn_enabled()))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([[5, 17, 230, 4096, 77, 12], [3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])

    def packed_calls(fn) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events())

    with torch.inference_mode():
        # oneDNN with the weight in its blocked layout does the same products as with the strided one: bitwise
        assert torch.equal(model(ids).logits, plain(ids).logits)
        assert torch.equal(model(ids[:, :1]).logits, plain(ids[:, :1]).logits)  # 3 one-token rows (a decode step)
        assert packed_calls(lambda: model(ids)) == len(packed)  # every product on the packed weight
        assert packed_calls(lambda: plain(ids)) == 0
    assert calls and all(calls)
    # with oneDNN switched off (the one/two-row gemv route) the plain weight is used, as before packing
    route = decode_matmuls.route_small_forwards(model)
    plain_route = decode_matmuls.route_small_forwards(plain)
    with torch.inference_mode():
        assert torch.equal(model(ids[:1, :1]).logits, plain(ids[:1, :1]).logits)
        assert packed_calls(lambda: model(ids[:1, :1])) == 0
    route.remove()
    plain_route.remove()
    # under autograd it is the plain linear too (the packed op has no gradient)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_packing_skips_what_it_cannot_pack_and_respects_the_memory_budget(tiny_chat_llama_dir):
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir).eval()
    assert decode_matmuls.pack_linears(fp32) == 0  # float32 weights: MKL's matmuls, nothing to pack
    assert not any(isinstance(m, decode_matmuls.PackedLinear) for m in fp32.modules())
    model, _ = _decoder_bf16(tiny_chat_llama_dir)
    assert decode_matmuls.pack_linears(model, max_bytes=1000) == 0  # copies larger than the budget
    assert not any(isinstance(m, decode_matmuls.PackedLinear) for m in model.modules())


def test_packing_is_asked_of_the_measured_probe(monkeypatch):
    from lmtune.training import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_packed_speedup", lambda: 1.8)
    assert precision.pack_bf16_linears(torch.bfloat16, cpu)
    assert not precision.pack_bf16_linears(torch.float32, cpu)
    assert not precision.pack_bf16_linears(torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(precision, "cpu_bf16_packed_speedup", lambda: 1.1)
    assert not precision.pack_bf16_linears(torch.bfloat16, cpu)
    assert precision._bf16_packed_speedup() > 0
