"""The page at ``/`` in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright):
chat with a streaming answer, classify texts, and the run view's metrics and plots.

The classifier is served by ``lmtune serve`` itself (a subprocess, API key from ``LMTUNE_API_KEY``), so
the command line is exercised too. Without Chromium (``.ci/run`` installs it) the test is skipped,
saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from serve_helpers import chromium, lmtune_server, running

from lmtune.serve import ServeOptions
from lmtune.serve.app import create_app
from lmtune.workflows.run import Run

KEY = "sk-browser-test"

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as context:
        yield context


@pytest.fixture(scope="module")
def clf_server(tmp_path_factory: pytest.TempPathFactory, serve_classifier_run: Run) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with lmtune_server(["serve", str(serve_classifier_run.path)], log, KEY) as base:
        yield base


def test_chat_in_the_browser_streams_the_answer(browser: Any, serve_sft_run: Run) -> None:
    sft_run = serve_sft_run
    expected = sft_run.chat([{"role": "user", "content": "Capital of France?"}], max_new_tokens=16,
                            do_sample=False)["text"]
    assert expected.strip()
    with running(create_app(sft_run, ServeOptions(max_tokens_limit=16))) as base:
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_visible("#chat-panel") and not page.is_visible("#classify-panel")
        page.fill("#chat-input", "Capital of France?")
        page.press("#chat-input", "Enter")
        page.wait_for_selector(".msg.assistant.done")
        assert page.inner_text(".msg.user") == "Capital of France?"
        # the page's answer is the model's greedy answer (temperature 0 on the page), streamed in
        assert page.eval_on_selector(".msg.assistant.done", "e => e.textContent") == expected
        page.close()


def test_classify_and_run_view_in_the_browser(browser: Any, clf_server: str) -> None:
    page = browser.new_page()
    page.goto(clf_server + "/")
    page.wait_for_selector("#status:has-text('API key')")  # the page needs the key before it shows anything
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("body[data-ready='1']")
    assert page.is_visible("#classify-panel") and not page.is_visible("#chat-panel")
    page.fill("#classify-input", "great wonderful brilliant film\ndull awful boring plot")
    page.click("#classify-send")
    page.wait_for_selector("#classify-results tr.prediction")
    labels = page.eval_on_selector_all("#classify-results td.label", "cells => cells.map(c => c.textContent)")
    assert [label.split(" ")[0] for label in labels] == ["pos", "neg"]
    # attributions: each word of the explained text coloured by the sign and size of its score
    page.check("#classify-explain")
    page.fill("#classify-input", "great wonderful brilliant film")
    page.click("#classify-send")
    page.wait_for_selector("#classify-results .attributions span.word")
    words = page.eval_on_selector_all(
        "#classify-results .attributions span.word",
        "spans => spans.map(s => [s.textContent, getComputedStyle(s).backgroundColor, s.title])")
    assert [w for w, _, _ in words] == ["great", "wonderful", "brilliant", "film"]
    for word, colour, title in words:
        score = float(title.rsplit(": ", 1)[1])
        red, green = (int(c) for c in colour[colour.index("(") + 1:].split(",")[:2])
        assert (green > red) == (score >= 0), (word, colour, score)  # green for evidence, red against
    # the model learned these words mean "pos": most of the evidence for it sits on them
    scores = {w: float(t.rsplit(": ", 1)[1]) for w, _, t in words}
    assert sum(scores[w] for w in ("great", "wonderful", "brilliant")) > abs(scores["film"])
    assert "attributions towards pos" in page.inner_text("#classify-results .attributions .legend")
    # the run view: metrics table and the report's plots, fetched with the key
    page.click("button[data-tab='run']")
    assert "accuracy" in page.inner_text("#metrics-table")
    page.wait_for_selector("#plots img[alt='training_curves.png']")
    width = page.eval_on_selector("#plots img[alt='training_curves.png']",
                                  "img => img.complete ? img.naturalWidth : new Promise(r => img.onload = () => r(img.naturalWidth))")
    assert width > 100
    assert "task: classification" in page.inner_text("#config")
    page.close()
