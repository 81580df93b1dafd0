"""The load test's judgement of a verification (bench/load_page.py), without a browser.

The page is replaced by a script of states, as one evaluation of the real page would return them;
tests/e2e/test_load_page_e2e.py reads such states from a real Chromium.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from bench.load_page import (
    KEPT_TEXT,
    NOT_VERIFIED_TEXT,
    PageState,
    Verdict,
    VerificationFailed,
    VerifyProgress,
    VerifyTimes,
    click_and_await_verification,
    judge_verification,
    verified_here,
)

K = 3
MODELS = 2
LISTED_HERE = "Verified in this session: upload 1a2b3c4d (k = 3). Results are kept on this server"
LISTED_KEPT = (
    "Verified in this session: upload 1a2b3c4d (k = 3, read back from an earlier run). "
    "Results are kept on this server"
)


def page_state(**values: Any) -> dict[str, Any]:
    """What the page's evaluation returns: an idle page with nothing on it, except ``values``."""
    state: dict[str, Any] = {
        "script": "notRunning",
        "connection": "CONNECTED",
        "charts": 0,
        "staleCharts": 0,
        "metrics": 0,
        "queue": None,
        "exceptions": [],
        "errors": [],
        "messages": [],
        "text": "Verify by retraining",
        "runs": 0,
    }
    state.update(values)
    return state


#: Before the click: nothing verified at k.
NOT_VERIFIED = page_state(text=f"Retrain to verify {NOT_VERIFIED_TEXT}")
#: Before the click: a verification of the same upload at k kept from an earlier run (the load
#: test's uploads are the same from run to run), drawn in full.
KEPT = page_state(
    charts=1, metrics=8, text=f"Retrain to verify {KEPT_TEXT}, and kept. {LISTED_KEPT}"
)
RUNNING = page_state(script="running", staleCharts=1, metrics=0, text="Retraining…", runs=1)
QUEUED = page_state(
    script="running", queue="1 request ahead of yours", text="Queued: 1 request ahead of yours"
)
#: The run is over; the chart's code is still loading (Streamlit loads Plotly lazily).
CHART_LOADING = page_state(metrics=8, text=f"Retrain to verify RBF SVM {LISTED_HERE}", runs=1)
DONE = page_state(charts=1, metrics=8, text=f"Retrain to verify RBF SVM {LISTED_HERE}", runs=1)


class ScriptedPage:
    """A page whose every read returns the next state of the current script (the last one
    again once it runs out); click ``n`` switches to ``scripts[n - 1]``."""

    def __init__(self, *scripts: list[dict[str, Any]], refuse: int = 0) -> None:
        self.scripts = scripts
        self.clicks = 0
        self.reads = 0
        self._step = 0
        #: Presses after the first that time out, as Playwright's would on a re-rendered button.
        self.refuse = refuse

    async def evaluate(self, expression: str, arg: Any = None) -> Any:
        if arg is None:  # watch_runs
            return None
        script = self.scripts[min(self.clicks, len(self.scripts)) - 1]
        self.reads += 1
        state = script[min(self._step, len(script) - 1)]
        self._step += 1
        return state

    def get_by_role(self, role: str, name: str, exact: bool = False) -> ScriptedPage:
        assert (role, name, exact) == ("button", "Retrain to verify", True)
        return self

    async def click(self, timeout: float | None = None) -> None:
        if self.clicks and self.refuse:
            from playwright.async_api import TimeoutError as PressTimeout

            self.refuse -= 1
            raise PressTimeout(f"Timeout {timeout}ms exceeded.")
        self.clicks += 1
        self._step = 0

    async def wait_for_timeout(self, milliseconds: float) -> None:
        await asyncio.sleep(milliseconds / 1000)


