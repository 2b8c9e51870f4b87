"""`lmtune plan`'s estimate against a measured training peak (whole-process RSS), on the bundled models.

Each case runs in its own subprocess: import torch/transformers (RSS then is the baseline the plan calls
"framework overhead"), build the model as `lmtune train` does (methods.build_task_model, real
weights), the loop's fused AdamW, then `--steps` forward/backward/optimizer steps on fixed-shape batches
(batch x length tokens, no padding) under the case's precision. The child reports ``ru_maxrss``; the
parent prints it beside the plan's total for the same config. RSS is noisy (allocator caching, page
reuse): read the ratio, not the last digit.

    .venv/bin/python benchmarks/bench_plan.py            # MiniLM b32 x 128, fp32 and bf16
    .venv/bin/python benchmarks/bench_plan.py --smollm2  # + SmolLM2 causal LM b4 x 256 (converted cache needed)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHILD = r"""
import json, resource, sys
import psutil, torch, transformers  # noqa: F401  (the framework the baseline RSS holds)
from lmtune.console import quiet_libraries
quiet_libraries()
base = psutil.Process().memory_info().rss
from lmtune.config import load_config
from lmtune.models.methods import build_task_model
from lmtune.tasks import get_task
from lmtune.training.loop import build_optimizer, param_groups
cfg = load_config(json.loads(sys.argv[1]))
b, s, steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
task = get_task(cfg.task)(cfg)
path = task.model_path()
tok = task.load_tokenizer(path)
data = task.prepare(tok)
model, head = build_task_model(task, path, data, tok)
model.train()
opt = build_optimizer(param_groups(model, cfg, head), cfg.train)
g = torch.Generator().manual_seed(0)
dtype = {"bf16": torch.bfloat16, "fp32": None}[cfg.train.precision]
for _ in range(steps):
    ids = torch.randint(1000, 20000, (b, s), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cfg.task == "classification":
        batch["labels"] = torch.zeros(b, dtype=torch.long)
    else:
        batch["labels"] = ids.clone()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = task.loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base_rss": base, "peak_rss": peak}))
"""


def _case(name: str, cfg: dict[str, Any], batch: int, length: int, steps: int) -> dict[str, Any]:
    from lmtune.workflows.plan import plan

    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(batch), str(length), str(steps)],
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"{name}: the training child failed:\n{child.stderr[-3000:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    cfg_len = {**cfg, "data": {**cfg["data"], "max_length": length}, "train": {**cfg["train"], "batch_size": batch}}
    est = plan(cfg_len, read_data=False, num_processes=1, suggest=False)
    per = est.memory["per_device"]
    # Same baseline for both: the plan's overhead is its own process's RSS; use the child's instead.
    total = per["total"] - per["overhead"] + measured["base_rss"]
    return {"case": name, "estimate_gib": total / 2**30, "measured_peak_gib": measured["peak_rss"] / 2**30,
            "ratio": total / measured["peak_rss"],
            "parts_mib": {k: round(v / 2**20, 1) for k, v in per.items() if k not in ("total", "overhead") and v},
            "baseline_rss_gib": measured["base_rss"] / 2**30}


def main() -> None:
    """Run the cases and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smollm2", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.csv"
        data.write_text("text,label\n" + "".join(f"sample text {i},{'ab'[i % 2]}\n" for i in range(40)),
                        encoding="utf-8")
        cases = [
            (f"minilm classification full {p}, batch 32 x 128", {
                "task": "classification", "model": "minilm", "data": {"train": str(data), "labels": ["a", "b"]},
                "train": {"precision": p}}, 32, 128) for p in ("fp32", "bf16")
        ]
        if args.smollm2:
            text = Path(tmp) / "t.txt"
            text.write_text("".join(f"Paragraph {i}: one two three four five six seven.\n\n" for i in range(3000)),
                            encoding="utf-8")
            cases += [(f"smollm2 causal_lm {m} bf16, batch 4 x 256", {
                "task": "causal_lm", "model": "smollm2", "data": {"train": str(text)}, "method": {"name": m},
                "train": {"precision": "bf16"}}, 4, 256) for m in ("full", "lora")]
        for name, cfg, b, s in cases:
            print(json.dumps(_case(name, cfg, b, s, args.steps)), flush=True)


if __name__ == "__main__":
    main()
