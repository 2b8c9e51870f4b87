"""Generation speed: lmtune's decoding (``Run.generate``: predict, chat and evaluation) against plain
``transformers`` ``generate`` on the same model and prompts, at batch 1 and batch 16 (issue 17, target 3).

The model is SmolLM2-135M-Instruct tuned for two steps on the bundled chatterbot conversations (the run
``bench_serve.py --model smollm2`` trains; kept in ``--workdir``). The prompts are the first ``--prompts``
chatterbot questions in the chat template; decoding is greedy, at most ``--max-new-tokens`` new tokens,
ending at the model's end-of-turn token. Variants, each timed ``--repeats`` times in rotation (so a load
change on a shared machine hits every variant alike), medians reported:

    transformers           AutoModelForCausalLM as loaded by default (float32), model.generate, dynamic cache
    transformers static    the same with cache_implementation="static" (a preallocated KV cache)
    lmtune fp32            Run.load(run).generate: lmtune's own path (the default precision), same weights
    lmtune auto            Run.load(run, precision="auto").generate: bf16 where this CPU runs it faster,
                           one-row decoding steps on ATen's gemv where it measures faster than oneDNN, the
                           others on weights packed for oneDNN where that measures faster, finished rows
                           dropped from a batch
    lmtune auto, oneDNN only   (when the route is on) the same, every matmul on oneDNN (the route removed)
    lmtune auto, unpacked      (when packing is on) the same, torch's plain oneDNN path for 3+ rows
    lmtune auto, generate's loop   the same, each batch through model.generate (finished rows kept)
    (--compile) transformers static + torch.compile in the auto precision, prompts left-padded to one width
                (one graph per batch size; the compile time is reported apart)

Tokens/s counts the tokens each answer really has (up to its end-of-turn token) over the wall time of the
whole set. Quality of the lower precision: how many greedy answers are identical to float32's, and the
mean number of leading tokens they share.

    python benchmarks/bench_generate.py --output gen.json
    python benchmarks/bench_generate.py --compile --output gen.json     # also the compiled static cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import prompts, train_run  # the same two-step SmolLM2 sft run and chatterbot questions


def cpu_flags() -> str:
    """The CPU flags that decide bf16 speed (avx2, avx512f, avx512_bf16, amx)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in flags.split() if f in wanted)


class PlainTransformers:
    """What a user writes with transformers alone: the tokenizer's chat template, left padding, generate."""

    def __init__(self, model_dir: Path, *, static: bool, dtype: torch.dtype | None = None,
                 compile_step: bool = False, width: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        kwargs = {"dtype": dtype} if dtype is not None else {}
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.kwargs: dict[str, Any] = {}
        if static:
            self.kwargs["cache_implementation"] = "static"
        if compile_step:
            config = CompileConfig(fullgraph=False, dynamic=False)
            config._compile_all_devices = True  # transformers compiles on GPUs only unless told
            self.kwargs["compile_config"] = config
        self.width = width  # pad every prompt to this many tokens (one compiled shape)

    def generate(self, questions: list[str], batch_size: int, max_new_tokens: int) -> list[tuple[str, int]]:
        """(answer text, tokens generated) per question."""
        rendered = [self.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True) for q in questions]
        answers: list[tuple[str, int]] = []
        with torch.inference_mode():
            for begin in range(0, len(rendered), batch_size):
                pad = {"padding": "max_length", "max_length": self.width} if self.width else {"padding": True}
                enc = self.tokenizer(rendered[begin:begin + batch_size], return_tensors="pt", **pad)
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=self.eos, pad_token_id=self.eos, **self.kwargs)
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    row = row[: row.index(self.eos) + 1] if self.eos in row else row
                    answers.append((self.tokenizer.decode(row, skip_special_tokens=True).strip(), len(row)))
        return answers


