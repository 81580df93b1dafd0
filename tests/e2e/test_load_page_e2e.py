"""The load test's one-evaluation read of a page (bench/load_page.py) in a real Chromium, on a
static page laid out as Streamlit 1.67 lays out the Verify page (its test ids and attributes).

No server: the page's states are set by hand, including the ones a rerun passes through (an
earlier run's chart still there, marked stale; the queue notice gone between two reads).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bench.load_page import _PAGE_STATE_JS, _WATCH_RUNS_JS, QUEUE_TEXT, PageState

pytestmark = pytest.mark.e2e

VERIFY_PAGE = """
<div data-testid="stApp" data-test-script-state="running" data-test-connection-state="CONNECTED">
  <section data-testid="stSidebar">
    <div data-testid="stAlertContentError">Pick at least two classes.</div>
  </section>
  <section data-testid="stMain">
    <button>Retrain to verify</button>
    <div data-stale="true"><div data-testid="stPlotlyChart">an earlier run's chart</div></div>
    <div id="notice" data-stale="false"><div data-testid="stAlertContentInfo">
      Queued for verifying: <strong>2 requests ahead of yours</strong> (4 s so far).
    </div></div>
    <div id="result"></div>
  </section>
</div>
"""

FINISHED = """
  const app = document.querySelector('[data-testid="stApp"]');
  document.getElementById('notice').remove();
  document.querySelector('[data-stale="true"]').remove();
  document.getElementById('result').innerHTML = `
    <div data-testid="stPlotlyChart">chart</div>
    <div class="st-key-verify_summary">
      ${'<div data-testid="stMetricLabel">Pearson</div>'.repeat(8)}
    </div>
    <p>Verified in this session: upload 1a2b3c4d (k = 3).</p>`;
  app.setAttribute('data-test-script-state', 'notRunning');
"""


@pytest.fixture
def static_page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(10_000)
    try:
        page = context.new_page()
        page.set_content(VERIFY_PAGE)
        yield page
    finally:
        context.close()


def read(page: Any) -> PageState:
    return PageState.from_js(page.evaluate(_PAGE_STATE_JS, QUEUE_TEXT.pattern))


def test_one_read_gives_the_script_state_the_charts_the_queue_and_the_messages(
    static_page: Any,
) -> None:
    state = read(static_page)
    assert (state.script, state.connection) == ("running", "CONNECTED")
    assert (state.charts, state.stale_charts, state.metrics) == (0, 1, 0)
    assert state.queue == "2 requests ahead of yours" and state.queued_ahead == 2
    # Errors count in the main area only; every message is kept for the report.
    assert state.errors == ()
    assert state.messages[0] == "Pick at least two classes."
    assert "2 requests ahead of yours" in state.messages[1]
    assert state.runs is None

    static_page.evaluate(_WATCH_RUNS_JS)
    static_page.evaluate(f"() => {{ {FINISHED} }}")
    state = read(static_page)
    assert (state.script, state.charts, state.stale_charts, state.metrics) == (
        "notRunning",
        1,
        0,
        8,
    )
    assert state.queue is None
    assert "upload 1a2b3c4d (k = 3)" in state.text


def test_script_runs_are_counted_from_the_watch_on(static_page: Any) -> None:
    static_page.evaluate(_WATCH_RUNS_JS)
    assert read(static_page).runs == 0
    for state in ("notRunning", "running", "notRunning", "running", "notRunning"):
        static_page.evaluate(
            "s => document.querySelector('[data-testid=\"stApp\"]')"
            ".setAttribute('data-test-script-state', s)",
            state,
        )
    assert read(static_page).runs == 2
    # A run that starts and ends within one task of the page is counted too.
    static_page.evaluate(
        "() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
        " app.setAttribute('data-test-script-state', 'running');"
        " app.setAttribute('data-test-script-state', 'notRunning'); }"
    )
    assert read(static_page).runs == 3
    static_page.evaluate(_WATCH_RUNS_JS)  # watched again: counted from zero, observed once
    static_page.evaluate(
        "() => document.querySelector('[data-testid=\"stApp\"]')"
        ".setAttribute('data-test-script-state', 'running')"
    )
    assert read(static_page).runs == 1
