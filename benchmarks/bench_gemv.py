"""bf16 matmuls of a few rows on the CPU: oneDNN (torch's default for bf16) against ATen's own kernels (oneDNN
switched off) and against oneDNN with the weights packed in its blocked layout (``PackedLinear``), the
choices behind ``lmtune.models.decode_matmuls`` (issue 17, target 3).

The shapes are SmolLM2-135M's (hidden 576, MLP 1536, 3 KV heads of 64, a 49,152-token head). Each shape is
timed over enough distinct weight matrices (about 100 MB in all) that they come from memory, as a decoding
step's do, not from the caches; microseconds per product, best of the passes.

    python benchmarks/bench_gemv.py                 # rows 1 2 3 4 8 16
    python benchmarks/bench_gemv.py --rows 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmtune.models.decode_matmuls import PACK_ROWS

SHAPES = ((1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576))  # (out, in) of nn.Linear


def timed(x: torch.Tensor, weights: list[torch.Tensor], passes: int = 5, *, packed: bool = False) -> float:
    """Best pass's microseconds per product (``packed``: ``weights`` are oneDNN-packed, multiplied as
    ``PackedLinear`` does)."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(passes):
            t = time.perf_counter()
            for w in weights:
                if packed:
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                else:
                    torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
    return best / len(weights) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--megabytes", type=int, default=100, help="Weights cycled through per shape.")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}))
    enabled = torch._C._get_mkldnn_enabled()
    for out_features, in_features in SHAPES:
        count = max(2, args.megabytes * 2**20 // (out_features * in_features * 2))
        weights = [torch.randn(out_features, in_features).bfloat16() for _ in range(count)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) for w in weights]
        for rows in args.rows:
            x = torch.randn(rows, in_features).bfloat16()
            try:
                torch._C._set_mkldnn_enabled(True)
                onednn = timed(x, weights)
                blocked = timed(x, packed, packed=True)
                torch._C._set_mkldnn_enabled(False)
                aten = timed(x, weights)
            finally:
                torch._C._set_mkldnn_enabled(enabled)
            print(json.dumps({"shape": f"{out_features}x{in_features}", "rows": rows, "onednn_us": round(onednn),
                              "aten_us": round(aten), "packed_us": round(blocked),
                              "aten_speedup": round(onednn / aten, 2), "packed_speedup": round(onednn / blocked, 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