T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` in a thread of its own: in a pytest run that has started the e2e tests'
    synchronous Playwright, this thread's event loop counts as running."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


FAST = VerifyTimes(
    timeout_s=5.0, limit_s=10.0, repeat_after_s=0.05, unseen_after_s=0.2, poll_s=0.01
)


def wait(page: ScriptedPage, times: VerifyTimes = FAST) -> tuple[PageState, VerifyProgress]:
    progress = VerifyProgress()
    state = run(click_and_await_verification(page, K, MODELS, progress, times))
    return state, progress


def test_a_kept_verification_on_the_page_before_the_click_is_not_taken_for_this_run() -> None:
    # The chart and the metrics of a kept verification are on the page from the start; the
    # harness once stopped waiting at the first chart it saw.
    assert judge_verification(PageState.from_js(KEPT), K, MODELS) is Verdict.NOT_STARTED
    page = ScriptedPage([KEPT, RUNNING, QUEUED, QUEUED, RUNNING, CHART_LOADING, DONE])
    state, progress = wait(page)
    assert state == PageState.from_js(DONE)
    assert page.reads == 7 and page.clicks == 1
    assert progress.queued_ahead == 1 and progress.clicks_repeated == 0


def test_the_result_counts_once_the_chart_is_drawn_and_the_run_is_over() -> None:
    assert judge_verification(PageState.from_js(CHART_LOADING), K, MODELS) is Verdict.WORKING
    still_running = dict(DONE, script="running")
    assert judge_verification(PageState.from_js(still_running), K, MODELS) is Verdict.WORKING
    two_charts = dict(DONE, charts=2)
    assert judge_verification(PageState.from_js(two_charts), K, MODELS) is Verdict.WORKING
    one_model = dict(DONE, metrics=4)
    assert judge_verification(PageState.from_js(one_model), K, MODELS) is Verdict.WORKING
    assert judge_verification(PageState.from_js(DONE), K, MODELS) is Verdict.DONE
    # Another k's verification is not this one.
    assert judge_verification(PageState.from_js(DONE), 5, MODELS) is not Verdict.DONE


def test_only_a_verification_run_in_this_session_is_listed_as_here() -> None:
    assert verified_here(LISTED_HERE, 3)
    assert not verified_here(LISTED_KEPT, 3)
    assert not verified_here(LISTED_HERE, 30)
    assert not verified_here("Verified in this session: test image #4 (k = 3).", 3)


def test_a_click_that_started_nothing_is_repeated_and_counted() -> None:
    # A script run started and ended, and the page is as before the click: pressed again.
    folded = dict(NOT_VERIFIED, runs=1)
    page = ScriptedPage([folded], [RUNNING, DONE])
    _, progress = wait(page)
    assert page.clicks == 2 and progress.clicks_repeated == 1
    # No run seen at all: pressed again too, after longer.
    page = ScriptedPage([KEPT], [RUNNING, DONE])
    _, progress = wait(page)
    assert page.clicks == 2 and progress.clicks_repeated == 1


def test_a_press_again_that_times_out_is_tried_again_later() -> None:
    folded = dict(NOT_VERIFIED, runs=1)
    page = ScriptedPage([folded], [RUNNING, DONE], refuse=2)
    state, progress = wait(page)
    assert state == PageState.from_js(DONE)
    assert page.clicks == 2 and progress.clicks_repeated == 1 and progress.presses_missed == 2


@pytest.mark.parametrize(
    ("shown", "said"),
    [
        (page_state(errors=["The work needs 5 GiB; 3 GiB are free."]), "an error: The work"),
        (page_state(script="running", exceptions=["KeyError: 'svm'"]), "an exception: KeyError"),
    ],
)
def test_an_error_or_exception_on_the_page_fails_the_session_at_once(
    shown: dict[str, Any], said: str
) -> None:
    page = ScriptedPage([RUNNING, shown, DONE])
    with pytest.raises(VerificationFailed, match=f"the page shows {said}"):
        wait(page)
    assert page.reads == 2


def test_a_verification_that_does_not_finish_fails_saying_where_it_stood() -> None:
    times = VerifyTimes(timeout_s=0.1, limit_s=0.3, poll_s=0.01)
    with pytest.raises(VerificationFailed, match="did not finish: working after"):
        wait(ScriptedPage([RUNNING]), times)
    # The time queued does not count against the timeout, but against the limit.
    progress = VerifyProgress()
    with pytest.raises(VerificationFailed, match="did not finish: still queued after"):
        run(click_and_await_verification(ScriptedPage([QUEUED]), K, MODELS, progress, times))
    assert progress.queued_ahead == 1
    assert progress.last is not None and progress.last.queue == "1 request ahead of yours"


def test_a_failed_page_is_summarised_for_the_report() -> None:
    state = PageState.from_js(
        page_state(charts=1, staleCharts=1, queue="2 requests ahead of yours", messages=["Hi"])
    )
    assert state.summary() == (
        "script notRunning, connection CONNECTED, 1 chart(s) (+1 stale), 0 metric label(s), "
        "queue notice “2 requests ahead of yours”"
    )
    assert state.queued_ahead == 2
    assert PageState.from_js(DONE).excerpt().startswith("Retrain to verify RBF SVM Verified")


def test_verify_times_are_checked() -> None:
    with pytest.raises(ValueError, match="poll_s"):
        VerifyTimes(poll_s=0)
    with pytest.raises(ValueError, match="limit_s"):
        VerifyTimes(timeout_s=10, limit_s=5)
