"""lmtune studio's backend (lmtune/studio/): the HTTP contract over a real workspace, with runs trained by
real `lmtune train` processes on a tiny BERT (stop, resume, compare, report, try)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

CONFIG_KEYS = {"task", "model", "data", "train"}


def _client(workspace: Path, **options: Any) -> Any:
    from fastapi.testclient import TestClient

    from lmtune.studio.app import StudioOptions, create_studio_app

    app = create_studio_app(StudioOptions(workspace=workspace, **options))
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture
def workspace(tmp_path: Path, sentiment_csv: Path) -> Path:
    (tmp_path / "data").mkdir()
    shutil.copy(sentiment_csv, tmp_path / "data" / "sentiment.csv")
    return tmp_path


def _config(model: Path, **train: Any) -> dict[str, Any]:
    return {"task": "classification", "model": str(model), "baselines": ["majority"],
            "data": {"train": "data/sentiment.csv", "max_length": 32},
            "train": {"batch_size": 16, "learning_rate": 3e-3, "precision": "fp32", **train}}


def test_upload_checks_the_file_with_lmtunes_reader(workspace: Path) -> None:
    client = _client(workspace)
    bad = client.post("/api/files", files={"file": ("notes.exe", b"MZ\x90\x00", "application/octet-stream")})
    assert bad.status_code == 400 and "notes.exe" in bad.json()["error"]["message"]
    broken = client.post("/api/files", files={"file": ("broken.jsonl", b'{"text": "a", "label": 1}\n{"text": \n', "text/plain")})
    assert broken.status_code == 400
    message = broken.json()["error"]["message"]
    assert "broken.jsonl" in message and "line 2" in message, message
    assert not [p for p in (workspace / "data").iterdir() if p.name.startswith((".partial", "broken"))]
    good = b"text,label\ngood film,pos\nbad film,neg\n"
    first = client.post("/api/files", files={"file": ("../../evil name.csv", good, "text/csv")})
    second = client.post("/api/files", files={"file": ("evil name.csv", good, "text/csv")})
    assert first.json() == {"path": "data/evil_name.csv"} and second.json() == {"path": "data/evil_name-1.csv"}
    listed = {f["path"] for f in client.get("/api/workspace").json()["files"]}
    assert {"data/sentiment.csv", "data/evil_name.csv", "data/evil_name-1.csv"} <= listed


def test_inspect_config_errors_and_plan(workspace: Path, tiny_bert_dir: Path) -> None:
    client = _client(workspace)
    config = _config(tiny_bert_dir, epochs=1)
    missing = client.post("/api/inspect", json={"config": {**config, "data": {**config["data"], "text_column": "review"}}})
    body = missing.json()
    assert missing.status_code == 200 and body["ok"] is False and "review" in body["error"]["message"]
    found = client.post("/api/inspect", json={"config": config}).json()
    assert found["ok"] is True and found["report"]["splits"]["train"]["examples"] > 300

    errors = client.post("/api/config", json={"config": {**config, "train": {"learning_rate": -1, "epochs": "x"},
                                                         "nonsense": 1}}).json()
    assert errors["ok"] is False
    fields = {e["field"] for e in errors["errors"]}
    assert {"train.learning_rate", "train.epochs", "nonsense"} <= fields, errors
    valid = client.post("/api/config", json={"config": config}).json()
    assert valid["ok"] is True and "learning_rate: 0.003" in valid["yaml"]
    assert valid["config"]["train"]["learning_rate"] == 3e-3 and "method" in valid["config"]

    planned = client.post("/api/plan", json={"config": config}).json()
    assert planned["ok"] is True, planned
    assert planned["plan"]["parameters"] and planned["plan"]["fit"] and planned["plan"]["tokens"]
    schema = client.get("/api/schema").json()
    assert "classification" in {t["name"] for t in schema["tasks"]} and "lora" in schema["methods"]
    assert schema["fields"]["train.learning_rate"]["description"] and schema["fields"]["method.name"]["enum"]


def test_api_key_host_and_paths(workspace: Path) -> None:
    client = _client(workspace, api_key="s3cret-key")
    assert client.get("/health").status_code == 200
    assert client.get("/api/runs").status_code == 401
    headers = {"Authorization": "Bearer s3cret-key"}
    assert client.get("/api/runs", headers=headers).status_code == 200
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers={**headers, "Host": "evil.example"}).status_code == 400
    # the page and what it loads need no key; its look and key handling are the serve page's files
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', client.get("/").text)
    assert "/static/common/apikey.js" in assets and "/static/common/style.css" in assets and "/static/app.js" in assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    shared = client.get("/static/common/apikey.js").content
    assert shared == (Path(__file__).parents[1] / "lmtune/serve/static/common/apikey.js").read_bytes()
    run = workspace / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text('{"format": "lmtune-run", "status": "complete", "task": "classification"}')
    (workspace / "secret.json").write_text("{}")
    (run / "plots").mkdir()
    (run / "plots" / "out.json").symlink_to(workspace / "secret.json")
    for path in ("../../secret.json", "..%2F..%2Fsecret.json", "plots/out.json", "/etc/passwd"):
        assert client.get(f"/api/runs/r/files/{path}", headers=headers).status_code in (404, 400), path
    (run / "metrics.json").write_text('{"test": {"accuracy": 0.75}}')
    ok = client.get("/api/runs/r/files/metrics.json", headers=headers)
    assert ok.status_code == 200 and ok.json() == {"test": {"accuracy": 0.75}}
    summary = client.get("/api/runs", headers=headers).json()["runs"]
    assert summary[0]["launched_by"] == "cli" and summary[0]["metric"] == {"name": "test.accuracy", "value": 0.75}


def _wait(client: Any, name: str, until: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        progress = client.get(f"/api/runs/{name}/progress").json()
        if until(progress):
            return progress
        if time.monotonic() > deadline:
            raise AssertionError(f"run {name} did not get there: {progress}")
        time.sleep(0.2)


def test_launch_stop_resume_compare_report_try(workspace: Path, tiny_bert_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = _client(workspace)
    config = _config(tiny_bert_dir, max_steps=600, eval_every=50, save_every=50, seed=3)
    launched = client.post("/api/runs", json={"name": "a", "config": config})
    assert launched.status_code == 201, launched.text
    assert launched.json()["run"]["status"] == "running" and launched.json()["run"]["launched_by"] == "studio"
    again = client.post("/api/runs", json={"name": "a", "config": {**config, "train": {"epochs": 1}}})
    assert again.status_code == 409 and "a" in again.json()["error"]["message"]
    assert "max_steps: 600" in (workspace / "configs" / "a.yaml").read_text()
    # The uninterrupted twin, trained at the same time: the resumed run must end where it ends.
    assert client.post("/api/runs", json={"name": "b", "config": config}).status_code == 201

    seen = _wait(client, "a", lambda p: p["step"] >= 60 and p["total_steps"] == 600)
    assert any(r["split"] == "train" and "loss" in r for r in seen["records"])
    assert any(r["split"] == "validation" and "accuracy" in r for r in seen["records"])
    assert seen["eta_seconds"] is not None and seen["tokens_per_second"] > 0
    stopped = client.post("/api/runs/a/stop").json()["run"]
    assert stopped["status"] == "interrupted", stopped
    stopped_at = client.get("/api/runs/a/progress").json()["step"]
    assert stopped_at < 600
    assert client.post("/api/runs/a/stop").status_code == 409

    assert client.post("/api/runs/a/resume").status_code == 200
    assert client.post("/api/runs/a/resume").status_code == 409
    for name in ("a", "b"):
        done = _wait(client, name, lambda p: p["status"] in ("complete", "failed"))
        assert done["status"] == "complete", done["log_tail"]
        assert done["step"] == 600
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["a"]["status"] == runs["b"]["status"] == "complete" and runs["a"]["launched_by"] == "studio"

    compared = client.get("/api/compare?runs=a,b").json()
    assert compared["config_diff"] == []  # the same settings (the run folders are not settings)
    metrics = {m["key"]: m["values"] for m in compared["metrics"]}
    assert metrics["test.accuracy"][0] == pytest.approx(metrics["test.accuracy"][1])
    assert metrics["test.loss"][0] == pytest.approx(metrics["test.loss"][1], rel=1e-4)
    assert len(compared["curves"]["train.loss"]) == 2 and len(compared["curves"]["validation.accuracy"]) == 2
    assert [b["run"] for b in compared["baselines"]] == ["a", "b"]
    assert any("majority" in str(row["name"]) for row in compared["baselines"][0]["rows"])

    report = client.get("/api/runs/a/report").json()
    assert "<table>" in report["html"] and report["plots"]
    png = client.get(f"/api/runs/a/files/{report['plots'][0]}")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    tried = client.post("/api/runs/a/try", json={"texts": ["a wonderful brilliant film", "dull awful boring"]})
    assert tried.status_code == 200, tried.text
    results = tried.json()["results"]
    assert len(results) == 2 and all(r["label"] in ("pos", "neg") for r in results)
    assert client.post("/api/runs/a/try", json={"texts": []}).status_code == 400


def test_studies_and_limits(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from typer.testing import CliRunner

    from lmtune.cli import app
    from lmtune.errors import ConfigError
    from lmtune.workflows.tune_report import write_trials_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="lr")
    study.optimize(lambda t: -(t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=4)
    (workspace / "studies" / "lr").mkdir(parents=True)
    write_trials_table(study, workspace / "studies" / "lr")
    client = _client(workspace, max_upload_bytes=4096)
    listed = client.get("/api/studies").json()["studies"]
    assert listed[0]["name"] == "lr" and listed[0]["trials"] == 4 and listed[0]["path"] == "studies/lr"
    assert listed[0]["best"]["value"] == pytest.approx(study.best_value)
    detail = client.get("/api/studies/lr").json()
    assert len(detail["trials"]) == 4 and "trials.csv" in detail["plots"]
    assert client.get("/api/studies/nope").status_code == 404
    assert client.get("/api/studies/lr/files/trials.json").status_code == 200
    assert client.get("/api/studies/lr/files/..%2F..%2Fdata%2Fsentiment.csv").status_code == 404
    big = client.post("/api/files", files={"file": ("big.csv", b"text,label\n" + b"x,y\n" * 2000, "text/csv")})
    assert big.status_code == 413
    monkeypatch.delenv("LMTUNE_API_KEY", raising=False)
    refused = CliRunner().invoke(app, ["studio", "--host", "0.0.0.0", "--workspace", str(workspace)])
    assert isinstance(refused.exception, ConfigError) and "API key" in str(refused.exception)


# Its fixture (a tiny sft run, ~35 s alone) is shared with test_serve*: in the whole suite this costs ~1 s.
def test_try_chats_with_a_generative_run(workspace: Path, serve_sft_run: Any) -> None:
    shutil.copytree(serve_sft_run.path, workspace / "runs" / "chat", ignore=shutil.ignore_patterns(".run.lock"))
    client = _client(workspace)
    run = client.get("/api/runs/chat").json()["run"]
    assert run["try"] == "chat" and run["status"] == "complete" and run["launched_by"] == "cli"
    answer = client.post("/api/runs/chat/try", json={"messages": [{"role": "user", "content": "hello"}],
                                                     "max_new_tokens": 4})
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["message"]["role"] == "assistant" and isinstance(result["text"], str)
    assert result["completion_tokens"] <= 4
    bad = client.post("/api/runs/chat/try", json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 10**6})
    assert bad.status_code == 400 and "max_new_tokens" in bad.json()["error"]["message"]


# slow: an `lmtune export` process (~15 s on a tiny model) beside its fixture's training.
@pytest.mark.slow
def test_export_runs_in_the_background(workspace: Path, serve_classifier_run: Any) -> None:
    shutil.copytree(serve_classifier_run.path, workspace / "runs" / "cls", ignore=shutil.ignore_patterns(".run.lock"))
    client = _client(workspace)
    assert client.post("/api/runs/cls/export", json={"format": "pickle"}).status_code == 400
    exported = client.post("/api/runs/cls/export", json={"format": "merged"})
    assert exported.status_code == 202 and exported.json()["output"] == "exports/cls-merged"
    deadline = time.monotonic() + 180
    while (job := client.get(f"/api/jobs/{exported.json()['job']}").json())["status"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["status"] == "done", job["log_tail"]
    assert list((workspace / "exports" / "cls-merged").glob("*.safetensors"))


def test_stop_while_starting(workspace: Path, tiny_bert_dir: Path) -> None:
    client = _client(workspace)
    assert client.post("/api/runs", json={"name": "c", "config": _config(tiny_bert_dir, epochs=1)}).status_code == 201
    stopped = client.post("/api/runs/c/stop").json()["run"]  # Ctrl-C while the process still imports
    assert stopped["status"] == "interrupted", stopped
    run_dir = workspace / "runs" / "c"
    if run_dir.exists():  # the studio's own files are never in the run folder
        from lmtune.workflows.run_folder import foreign_entries

        assert foreign_entries(run_dir) == []
    assert (workspace / ".studio" / "runs" / "c.json").is_file()
