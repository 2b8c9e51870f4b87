"""``lmtune export RUN --format gguf``: a decoder as one GGUF file for llama.cpp and Ollama, checked in llama.cpp.

The run's model is first exported merged (``lmtune.models.export.export_merged_folder``: the adapter folded in
and checked), then written as a GGUF (``lmtune.models.gguf_convert``): ``f16`` directly, ``q8_0`` and ``q4_k_m``
as a float32 GGUF quantized by llama.cpp's own ``llama_model_quantize`` (through llama-cpp-python). The file
is then loaded by llama.cpp itself (llama-cpp-python) and compared with the merged model on the parity
prompts: the same token ids from both tokenizers, the next-token distributions at every position (mean KL
divergence, top-1 agreement, max logit difference) and greedy continuations. A quantization changes the
model, so each has its own bounds (``CHECKS``). Given the run's held-out token sequences, the mean token NLL
(and perplexity) of both models on them is recorded too, and ``max_drop`` refuses a file whose perplexity
rises more than that. Beside ``model.gguf`` the folder holds an Ollama ``Modelfile`` (its TEMPLATE renders
the chat template's conversations in Go-template syntax, its stop parameters end a turn) and
``export.json``. Only a folder that passed appears at ``output``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig

from lmtune.errors import RunError
from lmtune.models import export as merged_export
from lmtune.models.gguf_convert import SUPPORTED, gguf_architecture, write_gguf
from lmtune.models.ollama import modelfile
from lmtune.version import __version__

try:  # llama-cpp-python builds from source (no Linux wheels): a machine may lack it; export says how to get it
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the machine
    llama_cpp = None  # type: ignore[assignment]

log = logging.getLogger("lmtune")

GGUF_FILE = "model.gguf"
QUANTIZATIONS = ("f16", "q8_0", "q4_k_m")
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
INSTALL_HINT = (f"pip install {LLAMA_CPP_PIN} (builds llama.cpp from source: a C++ compiler and cmake; "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" for a build that runs on other CPUs), or `make install`")
CONTINUATION_TOKENS = 8
EVAL_SEQUENCES = 32  # held-out sequences scored for the quality figure (the first ones, as the split lists them)
MAX_EVAL_TOKENS = 512


@dataclass(frozen=True)
class Check:
    """Bounds one quantization must meet against the merged float32 model, over every position of the prompts.

    ``max_mean_kl``: mean KL(merged || gguf) of the next-token distributions (nats); ``min_top1``: fraction of
    positions whose most likely next token agrees.
    """

    max_mean_kl: float
    min_top1: float


# Measured on SmolLM2-135M over 205 positions (BENCHMARKS.md): f16 mean KL 1.0e-5, top-1 1.000; q8_0 6.6e-3,
# 0.942; q4_k_m ~0.09, 0.88 (its 576-wide rows fall back to q5_0). The bounds leave 3x room: f16 rounds weights
# and activations to half precision; q8_0 keeps 8 bits per weight (llama.cpp also quantizes the activations of
# each product to 8 bits); q4_k_m about 5. A wrong conversion (a missing q/k permutation, an unshifted Gemma
# norm) gives a KL above 1 and top-1 agreement near chance.
CHECKS = {
    "f16": Check(max_mean_kl=1e-3, min_top1=0.95),
    "q8_0": Check(max_mean_kl=3e-2, min_top1=0.85),
    "q4_k_m": Check(max_mean_kl=0.3, min_top1=0.7),
}
_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@dataclass
class GgufExportResult:
    """What the GGUF export wrote and how closely llama.cpp running it matches the merged model."""

    folder: Path
    quantization: str
    bytes: int
    prompts: int
    positions: int
    mean_kl: float
    max_kl: float
    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    greedy_identical: int  # prompts whose continuation is the same token for token
    tolerance: float
    min_top1: float
    quality: dict[str, Any] | None = None
    max_drop: float | None = None
    modelfile_template: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def require_llama_cpp() -> Any:
    """The llama_cpp module; RunError saying how to install it when it is missing."""
    if llama_cpp is None:
        raise RunError("GGUF export loads the file in llama.cpp to check it, and llama-cpp-python is not "
                       "installed", hint=INSTALL_HINT)
    return llama_cpp


def check_quantization(quantization: str) -> None:
    """RunError for a quantization GGUF export does not write."""
    if quantization not in QUANTIZATIONS:
        raise RunError(f"unknown GGUF quantization '{quantization}'; available: {', '.join(QUANTIZATIONS)}",
                       field="quantize")


def check_architecture(model_dir: Path, meta: dict[str, Any]) -> None:
    """RunError when the run's model is not one GGUF export converts (read from its config, before any work)."""
    for folder in (model_dir, Path(str(meta.get("base_model_path") or ""))):
        if (folder / "config.json").is_file():
            gguf_architecture(AutoConfig.from_pretrained(folder, trust_remote_code=False))
            return
    raise RunError("the run has no config.json to tell its architecture", file=model_dir)


