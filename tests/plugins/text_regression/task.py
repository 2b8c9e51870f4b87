"""The text regression task: read (text, score) rows, tokenise, an encoder with a one-unit head, MSE."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from transformers import AutoConfig, AutoModelForSequenceClassification

from lmtune.config import Config
from lmtune.config.tasks import TaskInfo
from lmtune.data.features import FeatureDataset, PaddingCollator
from lmtune.data.readers import read_table
from lmtune.errors import DataError
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.tasks.base import Task, TaskData

from .info import INFO

EVAL_SPLITS = ("validation", "test")


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, Pearson and Spearman correlations (NaN where a side is constant), and the MSE as loss."""
    err = pred - gold
    out = {"loss": float(np.mean(err**2)), "rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
           "num_examples": len(gold)}
    constant = len(gold) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0
    out["pearson"] = math.nan if constant else float(stats.pearsonr(pred, gold).statistic)
    out["spearman"] = math.nan if constant else float(stats.spearmanr(pred, gold).statistic)
    return out


class TextRegressionTask(Task):
    """One number per text: the encoder's sequence-classification head with a single output, MSE loss."""

    info: ClassVar[TaskInfo] = INFO
    model_class: ClassVar[type] = AutoModelForSequenceClassification
    peft_task_type: ClassVar[str | None] = "SEQ_CLS"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.new_modules: set[str] = set()

    # ---------------------------------------------------------------------------------- model and data
    def model_path(self) -> Path | None:
        """The configured pretrained encoder."""
        return model_path_of(self.config.model)

    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The encoder's tokenizer, right-padded."""
        assert model_path is not None
        return load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)

    def _read(self, source: str) -> list[tuple[str, float, int]]:
        """(text, score, line) per row; a missing or non-numeric score is an error naming the line."""
        d = self.config.data
        table = read_table(source, format=d.format, encoding=d.encoding)
        rows = []
        for text, score, line in zip(table.column(d.text_column), table.column(d.label_column), table.lines,
                                     strict=True):
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise DataError(f"the score {score!r} is not a number", file=source, line=line,
                                field=d.label_column) from None
            if not isinstance(text, str) or not text.strip() or not math.isfinite(value):
                raise DataError("empty text or a non-finite score", file=source, line=line, field=d.text_column)
            rows.append((text, value, line))
        if not rows:
            raise DataError("no rows", file=source)
        return rows

    def _splits(self) -> dict[str, list[tuple[str, float, int]]]:
        """The given splits, or seeded random hold-outs of the training file (validation_size, test_size)."""
        d = self.config.data
        train = self._read(d.train)
        given = {s: self._read(src) for s, src in (("validation", d.validation), ("test", d.test)) if src}
        order = list(range(len(train)))
        random.Random(d.split_seed).shuffle(order)
        splits: dict[str, list[tuple[str, float, int]]] = {}
        start = 0
        for split, size in (("validation", d.validation_size), ("test", d.test_size)):
            if split in given:
                splits[split] = given[split]
                continue
            n = max(1, round(size * len(train)))
            splits[split] = [train[i] for i in order[start:start + n]]
            start += n
        splits["train"] = [train[i] for i in order[start:]]
        if not splits["train"]:
            raise DataError("no rows left to train on after the hold-outs", file=d.train)
        return splits

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, split and tokenise (truncated to ``data.max_length``)."""
        d = self.config.data
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        info: dict[str, Any] = {}
        texts: dict[str, list[str]] = {}
        for split, rows in self._splits().items():
            enc = tokenizer([t for t, _, _ in rows], truncation=True, max_length=d.max_length)
            cols: dict[str, list[Any]] = {"input_ids": enc["input_ids"], "labels": [s for _, s, _ in rows]}
            if "token_type_ids" in enc:
                cols["token_type_ids"] = enc["token_type_ids"]
            lengths[split] = [len(x) for x in enc["input_ids"]]
            features[split] = FeatureDataset(datasets.Dataset.from_dict(cols), lengths[split])
            texts[split] = [t for t, _, _ in rows]
            info[split] = {"examples": len(rows), "tokens": sum(lengths[split]),
                           "score_mean": float(np.mean([s for _, s, _ in rows]))}
        source_lines = {"train": [(d.train, line) for _, _, line in self._splits()["train"]]}
        return TaskData(splits=features, lengths=lengths, info=info,
                        extra={"texts": texts, "source_lines": source_lines})

    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The encoder with a fresh one-unit head (``problem_type: regression``), float32."""
        assert model_path is not None
        cfg = AutoConfig.from_pretrained(model_path, num_labels=1, problem_type="regression",
                                         pad_token_id=tokenizer.pad_token_id)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            model_path, config=cfg, dtype=torch.float32, output_loading_info=True)
        self.new_modules = {key.split(".")[-2] for key in loading["missing_keys"] if "." in key}
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """The modules the checkpoint did not hold: the head."""
        return self.new_modules

    # ---------------------------------------------------------------------------------- the loop
    def collator(self, tokenizer: Any) -> PaddingCollator:
        """Dynamic padding; scores as floats."""
        return PaddingCollator({"input_ids": tokenizer.pad_token_id, "token_type_ids": 0}, float_fields=["labels"])

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """One item per text."""
        return int(batch["labels"].shape[0])

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The predicted scores, (B, 1)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return model(**inputs).logits.float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed squared error."""
        return F.mse_loss(self.logits(model, batch).squeeze(-1), batch["labels"].float(), reduction="sum")

    def evaluate(self, model: torch.nn.Module, loader: Any, accelerator: Any, split: str, data: TaskData
                 ) -> dict[str, Any]:
        """RMSE, MAE, Pearson, Spearman and the MSE (``loss``) over the split."""
        preds, golds = [], []
        with torch.no_grad():
            for batch in loader:
                pred, gold = accelerator.gather_for_metrics((self.logits(model, batch).squeeze(-1), batch["labels"]))
                preds.append(pred.float().cpu())
                golds.append(gold.float().cpu())
        return regression_metrics(torch.cat(preds).numpy(), torch.cat(golds).numpy())

    # ---------------------------------------------------------------------------------- saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """The columns and length the predictor reads."""
        d = self.config.data
        return {"text_column": d.text_column, "label_column": d.label_column, "max_length": d.max_length}

    def report_sections(self, report: Any, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """One table: the regression scores per split."""
        rows = [[split, *(metrics[split].get(k) for k in ("rmse", "mae", "pearson", "spearman"))]
                for split in EVAL_SPLITS if metrics.get(split)]
        if rows:
            report.heading("Regression scores", 3)
            report.table(["split", "RMSE", "MAE", "Pearson r", "Spearman ρ"], rows)
