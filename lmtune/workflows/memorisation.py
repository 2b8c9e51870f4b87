"""The model-running half of the memorisation audit (``evaluate.memorisation``): log-perplexities of canaries and
reference secrets, and greedy continuations of extraction prompts. The data, the math and the report section
are :mod:`lmtune.evaluate.memorisation`.

:func:`audit` runs on the starting model (before training) and on the tuned one (after the final evaluation).
Every process runs it on the same inputs in the same order, so a model sharded across processes (FSDP, ZeRO-3)
meets its collectives in step; it draws no random numbers (run under ``fork_rng`` anyway) and puts the model
back in the mode it found it in, so training is unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.config import Config
from lmtune.data.features import save_json_atomic
from lmtune.evaluate.memorisation import (
    CANARIES_FILE,
    AuditData,
    exposure_figures,
    extraction_figures,
    fill,
    reference_secrets,
)

# Sequences per forward pass when scoring and generating.
BATCH_SIZE = 32


def secret_token_ids(tokenizer: Any, data: AuditData, prefix_text: str, texts: Sequence[str]) -> list[tuple[list[int], int]]:
    """Each filled canary text as the model sees it (``bos`` + the context + the text) and the position its
    score starts at: the first token past the longest run shared with the text before the secret (a tokenizer
    may merge the space before the secret into the secret's first token)."""
    prefix = data.bos + tokenizer(data.context + prefix_text, add_special_tokens=False)["input_ids"]
    encoded = tokenizer([data.context + t for t in texts], add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        full = data.bos + list(ids)
        start = 0
        while start < min(len(prefix), len(full)) and prefix[start] == full[start]:
            start += 1
        out.append((full, max(start, 1)))  # the first token has nothing to be predicted from
    return out


@torch.no_grad()
def log_perplexities(model: Any, sequences: Sequence[tuple[list[int], int]], pad_id: int,
                     device: torch.device) -> list[float]:
    """``-log2 P(tokens[start:] | tokens[:start])`` of each ``(tokens, start)``, in bits.

    Left-padded, so the scored tokens of every row sit at the end and only the last positions' logits are
    computed (``logits_to_keep``): the vocabulary projection of a shared context would be most of the cost.
    """
    out: list[float] = []
    for i in range(0, len(sequences), BATCH_SIZE):
        chunk = sequences[i : i + BATCH_SIZE]
        width = max(len(ids) for ids, _ in chunk)
        keep = max(len(ids) - start for ids, start in chunk) + 1  # the position before the first scored token too
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (seq, start) in enumerate(chunk):
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
            scored[row, width - len(seq) + start:] = True
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): left padding shifts no position
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, logits_to_keep=keep).logits.float()  # (B, keep, vocab)
        # Position t predicts token t+1: the kept positions but the last, against the last keep - 1 tokens.
        targets = ids[:, width - keep + 1:].to(device)  # (B, keep - 1)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        out += ((nll * scored[:, width - keep + 1:].to(device)).sum(dim=1) / math.log(2)).tolist()
    return out


@torch.no_grad()
def greedy_continuations(model: Any, prompts: Sequence[list[int]], new_tokens: int, pad_id: int,
                         device: torch.device) -> list[list[int]]:
    """``new_tokens`` greedily chosen tokens after each prompt (never stopped early: the comparison with the
    record's own tokens decides), batched with left padding and the KV cache."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), BATCH_SIZE):
        chunk = prompts[i : i + BATCH_SIZE]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): left padding shifts no position
        step_ids, past = ids, None
        generated = []
        for _ in range(new_tokens):
            result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                           use_cache=True)
            past = result.past_key_values
            step_ids = result.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            generated.append(step_ids)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
        out += torch.cat(generated, dim=1).tolist()
    return out


def audit(model: Any, tokenizer: Any, data: AuditData, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Exposure of every canary and the extraction rates of ``model`` (see :mod:`lmtune.evaluate.memorisation`)."""
    settings = cfg.evaluate.memorisation
    assert settings is not None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefix_text = settings.canary_format.split("{digits}")[0]
    references, exact = reference_secrets(settings, data.canaries, cfg.train.seed)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            texts = [c.text for c in data.canaries] + [fill(settings, s) for s in references]
            scores = log_perplexities(model, secret_token_ids(tokenizer, data, prefix_text, texts), pad_id, device)
            n = len(data.canaries)
            result: dict[str, Any] = {"exposure": exposure_figures(data.canaries, scores[:n], scores[n:], exact=exact,
                                                                   digits=settings.canary_digits)}
            if settings.extraction_prompts and data.train_items:
                extraction: dict[str, Any] = {"heldout_split": data.heldout_split,
                                              "suffix_tokens": settings.extraction_suffix_tokens,
                                              "prompt_description": data.prompt_description}
                for key, items in (("train", data.train_items), ("heldout", data.heldout_items)):
                    if items:
                        generated = greedy_continuations(model, [p for p, _ in items],
                                                         settings.extraction_suffix_tokens, pad_id, device)
                        extraction[key] = extraction_figures(generated, [t for _, t in items])
                result["extraction"] = extraction
    finally:
        model.train(was_training)
    return result


def record_canaries(run_dir: Path, cfg: Config, data: AuditData) -> None:
    """``canaries.json``: the settings and every canary (secret, text, times inserted), for a later audit."""
    settings = cfg.evaluate.memorisation
    assert settings is not None
    save_json_atomic(run_dir / CANARIES_FILE, {
        "seed": cfg.train.seed, "settings": settings.model_dump(mode="json"),
        "inserted_records": sum(c.repeats for c in data.canaries),
        "canaries": [{"index": c.index, "secret": c.secret, "text": c.text, "repeats": c.repeats}
                     for c in data.canaries],
    })


def memorisation_metrics(cfg: Config, data: AuditData, starting: dict[str, Any] | None,
                         tuned: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``'s ``memorisation``: the settings that matter to read it, the starting model's figures and
    the tuned model's."""
    settings = cfg.evaluate.memorisation
    assert settings is not None
    return {"canary_format": settings.canary_format, "canary_digits": settings.canary_digits,
            "inserted_records": sum(c.repeats for c in data.canaries),
            **({"starting_point": starting} if starting is not None else {}), "tuned": tuned}
