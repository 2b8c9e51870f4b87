"""Plots write real PNGs for every shape of input; the Markdown report renders and writes atomically."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from lmtune.evaluate.plots import (
    ema,
    lower_is_better,
    plot_confusion_matrix,
    plot_metric_comparison,
    plot_training_curves,
)
from lmtune.evaluate.report import Bold, Report, format_number

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def train_rows(steps: int) -> list[dict]:
    return [
        {
            "step": s,
            "epoch": s / 40,
            "split": "train",
            "loss": 0.7 / (1 + s / 20) + 0.05 * ((s * 7) % 3),
            "learning_rate": 5e-5 * min(1.0, s / 10) * (1 - s / (steps + 1)),
            "tokens_per_second": 1234.0,
        }
        for s in range(1, steps + 1)
    ]


def eval_row(step: int, loss: float, f1: float, split: str = "validation") -> dict:
    return {
        "step": step,
        "epoch": step / 40,
        "split": split,
        "loss": loss,
        "accuracy": f1 + 0.01,
        "macro_f1": f1,
    }


CURVE_CASES = [
    (
        "several evals",
        [*train_rows(120), eval_row(40, 0.5, 0.7), eval_row(80, 0.4, 0.8), eval_row(120, 0.45, 0.78)],
        "macro_f1",
    ),
    ("one eval", [*train_rows(30), eval_row(30, 0.5, 0.7)], "macro_f1"),
    ("no eval rows", train_rows(30), "macro_f1"),
    ("no metric given", [*train_rows(30), eval_row(30, 0.5, 0.7)], None),
    ("metric absent", [*train_rows(30), eval_row(30, 0.5, 0.7)], "rouge_l"),
    ("loss as metric", [*train_rows(30), eval_row(10, 0.5, 0.7), eval_row(20, 0.4, 0.7)], "loss"),
    (
        "validation and test",
        [*train_rows(30), eval_row(30, 0.5, 0.7), eval_row(30, 0.55, 0.68, "test")],
        "accuracy",
    ),
    ("one train row", train_rows(1), "macro_f1"),
    ("nan loss", [*train_rows(5), {"step": 6, "split": "train", "loss": float("nan")}], "macro_f1"),
    ("empty log", [], "macro_f1"),
]


@pytest.mark.parametrize(("records", "metric"), [c[1:] for c in CURVE_CASES], ids=[c[0] for c in CURVE_CASES])
def test_training_curves(tmp_path: Path, records, metric) -> None:
    out = plot_training_curves(records, tmp_path / "plots" / "curves.png", metric=metric)
    assert out == tmp_path / "plots" / "curves.png"
    assert_png(out)
    assert plt.get_fignums() == []  # the figure was closed


def test_ema_is_debiased_and_smooths() -> None:
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    smoothed = ema([0.0, 1.0] * 10)
    assert max(smoothed[5:]) - min(smoothed[5:]) < 0.3


@pytest.mark.parametrize(
    ("metric", "lower"),
    [("loss", True), ("eval_perplexity", True), ("hamming_loss", True), ("macro_f1", False)],
)
def test_lower_is_better(metric: str, lower: bool) -> None:
    assert lower_is_better(metric) is lower


def square(n: int) -> list[list[int]]:
    return [[(10 * n if i == j else (i * 3 + j) % 4) for j in range(n)] for i in range(n)]


CONFUSION_CASES = [
    ("2 labels", ["negative", "positive"], True),
    ("2 labels raw colours", ["negative", "positive"], False),
    ("25 labels", [f"class_{i:02d}_name" for i in range(25)], True),
    ("CJK labels", ["正面", "负面", "中性", "其他类别"], True),
    ("CJK many", [f"类别{i}" for i in range(12)], True),
]


@pytest.mark.parametrize(
    ("names", "normalize"), [c[1:] for c in CONFUSION_CASES], ids=[c[0] for c in CONFUSION_CASES]
)
def test_confusion_matrix(tmp_path: Path, names: list[str], normalize: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing CJK glyph must not even warn
        out = plot_confusion_matrix(
            square(len(names)), names, tmp_path / "cm.png", normalize=normalize, title="test"
        )
    assert_png(out)
    assert plt.get_fignums() == []


def test_confusion_matrix_with_an_empty_row(tmp_path: Path) -> None:
    assert_png(plot_confusion_matrix([[3, 1, 0], [0, 0, 0], [1, 0, 4]], ["a", "b", "c"], tmp_path / "cm.png"))


def test_confusion_matrix_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matrix shape"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "cm.png")
    assert plt.get_fignums() == []


COMPARISON_CASES = [
    ("models", [("fine-tuned MiniLM", 0.8612), ("tfidf_logreg", 0.8189), ("majority", 0.5777)], "accuracy"),
    ("lower is better", [("model", 0.31), ("baseline", 0.52)], "loss"),
    ("missing value", [("model", 0.9), ("broken", float("nan")), ("none", None)], "macro_f1"),
    ("CJK names", [("模型", 0.9), ("基线", 0.7)], "accuracy"),
    ("nothing", [], "accuracy"),
]


@pytest.mark.parametrize(
    ("rows", "metric"), [c[1:] for c in COMPARISON_CASES], ids=[c[0] for c in COMPARISON_CASES]
)
def test_metric_comparison(tmp_path: Path, rows, metric: str) -> None:
    assert_png(plot_metric_comparison(rows, tmp_path / "compare.png", metric=metric))
    assert plt.get_fignums() == []


NUMBER_CASES = [
    (None, "–"),
    (1234567, "1,234,567"),
    (0, "0"),
    (0.5, "0.5000"),
    (0.123456, "0.1235"),
    (1234.5, "1,234.5000"),
    (4e-5, "4.00e-05"),
    (-2e-7, "-2.00e-07"),
    (0.0, "0.0000"),
    (float("nan"), "nan"),
    (True, "true"),
    ("text", "text"),
]


@pytest.mark.parametrize(("value", "text"), NUMBER_CASES)
def test_format_number(value, text: str) -> None:
    assert format_number(value) == text


def test_format_number_accepts_numpy_scalars() -> None:
    np = pytest.importorskip("numpy")
    assert format_number(np.int64(12345)) == "12,345"
    assert format_number(np.float32(0.25)) == "0.2500"


def build_report() -> Report:
    return (
        Report("Run report")
        .heading("Results")
        .paragraph("The fine-tuned model beats every baseline.")
        .bullets(["first", "second\nline"])
        .table(
            ["model", "accuracy", "examples"],
            [["fine|tuned", Bold(0.86123), 1281], ["tfidf_logreg", 0.8189, 1281], ["majority", None, 1281]],
        )
        .image("plots/confusion matrix.png", "confusion [test]")
        .code("lmtune train demo.yaml", lang="bash")
    )


def test_report_renders_markdown() -> None:
    text = build_report().render()
    assert text.startswith("# Run report\n\n## Results\n\n")
    assert "| model | accuracy | examples |\n| :--- | ---: | ---: |" in text
    assert "| fine\\|tuned | **0.8612** | 1,281 |" in text
    assert "| majority | – | 1,281 |" in text
    assert "![confusion \\[test\\]](<plots/confusion matrix.png>)" in text
    assert "- second\n  line" in text
    assert "```bash\nlmtune train demo.yaml\n```" in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_table_explicit_alignment_and_errors() -> None:
    text = Report("t").table(["a", "b"], [[1, "x"]], align=["center", "r"]).render()
    assert "| :---: | ---: |" in text
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        Report("t").table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="align"):
        Report("t").table(["a"], [[1]], align=["middle"])


def test_code_fence_grows_around_fences() -> None:
    text = Report("t").code("```python\nx = 1\n```").render()
    assert "````\n```python\nx = 1\n```\n````" in text


def test_write_is_atomic_and_leaves_no_tmp_files(tmp_path: Path) -> None:
    target = tmp_path / "run" / "report.md"
    report = build_report()
    assert report.write(target) == target
    assert target.read_text(encoding="utf-8") == report.render()
    report.paragraph("second version").write(target)
    assert "second version" in target.read_text(encoding="utf-8")
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_failed_write_removes_its_tmp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("lmtune.evaluate.report.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        build_report().write(tmp_path / "report.md")
    assert list(tmp_path.iterdir()) == []
