#!/usr/bin/env bash
# Training throughput of the demo under glibc malloc, jemalloc and tcmalloc (LD_PRELOAD), rounds interleaved.
# Needs the Debian packages libjemalloc2 and libtcmalloc-minimal4. Prints "allocator round tokens/s" lines
# (metrics.json's summary.train_tokens_per_second of a shortened demo run); BENCHMARKS.md quotes the medians.
#   bash benchmarks/bench_allocator.sh [ROUNDS] [STEPS]
set -euo pipefail
rounds=${1:-3}
steps=${2:-60}
out=$(mktemp -d)
lib=/lib/x86_64-linux-gnu
for round in $(seq "$rounds"); do
  for allocator in glibc jemalloc tcmalloc; do
    case $allocator in
      glibc) preload="" ;;
      jemalloc) preload=$lib/libjemalloc.so.2 ;;
      tcmalloc) preload=$lib/libtcmalloc_minimal.so.4 ;;
    esac
    LD_PRELOAD=$preload .venv/bin/lmtune train lmtune/configs/demo.yaml --train.max_steps "$steps" \
      --train.eval_every 1000 --baselines '[]' --output_dir "$out/$allocator" --overwrite > "$out/$allocator.$round.log" 2>&1
    .venv/bin/python -c "import json, sys; s = json.load(open(sys.argv[1]))['summary']; \
print(sys.argv[2], sys.argv[3], round(s['train_tokens_per_second'], 1))" "$out/$allocator/metrics.json" "$allocator" "$round"
  done
done
rm -rf "$out"
