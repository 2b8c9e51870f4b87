"""GGUF export of a bundled decoder: export time, file size and llama.cpp parity per quantization, and
generation speed of llama.cpp (llama-cpp-python) vs transformers on the CPU.

    .venv/bin/python benchmarks/bench_gguf.py --model smollm2 [--quantizations f16 q8_0 q4_k_m] [--threads 2]

The bundled model is exported as a fully fine-tuned sft run would be (its folder as model/); each quantization
is written, checked in llama.cpp and timed. Generation: greedy, NEW_TOKENS new tokens after a short prompt,
best of REPEATS, the same thread count for both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

NEW_TOKENS = 64
REPEATS = 3
PROMPT = "The capital of France is"


def main() -> None:
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.models.export_gguf import export_gguf_folder
    from lmtune.models.registry import resolve_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quantizations", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    run = work / "run"
    shutil.copytree(source, run / "model")
    meta = {"task": "sft", "method": "full", "saved_as": "full", "name": args.model}
    (run / "model" / "lmtune.json").write_text(json.dumps(meta), encoding="utf-8")

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        best = min(best, time.perf_counter() - start)
    rows = [{"runtime": "transformers float32", "tokens_per_s": round(NEW_TOKENS / best, 1)}]
    del model

    for quantization in args.quantizations:
        start = time.perf_counter()
        result = export_gguf_folder(run, run / "model", meta, work / quantization, quantization=quantization)
        seconds = time.perf_counter() - start
        llm = llama_cpp.Llama(model_path=str(work / quantization / "model.gguf"), n_ctx=256,
                              n_threads=args.threads, verbose=False)
        prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
        best = float("inf")
        for _ in range(REPEATS):
            llm.reset()
            start = time.perf_counter()
            for generated, _token in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
                if generated == NEW_TOKENS:
                    break
            best = min(best, time.perf_counter() - start)
        llm.close()
        rows.append({"runtime": f"llama.cpp {quantization}", "tokens_per_s": round(NEW_TOKENS / best, 1),
                     "export_s": round(seconds, 1), "mb": round(result.bytes / 1e6, 1),
                     "mean_kl": f"{result.mean_kl:.2e}", "max_kl": f"{result.max_kl:.2e}",
                     "top1": round(result.top1_agreement, 4),
                     "max_abs_logit_diff": round(result.max_abs_logit_diff, 3),
                     "mean_abs_logit_diff": round(result.mean_abs_logit_diff, 4),
                     "greedy_identical": f"{result.greedy_identical}/{result.prompts}",
                     "positions": result.positions, "phases_s": result.seconds})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
