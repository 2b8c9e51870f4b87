"""``lmtune studio`` in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright): the whole
path on a tiny BERT, as a user clicks it.

Upload a CSV, name a label column it lacks and see inspect's pre-flight error, fix it, plan (the memory
estimate), launch a run and watch its step counter and validation metric move live, launch a second run with
another learning rate, stop it while it trains and resume it to its end, compare the two (the config diff names
train.learning_rate), open a report with its plots, classify texts in Try, open a study (a small real optuna
study's table, as ``lmtune tune`` writes it). The studio is ``python -m lmtune studio`` itself (a subprocess,
API key from ``LMTUNE_API_KEY``), so the command line and the training subprocesses are real. The screenshots of
each step go to ``$LMTUNE_SCREENSHOTS`` (the README's images) or the test's tmp folder. Without Chromium
(``.ci/run`` installs it) the test is skipped, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from serve_helpers import chromium, lmtune_server

from lmtune.workflows.tune_report import write_trials_table

KEY = "sk-studio-test"
# Runs are subprocesses that load torch and train on busy CPUs: generous waits, fast when things go well.
RUN_TIMEOUT_MS = 180_000

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(viewport={"width": 1280, "height": 900}) as context:
        yield context


@pytest.fixture
def studio(tmp_path: Path) -> Iterator[str]:
    """``lmtune studio`` on a free loopback port over an empty workspace; yields its base URL."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    with lmtune_server(["studio", "--workspace", str(workspace)], tmp_path / "studio.log", KEY) as base:
        yield base


def shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LMTUNE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def set_field(page: Any, key: str, value: object) -> None:
    """Fills the Config tab's input for a schema field (``train.learning_rate``)."""
    page.fill(f"#config-form [data-field='{key}']", str(value))


def launch(page: Any, name: str, learning_rate: float, epochs: int) -> None:
    page.click("button[data-tab='config']")
    set_field(page, "train.learning_rate", learning_rate)
    set_field(page, "train.epochs", epochs)
    page.fill("#run-name", name)
    page.click("#launch-btn")
    wait(page, f"#run-view[data-run='{name}']:not([hidden]) #run-status:not([data-status=''])")


def wait(page: Any, selector: str, timeout: float = 30_000) -> None:
    """``page.wait_for_selector`` that, on a timeout, fails with what the page's status line says."""
    try:
        page.wait_for_selector(selector, timeout=timeout)
    except sync_api.TimeoutError:
        raise AssertionError(f"{selector} did not show; the page says: {page.inner_text('#status')!r}") from None


def wait_running(page: Any, total: int) -> None:
    """Waits until the run view shows the run training: past step 0, short of ``total``, a validation point drawn."""
    page.wait_for_function("total => { const s = document.getElementById('run-status').dataset.status;"
                           " const step = Number(document.getElementById('run-step').dataset.step);"
                           " return s === 'running' && step > 0 && step < total"
                           " && Number(document.getElementById('run-chart-metric').dataset.points) > 0; }",
                           arg=total, timeout=RUN_TIMEOUT_MS)


def step_of(page: Any) -> int:
    return int(page.get_attribute("#run-step", "data-step") or 0)