def export_gguf_folder(run_dir: Path, model_dir: Path, meta: dict[str, Any], output: str | Path, *,
                       quantization: str = "f16", tolerance: float | None = None, max_drop: float | None = None,
                       sequences: list[tuple[list[int], list[int]]] | None = None, split: str | None = None,
                       prompts: list[str] | None = None, overwrite: bool = False) -> GgufExportResult:
    """Write the decoder of the run at ``run_dir`` (model folder ``model_dir``, ``lmtune.json`` ``meta``) as
    ``output/model.gguf`` in ``quantization`` (f16, q8_0, q4_k_m) with an Ollama ``Modelfile``, checked in llama.cpp.

    ``tolerance`` overrides the quantization's largest mean KL divergence (``CHECKS``); ``sequences`` (held-out
    ``(input_ids, labels)`` pairs, -100 where a token is not scored; from the run's split ``split``) give the
    perplexity of both models, and
    ``max_drop`` the largest perplexity rise allowed. A failed check raises RunError and leaves nothing.
    """
    check_quantization(quantization)
    if max_drop is not None and not sequences:
        raise RunError("--max-drop needs held-out sequences to score, and this run has none")
    engine = require_llama_cpp()
    run_dir, model_dir = Path(run_dir).resolve(), Path(model_dir).resolve()
    output = Path(output).expanduser().resolve()
    merged_export.check_output_folder(output, run_dir, [model_dir], overwrite=overwrite)
    check_architecture(model_dir, meta)
    check = CHECKS[quantization]
    tolerance = check.max_mean_kl if tolerance is None else tolerance
    seconds: dict[str, float] = {}

    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    try:
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        merged = merged_export.export_merged_folder(run_dir, model_dir, meta, tmp / "merged",
                                                    auto_class="AutoModelForCausalLM")
        seconds["merge"] = time.perf_counter() - start
        tokenizer = merged_export.load_tokenizer(merged.folder)
        model = merged_export.load_model(transformers.AutoModelForCausalLM, merged.folder)
        start = time.perf_counter()
        _write(engine, model, tokenizer, tmp, quantization, name=str(meta.get("name") or run_dir.name))
        seconds["convert"] = time.perf_counter() - start
        start = time.perf_counter()
        llm = _load(engine, tmp / GGUF_FILE, model.config)
        try:
            parity = _parity(llm, model, tokenizer, prompts)
            quality = {"split": split, **_quality(llm, model, sequences)} if sequences else None
        finally:
            llm.close()
        seconds["check"] = time.perf_counter() - start
        result = GgufExportResult(folder=output, quantization=quantization, bytes=(tmp / GGUF_FILE).stat().st_size,
                                  tolerance=tolerance, min_top1=check.min_top1, quality=quality,
                                  max_drop=max_drop, seconds={k: round(v, 2) for k, v in seconds.items()},
                                  **parity)
        _judge(result)
        text, templated = modelfile(tokenizer, GGUF_FILE)
        result.modelfile_template = templated
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        shutil.rmtree(tmp / "merged")
        merged_export.write_json(tmp / merged_export.EXPORT_FILE, _facts(result, run_dir, meta))
        merged_export.move_into_place(tmp, output, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (%s, %.1f MB; mean KL %.2e, top-1 agreement %.3f over %d positions)", run_dir,
             output / GGUF_FILE, quantization, result.bytes / 1e6, result.mean_kl, result.top1_agreement,
             result.positions)
    return result