class LmtuneRun:
    """lmtune's path: ``Run.generate`` (what ``lmtune predict``, chat and evaluation decode with)."""

    def __init__(self, run_dir: Path, precision: str, *, onednn_only: bool = False, unpacked: bool = False,
                 generate_loop: bool = False) -> None:
        from lmtune.models import decode_matmuls
        from lmtune.workflows.run import Run

        self.run = Run.load(run_dir, precision=precision)
        generator = self.run.generator()
        self.dtype = str(generator.dtype).removeprefix("torch.")
        self.routed = generator.small_forward_route is not None
        self.packed = generator.packed_bytes > 0
        self.generate_loop = generate_loop
        if onednn_only and generator.small_forward_route is not None:  # diagnostic: every matmul on oneDNN
            generator.small_forward_route.remove()
            generator.small_forward_route = None
        if unpacked:  # diagnostic: torch's plain oneDNN path (strided weights) for 3+ rows
            for name, module in list(generator.model.named_modules()):
                if isinstance(module, decode_matmuls.PackedLinear):
                    plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                            device="meta")
                    plain.weight, plain.bias = module.weight, module.bias
                    generator.model.set_submodule(name, plain)

    def generate(self, questions: list[str], batch_size: int, max_new_tokens: int) -> list[tuple[str, int]]:
        """(answer text, tokens generated) per question."""
        from lmtune.models import row_dropping

        decode = row_dropping.decode
        if self.generate_loop:  # diagnostic: every batch through model.generate (finished rows kept)
            row_dropping.decode = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            results = self.run.generate(questions, batch_size=batch_size, max_new_tokens=max_new_tokens)
        finally:
            row_dropping.decode = decode  # type: ignore[assignment]
        return [(r["text"].strip(), r["completion_tokens"]) for r in results]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lmtune-bench-generate")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="Also time a compiled static cache (compiling costs minutes).")
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = train_run(args.workdir, "smollm2")
    model_dir = run_dir / "model"
    questions = prompts()[: args.prompts]

    lmtune_auto = LmtuneRun(run_dir, "auto")
    auto_dtype = getattr(torch, lmtune_auto.dtype)
    auto_name = f"lmtune auto ({lmtune_auto.dtype})"
    onednn_name = f"{auto_name}, oneDNN only"
    variants: dict[str, Any] = {
        "transformers": PlainTransformers(model_dir, static=False),
        "transformers static": PlainTransformers(model_dir, static=True),
        "lmtune fp32": LmtuneRun(run_dir, "fp32"),
        auto_name: lmtune_auto,
    }
    if lmtune_auto.routed:  # what the one-row gemv route buys: the same weights, every matmul on oneDNN
        variants[onednn_name] = LmtuneRun(run_dir, "auto", onednn_only=True)
    if lmtune_auto.packed:  # what packing the weights for oneDNN buys
        variants[f"{auto_name}, unpacked"] = LmtuneRun(run_dir, "auto", unpacked=True)
    # what dropping finished rows buys (batch 1 has none to drop)
    variants[f"{auto_name}, generate's loop"] = LmtuneRun(run_dir, "auto", generate_loop=True)
    compile_seconds: dict[int, float] = {}
    if args.compile:
        tok = variants["transformers"].tokenizer
        width = max(len(tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True))["input_ids"]) for q in questions)
        compiled = PlainTransformers(model_dir, static=True, dtype=auto_dtype, compile_step=True, width=width)
        padded = PlainTransformers(model_dir, static=True, dtype=auto_dtype, width=width)
        for bs in args.batch_sizes:  # the first call of each batch size compiles its graph
            t = time.perf_counter()
            compiled.generate(questions[:bs], bs, args.max_new_tokens)
            compile_seconds[bs] = time.perf_counter() - t
        variants[f"transformers static {lmtune_auto.dtype}, padded"] = padded
        variants[f"transformers static {lmtune_auto.dtype}, padded + compile"] = compiled

    results: dict[str, Any] = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "prompts": len(questions),
                               "max_new_tokens": args.max_new_tokens, "compile_seconds": compile_seconds, "rows": []}
    answers: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for bs in args.batch_sizes:
        for v in variants.values():  # warm-up: first calls pick kernels and allocate
            v.generate(questions[:bs], bs, 4)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                t = time.perf_counter()
                answers[(name, bs)] = variants[name].generate(questions, bs, args.max_new_tokens)
                times[name].append(time.perf_counter() - t)
        base = None
        for name in variants:
            tokens = sum(n for _, n in answers[(name, bs)])
            seconds = statistics.median(times[name])
            rate = tokens / seconds
            base = base or rate
            row = {"batch_size": bs, "variant": name, "tokens": tokens, "seconds": round(seconds, 2),
                   "tokens_per_s": round(rate, 1), "vs_transformers": round(rate / base, 2)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    # Quality: lmtune auto's greedy answers against float32's, per batch size (batch 1 is where the one-row
    # route runs; at batch 16 every matmul is oneDNN's), and against the same bf16 weights on oneDNN alone.
    results["agreement"] = {}
    for bs in args.batch_sizes:
        ref = [text for text, _ in answers[("lmtune fp32", bs)]]
        low = [text for text, _ in answers[(auto_name, bs)]]
        plain = [text for text, _ in answers[("transformers", bs)]]
        shared = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                  for a, b in zip(ref, low, strict=True)]
        agreement = {"lmtune_fp32_equals_transformers": sum(a == b for a, b in zip(ref, plain, strict=True)),
                     "auto_equals_fp32": sum(a == b for a, b in zip(ref, low, strict=True)), "answers": len(ref),
                     "mean_shared_prefix_chars": round(statistics.mean(shared), 1),
                     "mean_fp32_chars": round(statistics.mean(len(a) for a in ref), 1)}
        if (onednn_name, bs) in answers:
            onednn = [text for text, _ in answers[(onednn_name, bs)]]
            agreement["onednn_only_equals_fp32"] = sum(a == b for a, b in zip(ref, onednn, strict=True))
            agreement["auto_equals_onednn_only"] = sum(a == b for a, b in zip(low, onednn, strict=True))
        results["agreement"][f"batch {bs}"] = agreement
        print(json.dumps({"batch_size": bs, **agreement}))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