def test_studio_full_path_in_the_browser(browser: Any, studio: str, tiny_bert_dir: Path, sentiment_csv: Path,
                                         tmp_path: Path) -> None:
    shots = shots_dir(tmp_path)
    # a small real optuna study in the workspace, as `lmtune tune` leaves its table, for the Studies tab
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="lr-search")
    study.optimize(lambda t: -(t.suggest_float("learning_rate", 0, 1) - 0.3) ** 2, n_trials=4)
    study_dir = tmp_path / "workspace" / "studies" / "lr-search"
    study_dir.mkdir(parents=True)
    write_trials_table(study, study_dir)
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(studio + "/")
    # the key first: without it the studio shows nothing
    page.wait_for_selector("#status:has-text('API key')")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    wait(page, "body[data-ready='1']")

    # Data: upload the CSV, name a column it lacks -> inspect's pre-flight error; fix it -> the findings
    page.set_input_files("#file-input", str(sentiment_csv))
    page.click("#upload-btn")
    page.wait_for_selector("#data-file option[value='data/sentiment.csv']", state="attached")
    # the page's periodic refresh may list the new file before upload() has selected it: wait for the selection
    page.wait_for_function("document.getElementById('data-file').value === 'data/sentiment.csv'", timeout=10_000)
    page.select_option("#task", "classification")
    page.fill("#model", str(tiny_bert_dir))
    page.fill("#label-column", "sentiment")
    page.click("#inspect-btn")
    wait(page, "#inspect-result[data-state='error']")
    error = page.inner_text("[data-testid='inspect-error']")
    assert "sentiment" in error and "label" in error  # names the missing column and the ones there are
    page.fill("#label-column", "label")
    page.click("#inspect-btn")
    wait(page, "#inspect-result[data-state='ok']", timeout=RUN_TIMEOUT_MS)
    splits = page.inner_text("[data-testid='inspect-splits']")
    assert "train" in splits and "validation" in splits and "neg" in splits
    page.screenshot(path=str(shots / "studio-data.png"), full_page=True)

    # Config: the schema's settings, the YAML and the plan's memory estimate
    page.click("button[data-tab='config']")
    assert page.get_attribute("#config-form [data-field='train.learning_rate']", "type") == "number"
    assert page.inner_text("label.field:has([data-field='train.learning_rate']) .desc")  # the schema's description
    set_field(page, "data.max_length", 32)
    set_field(page, "train.epochs", 4)  # 96 steps: a few seconds, so the page sees the run move
    set_field(page, "train.batch_size", 16)
    set_field(page, "train.eval_every", 4)
    if page.query_selector("#config-form [data-field='train.log_every']"):
        set_field(page, "train.log_every", 2)
    # a value the schema refuses shows next to its field
    set_field(page, "train.learning_rate", -1)
    page.click("#config-btn")
    wait(page, "label.field.invalid [data-field='train.learning_rate']")
    set_field(page, "train.learning_rate", 0.003)
    page.click("#plan-btn")
    wait(page, "#plan-card[data-state='ok']", timeout=RUN_TIMEOUT_MS)
    assert "learning_rate: 0.003" in page.inner_text("#config-yaml")
    assert any(unit in page.inner_text("#plan-memory") for unit in ("MiB", "GiB"))
    assert "fits" in page.inner_text("#plan-fit")
    page.screenshot(path=str(shots / "studio-config.png"), full_page=True)

    # Runs: launch, then watch the step counter and the validation metric move while it runs
    launch(page, "lr-high", 0.003, 4)
    wait_running(page, 96)
    first_step = step_of(page)
    first_points = int(page.get_attribute("#run-chart-metric", "data-points") or 0)
    page.wait_for_function(f"() => Number(document.getElementById('run-step').dataset.step) > {first_step}"
                           f" && Number(document.getElementById('run-chart-metric').dataset.points) > {first_points}",
                           timeout=RUN_TIMEOUT_MS)
    assert page.inner_text("#run-metric") != "–"
    assert page.inner_text("#run-metric-name").startswith("validation ")
    page.screenshot(path=str(shots / "studio-run.png"), full_page=True)

    # a second, longer run with another learning rate beside it: stopped while it trains, then resumed to the end
    launch(page, "lr-low", 0.0005, 12)
    wait_running(page, 288)
    page.click("#run-stop")
    wait(page, "#run-status[data-status='interrupted']", timeout=RUN_TIMEOUT_MS)
    stopped_at = step_of(page)
    assert 0 < stopped_at < 288
    page.click("#run-resume")
    wait(page, "#run-status[data-status='complete']", timeout=RUN_TIMEOUT_MS)
    assert page.inner_text("#run-step") == "288 / 288"
    wait(page, "#runs-table tr[data-run='lr-high'][data-status='complete']", timeout=RUN_TIMEOUT_MS)
    page.click("#runs-table a[data-run='lr-high']")
    wait(page, "#run-view[data-run='lr-high'] #run-status[data-status='complete']")
    assert page.inner_text("#run-step") == "96 / 96"
    wait(page, "#run-metrics:not([hidden])")
    assert "accuracy" in page.inner_text("#run-metrics")

    # the two side by side
    page.click("button[data-tab='compare']")
    page.wait_for_selector("#compare-picks input[value='lr-low']")
    page.check("#compare-picks input[value='lr-high']")
    page.check("#compare-picks input[value='lr-low']")
    page.click("#compare-btn")
    wait(page, "#compare-result:not([hidden])")
    diff = page.inner_text("#compare-diff tr[data-key='train.learning_rate']")
    assert "0.003" in diff and "0.0005" in diff
    assert page.query_selector("#compare-metrics tr[data-key]") is not None
    assert int(page.get_attribute("#compare-curves svg[data-curve='train.loss']", "data-points") or 0) > 2
    assert page.eval_on_selector_all("#compare-curves svg[data-curve='train.loss'] polyline", "ls => ls.length") == 2
    assert "majority" in page.inner_text("#compare-baselines")
    page.screenshot(path=str(shots / "studio-compare.png"), full_page=True)

    # Report: the rendered report.md with its plots, fetched with the key
    page.click("button[data-tab='report']")
    page.select_option("#report-run", "lr-high")
    page.click("#report-btn")
    wait(page, "#report-body img[alt='training_curves.png']")
    width = page.eval_on_selector("#report-body img[alt='training_curves.png']",
                                  "img => img.complete ? img.naturalWidth"
                                  " : new Promise(r => img.onload = () => r(img.naturalWidth))")
    assert width > 100
    assert "Results on the test split" in page.inner_text("#report-body")
    page.screenshot(path=str(shots / "studio-report.png"), full_page=True)

    # Try: classify texts with the finished run
    page.click("button[data-tab='try']")
    page.select_option("#try-run", "lr-high")
    page.fill("#try-input", "great wonderful brilliant film\ndull awful boring plot")
    page.click("#try-send")
    wait(page, "#try-results tr.prediction")
    labels = page.eval_on_selector_all("#try-results span.label", "cells => cells.map(c => c.textContent)")
    assert labels == ["pos", "neg"]  # 96 steps at 3e-3 learn the sentiment words
    assert page.inner_text("#status") == ""  # no error on the way
    page.screenshot(path=str(shots / "studio-try.png"), full_page=True)

    # Studies: the study's trials and files
    page.click("button[data-tab='studies']")
    page.click("#studies-table a[data-study='lr-search']")
    wait(page, "#study-view:not([hidden])")
    assert page.eval_on_selector_all("#study-trials tr", "rows => rows.length") == 5  # a header and 4 trials
    assert "learning_rate" in page.inner_text("#study-trials")
    page.click("#study-files summary:has-text('trials.csv')")
    page.wait_for_selector("#study-files pre:has-text('learning_rate')")
    page.screenshot(path=str(shots / "studio-studies.png"), full_page=True)
    page.close()
    # nothing from the internet: every request went to the studio (or a blob: URL of a fetched plot)
    assert [url for url in requested if not url.startswith((studio + "/", "blob:"))] == []