# ------------------------------------------------------------------------------------------ writing
def _write(engine: Any, model: torch.nn.Module, tokenizer: Any, folder: Path, quantization: str, *,
           name: str) -> None:
    """``folder/model.gguf`` in ``quantization``: f16 written directly; the others quantized by llama.cpp
    from a float32 file (deleted after), as llama.cpp's own ``llama-quantize`` is meant to be used."""
    target = folder / GGUF_FILE
    if quantization == "f16":
        write_gguf(model, tokenizer, target, name=name, float_type="f16")
        return
    source = folder / "model-f32.gguf"
    write_gguf(model, tokenizer, source, name=name, float_type="f32")
    params = engine.llama_model_quantize_default_params()
    params.ftype = getattr(engine, _FTYPES[quantization])
    params.nthread = _threads()
    with _native_output_silenced():  # llama.cpp prints a line per tensor on stderr
        failed = engine.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    source.unlink()
    if failed or not target.is_file():
        raise RunError(f"llama.cpp could not quantize the model to {quantization} (code {failed})")


def _threads() -> int:
    """Half the CPUs (at most 8): llama.cpp's OpenMP threads spin while they wait, so on a busy machine using
    every core makes a check many times slower (measured: 11 s instead of 0.3 s for one prompt on 2 cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null while llama.cpp's C code runs (it writes to them directly,
    past Python's sys.stdout/sys.stderr)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _load(engine: Any, path: Path, config: Any) -> Any:
    """The GGUF in llama.cpp, keeping the logits of every position (what the check compares)."""
    n_ctx = min(2048, int(getattr(config, "max_position_embeddings", 2048) or 2048))
    with _native_output_silenced():
        try:
            return engine.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=_threads(),
                                logits_all=True, verbose=False, seed=0)
        except ValueError as exc:  # llama.cpp refused the file: a converter bug, never the user's input
            raise RunError(f"llama.cpp cannot load the written GGUF: {exc}") from None


# ------------------------------------------------------------------------------------------ checks
def _llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, vocab) for ``ids``, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]))
    return out.logits[0].float().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _parity(llm: Any, model: Any, tokenizer: Any, prompts: list[str] | None) -> dict[str, Any]:
    """Tokenization, next-token distributions and greedy continuations of llama.cpp vs the merged model."""
    texts = _prompt_texts(tokenizer, prompts)
    if not texts:
        raise RunError("the GGUF check needs at least one prompt")
    vocab = int(model.config.vocab_size)
    kls, top1, max_diff, abs_sum, count, identical = [], 0, 0.0, 0.0, 0, 0
    for text, special in texts:
        ids = tokenizer(text, add_special_tokens=special)["input_ids"][: merged_export.MAX_PROMPT_TOKENS]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)[: len(ids)]
        if list(theirs) != list(ids):
            raise RunError(f"llama.cpp tokenizes the prompt {text[:40]!r} differently from the run's tokenizer "
                           f"({list(theirs)[:12]} vs {list(ids)[:12]}); nothing was exported",
                           hint="this is a bug in the GGUF tokenizer conversion; the run folder is untouched")
        # llama.cpp reads the prompt and continues it greedily; transformers then reads prompt + continuation in
        # one pass: the same positions compared, and its greedy choice at each step checked (teacher forcing).
        continuation = _greedy(llm, ids)
        seq = ids + continuation
        cpp = np.array(llm.scores[: len(seq)], dtype=np.float32)[:, :vocab]
        ours = _torch_logits(model, seq)[:, :vocab]
        p_log, q_log = _log_softmax(ours), _log_softmax(cpp)
        kls.extend((np.exp(p_log) * (p_log - q_log)).sum(axis=-1).tolist())
        top1 += int((ours.argmax(-1) == cpp.argmax(-1)).sum())
        diff = np.abs(ours - cpp)
        max_diff = max(max_diff, float(diff.max()))
        abs_sum += float(diff.sum())
        count += diff.size
        identical += int(ours[len(ids) - 1 : -1].argmax(-1).tolist() == continuation)
    return {"prompts": len(texts), "positions": len(kls), "mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)),
            "top1_agreement": top1 / len(kls), "max_abs_logit_diff": max_diff, "mean_abs_logit_diff": abs_sum / count,
            "greedy_identical": identical}


def _prompt_texts(tokenizer: Any, prompts: list[str] | None) -> list[tuple[str, bool]]:
    """The merged export's parity prompts as (text, add_special_tokens): plain, then the first ones rendered as
    a user turn through the chat template (which writes its own special tokens)."""
    texts = list(merged_export.DEFAULT_PROMPTS if prompts is None else prompts)
    out = [(text, True) for text in texts]
    if getattr(tokenizer, "chat_template", None):
        for text in texts[: merged_export.CHAT_PROMPTS]:
            out.append((str(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)), False))
    return out


def _greedy(llm: Any, ids: list[int]) -> list[int]:
    """llama.cpp's greedy continuation of ``ids`` (a fresh context); its scores keep every position's logits."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for step in range(CONTINUATION_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if step < CONTINUATION_TOKENS - 1:
            llm.eval([out[-1]])
    llm.eval([out[-1]])  # the last token's own logits too, so every position of ids + out is compared
    return out


