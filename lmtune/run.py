"""A finished run (or a bare lmtune model folder): its metrics, evaluation and prediction."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.errors import DataError, RunError

log = logging.getLogger("lmtune")


class Run:
    """A run folder: ``config.yaml``, ``metrics.json``, ``report.md`` and ``model/``."""

    def __init__(self, path: Path, model_dir: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.model_dir = model_dir
        self.meta = meta
        self._predictor: Any = None

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Open a run folder, or a model folder written by lmtune (holding ``lmtune.json``)."""
        path = Path(path)
        if not path.exists():
            raise RunError("run folder not found", file=path)
        for model_dir in (path / "model", path):
            meta_file = model_dir / "lmtune.json"
            if meta_file.is_file():
                return cls(path, model_dir, json.loads(meta_file.read_text(encoding="utf-8")))
        status = None
        if (path / "run.json").is_file():
            status = json.loads((path / "run.json").read_text(encoding="utf-8")).get("status")
        if status is not None:
            raise RunError(f"this run has no model yet (status: {status})", file=path,
                           hint="finish it with `lmtune train CONFIG --resume`")
        raise RunError("not an lmtune run or model folder (no model/lmtune.json)", file=path)

    # ------------------------------------------------------------------------------------ results
    @property
    def metrics(self) -> dict[str, Any]:
        """Final metrics per split (``metrics.json``); empty for a bare model folder."""
        f = self.path / "metrics.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    @property
    def task(self) -> str:
        """The task the model was trained for."""
        return str(self.meta["task"])

    def predictor(self) -> Any:
        """The task's predictor, loaded once."""
        if self._predictor is None:
            if self.task != "classification":
                raise RunError(f"prediction for task '{self.task}' is not available in this version")
            from lmtune.tasks.classification import ClassificationPredictor

            self._predictor = ClassificationPredictor(self.model_dir, self.meta)
        return self._predictor

    # ------------------------------------------------------------------------------------ predict
    def predict(
        self, texts: str | list[str], pairs: list[str] | None = None, *, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Predict labels and probabilities for texts (and optional second texts)."""
        single = isinstance(texts, str)
        items = [texts] if isinstance(texts, str) else list(texts)
        p = self.predictor()
        out = p.decode(p.probabilities(items, pairs, batch_size=batch_size))
        return out[:1] if single else out

    def _read_inputs(self, source: str | Path, text_column: str | None,
                     pair_column: str | None) -> tuple[Any, list[str], list[str] | None]:
        from lmtune.data.readers import read_table

        table = read_table(source)
        text_column = text_column or self.meta.get("text_column") or "text"
        pair_column = pair_column or self.meta.get("text_pair_column")
        texts = table.column(text_column)
        pairs = table.column(pair_column) if pair_column else None
        for values, col in ((texts, text_column), (pairs, pair_column)):
            if values is None:
                continue
            for v, line in zip(values, table.lines, strict=True):
                if v is None or (isinstance(v, float) and np.isnan(v)):
                    raise DataError("empty text", file=table.source, line=line, field=col)
        return table, [str(t) for t in texts], [str(t) for t in pairs] if pairs else None

    def predict_file(
        self, source: str | Path, output: str | Path, *, text_column: str | None = None,
        pair_column: str | None = None, batch_size: int = 64, show_progress: bool = True,
    ) -> int:
        """Predict every row of ``source``; write CSV or JSONL (by ``output``'s extension). Returns rows written."""
        from lmtune.workflow import make_progress, quiet_libraries

        quiet_libraries()
        table, texts, pairs = self._read_inputs(source, text_column, pair_column)
        p = self.predictor()
        with make_progress(show_progress) as progress:
            probs = p.probabilities(texts, pairs, batch_size=batch_size, progress=progress)
        results = p.decode(probs)
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        if out.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            with tmp.open("w", encoding="utf-8") as f:
                for row, res in zip(table.rows, results, strict=True):
                    f.write(json.dumps({**row, **res}, ensure_ascii=False, default=str) + "\n")
        elif out.suffix.lower() in (".csv", ".tsv"):
            delim = "\t" if out.suffix.lower() == ".tsv" else ","
            pred_cols = ["labels"] if p.multi_label else ["label", "score"]
            prob_cols = [f"prob_{name}" for name in p.labels]
            with tmp.open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, delimiter=delim)
                writer.writerow(table.columns + pred_cols + prob_cols)
                for row, res in zip(table.rows, results, strict=True):
                    pred = ["|".join(res["labels"])] if p.multi_label else [res["label"], f"{res['score']:.6f}"]
                    writer.writerow([row.get(c) for c in table.columns] + pred
                                    + [f"{res['probabilities'][n]:.6f}" for n in p.labels])
        else:
            raise DataError("output must end in .csv, .tsv or .jsonl", file=out)
        tmp.replace(out)
        return len(results)

    # ------------------------------------------------------------------------------------ evaluate
    def evaluate(self, data: str | Path | None = None, *, batch_size: int = 64) -> dict[str, Any]:
        """Metrics of the saved model on a labelled file, or (no file) on the run's own test split."""
        from lmtune.workflow import quiet_libraries

        quiet_libraries()
        p = self.predictor()
        if data is not None:
            table, texts, pairs = self._read_inputs(data, None, None)
            labels = table.column(self.meta.get("label_column") or "label")
            y = p.targets(labels, table.source, table.lines)
            return {"data": str(data), **p.metrics(y, p.probabilities(texts, pairs, batch_size=batch_size))}
        config_file = self.path / "config.yaml"
        if not config_file.is_file():
            raise RunError("a bare model folder has no test split; pass --data FILE", file=self.path)
        from lmtune.config import load_config
        from lmtune.tasks import get_task

        cfg = load_config(config_file)
        task = get_task(cfg.task)(cfg)
        prepared = task.prepare(p.tokenizer)
        out = {}
        for split in ("validation", "test"):
            if split in prepared.extra["inputs"] and prepared.extra["inputs"][split][0]:
                texts, pairs = prepared.extra["inputs"][split]
                out[split] = p.metrics(prepared.extra["targets"][split],
                                       p.probabilities(texts, pairs, batch_size=batch_size))
        return out