def _quality(llm: Any, model: Any, sequences: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """Mean NLL per scored token (labels != -100) and perplexity of both models on held-out sequences."""
    vocab = int(model.config.vocab_size)
    totals = {"merged": 0.0, "gguf": 0.0}
    tokens = used = 0
    for ids, labels in sequences[:EVAL_SEQUENCES]:
        ids, labels = list(ids)[:MAX_EVAL_TOKENS], list(labels)[:MAX_EVAL_TOKENS]
        targets = np.array(labels[1:])
        scored = targets != -100
        if len(ids) < 2 or not scored.any():
            continue
        used += 1
        tokens += int(scored.sum())
        for name, logits in (("merged", _torch_logits(model, ids)), ("gguf", _llama_logits(llm, ids))):
            logp = _log_softmax(logits[:-1, :vocab])
            totals[name] -= float(logp[np.arange(len(targets))[scored], targets[scored]].sum())
    if not tokens:
        return {"sequences": 0, "tokens": 0}
    nll = {k: v / tokens for k, v in totals.items()}
    return {"sequences": used, "tokens": tokens, "nll_merged": nll["merged"], "nll_gguf": nll["gguf"],
            "perplexity_merged": math.exp(nll["merged"]), "perplexity_gguf": math.exp(nll["gguf"]),
            "perplexity_drop": math.exp(nll["gguf"]) - math.exp(nll["merged"])}


def _judge(result: GgufExportResult) -> None:
    """RunError when llama.cpp's model is further from the merged model than the quantization allows."""
    what = (f"mean KL {result.mean_kl:.3e} (at most {result.tolerance:g}), top-1 agreement "
            f"{result.top1_agreement:.3f} (at least {result.min_top1:g}) over {result.positions} positions")
    if not (result.mean_kl <= result.tolerance and result.top1_agreement >= result.min_top1):
        raise RunError(f"llama.cpp running the {result.quantization} GGUF differs from the merged model: {what}; "
                       "nothing was exported",
                       hint="a coarser quantization changes more: try q8_0 or f16, or raise --tolerance "
                       "(the largest mean KL) if this loss is acceptable")
    quality = result.quality or {}
    if result.max_drop is not None and "perplexity_drop" not in quality:
        raise RunError("--max-drop needs held-out tokens to score, and the given sequences have none")
    if result.max_drop is not None and not quality["perplexity_drop"] <= result.max_drop:
        raise RunError(f"the {result.quantization} GGUF's perplexity on the held-out split is "
                       f"{quality['perplexity_gguf']:.3f} vs {quality['perplexity_merged']:.3f} merged, a rise of "
                       f"{quality['perplexity_drop']:.3f} > --max-drop {result.max_drop:g}; nothing was exported",
                       hint="try a finer quantization (q8_0, f16)")


def _facts(result: GgufExportResult, run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    facts = {**asdict(result), "format": "gguf", "file": GGUF_FILE, "run": str(run_dir), "task": meta.get("task"),
             "reference": "merged float32 model (lmtune export --format merged), run by transformers",
             "runtime": f"llama.cpp via llama-cpp-python {getattr(llama_cpp, '__version__', '?')}",
             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "lmtune_version": __version__, "gguf_version": _gguf_version(),
             "transformers_version": transformers.__version__, "torch_version": torch.__version__}
    del facts["folder"]
    return facts


def _gguf_version() -> str:
    try:
        return metadata.version("gguf")
    except metadata.PackageNotFoundError:  # pragma: no cover - gguf imported from a source tree
        return "?"


__all__ = ["CHECKS", "QUANTIZATIONS", "SUPPORTED", "GgufExportResult", "export_gguf_folder"]
