"""What a load-test session reads from its page, and how it judges a verification.

Used by :mod:`bench.load`. Every read of the page is **one** JavaScript evaluation
(:func:`read_page`): it never waits for an element, and all it returns comes from the same
moment of the page. Reading element by element with Playwright locators does neither: between two
calls a Streamlit rerun may replace the element, and a locator read such as ``inner_text()`` then
waits for an element that has gone, for the whole action timeout. That is how the harness once
failed verifications that had finished: it counted the queue notice ("1 request ahead of
yours"), the session was admitted and the notice removed, and ``inner_text()`` on the notice
waited 600 s, after which the deadline had passed while the chart had long been on the page.

A verification is judged by what the page shows (:func:`judge_verification`): the script has
finished, this session's verification at the chosen k is listed as run here (not read back from
an earlier run kept on the server, whose chart is on the page before the click), the chart and
every model's metrics are drawn, and there is no exception and no error. When a session fails,
:func:`read_page` and a screenshot record why (:class:`PageState` gives the script state, the
charts, the metrics, the queue notice, the messages and the visible text).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

#: What a session waiting for heavy work reads (``dashboard.services.capacity.queue_message``).
QUEUE_TEXT = re.compile(r"(\d+) requests? ahead of yours")
#: The Verify page before any verification at this k (``dashboard/app_pages/verify.py``) ...
NOT_VERIFIED_TEXT = "Not verified yet for this image and k."
#: ... and with one read back from the server, kept from an earlier run (same content, same k).
KEPT_TEXT = "These results were computed earlier on this server"
#: The Verify page's metrics: Pearson, Spearman, slope and time, per model.
METRICS_PER_MODEL = 4
#: The label of the button that starts a verification (a result run in this session has
#: "Retrain again" instead).
VERIFY_BUTTON = "Retrain to verify"

#: One evaluation: the page's state at one moment. Elements of an earlier script run that the
#: current run has not replaced yet (``data-stale="true"``) are counted apart or left out.
_PAGE_STATE_JS = r"""
(queueSource) => {
  const fresh = (el) => !el.closest('[data-stale="true"]');
  const text = (el) => (el.innerText || el.textContent || '').replace(/\s+/g, ' ').trim();
  const all = (root, selector) => Array.from(root.querySelectorAll(selector));
  const app = document.querySelector('[data-testid="stApp"]');
  const main = document.querySelector('[data-testid="stMain"]') || document.body;
  const charts = all(main, '[data-testid="stPlotlyChart"]');
  const visible = text(main);
  const queue = new RegExp(queueSource).exec(visible);
  return {
    script: app ? app.getAttribute('data-test-script-state') : null,
    connection: app ? app.getAttribute('data-test-connection-state') : null,
    charts: charts.filter(fresh).length,
    staleCharts: charts.filter((el) => !fresh(el)).length,
    metrics: all(main, '.st-key-verify_summary [data-testid="stMetricLabel"]').filter(fresh).length,
    queue: queue ? queue[0] : null,
    exceptions: all(document, '[data-testid="stException"]').filter(fresh).map(text),
    errors: all(main, '[data-testid="stAlertContentError"]').filter(fresh).map(text),
    messages: all(document, '[data-testid^="stAlertContent"]').filter(fresh).map(text),
    text: visible,
    runs: typeof window.__loadRuns === 'number' ? window.__loadRuns : null,
  };
}
"""

#: Counts the script runs that start from now on (``window.__loadRuns``), so that a click that
#: started nothing is told apart from one whose run is over: polling alone can miss a short run.
_WATCH_RUNS_JS = r"""
() => {
  const app = document.querySelector('[data-testid="stApp"]');
  window.__loadRuns = 0;
  if (app && window.__loadWatched !== app) {
    window.__loadWatched = app;
    // One callback may carry several changes: the value after each is the next one's old value.
    new MutationObserver((records) => {
      const after = records.slice(1).map((r) => r.oldValue);
      after.push(app.getAttribute('data-test-script-state'));
      window.__loadRuns += after.filter((value) => value === 'running').length;
    }).observe(app, {
      attributes: true, attributeOldValue: true, attributeFilter: ['data-test-script-state'],
    });
  }
}
"""


@dataclass(frozen=True)
class PageState:
    """What a page showed at one moment (one evaluation of ``_PAGE_STATE_JS``).

    Attributes:
        script: the app's script state (``running``, ``notRunning``, ``rerunRequested``, ...),
            None when there is no app on the page.
        connection: the app's connection state to the server (``CONNECTED``, ...).
        charts: Plotly charts of the current script run; ``stale_charts``: of an earlier one.
        metrics: metric labels in the Verify page's summary.
        queue: the queue notice ("2 requests ahead of yours"), None when none is shown.
        exceptions, errors: exception boxes anywhere, error boxes in the main area.
        messages: every error, warning, info and success box (main area and sidebar).
        text: the main area's visible text, white space collapsed.
        runs: script runs started since :func:`watch_runs` (None: not watched).
    """

    script: str | None
    connection: str | None
    charts: int
    stale_charts: int
    metrics: int
    queue: str | None
    exceptions: tuple[str, ...]
    errors: tuple[str, ...]
    messages: tuple[str, ...]
    text: str
    runs: int | None = None

    @classmethod
    def from_js(cls, values: dict[str, Any]) -> PageState:
        return cls(
            script=values.get("script"),
            connection=values.get("connection"),
            charts=int(values.get("charts", 0)),
            stale_charts=int(values.get("staleCharts", 0)),
            metrics=int(values.get("metrics", 0)),
            queue=values.get("queue"),
            exceptions=tuple(values.get("exceptions", ())),
            errors=tuple(values.get("errors", ())),
            messages=tuple(values.get("messages", ())),
            text=str(values.get("text", "")),
            runs=values.get("runs"),
        )

    @property
    def idle(self) -> bool:
        """The script run is over (and no other requested)."""
        return self.script == "notRunning"

    @property
    def queued_ahead(self) -> int | None:
        """Requests ahead in the queue, as the notice says (None: no notice)."""
        if self.queue is None:
            return None
        seen = QUEUE_TEXT.search(self.queue)
        return int(seen.group(1)) if seen else None

    def summary(self) -> str:
        """One line for a report: script and connection state, charts, metrics, queue notice."""
        stale = f" (+{self.stale_charts} stale)" if self.stale_charts else ""
        return (
            f"script {self.script or 'absent'}, connection {self.connection or 'unknown'}, "
            f"{self.charts} chart(s){stale}, {self.metrics} metric label(s), "
            + (f"queue notice “{self.queue}”" if self.queue else "no queue notice")
            + (f", {len(self.exceptions)} exception(s)" if self.exceptions else "")
        )

    def excerpt(self, chars: int = 400) -> str:
        """The visible text from the verify button on (where a verification's state shows),
        else its end; at most ``chars`` characters."""
        start = self.text.find(VERIFY_BUTTON)
        if start < 0:
            start = self.text.find("Retrain again")
        part = self.text[start:] if start >= 0 else self.text[-chars:]
        return part if len(part) <= chars else part[: chars - 1] + "…"


async def read_page(page: Any, timeout_s: float = 60.0) -> PageState:
    """The page's state now, in one evaluation (which waits for no element). ``timeout_s``
    bounds it should the renderer not answer (a starved machine).

    Raises:
        TimeoutError: the page did not answer within ``timeout_s``.
    """
    values = await asyncio.wait_for(
        page.evaluate(_PAGE_STATE_JS, QUEUE_TEXT.pattern), timeout=timeout_s
    )
    return PageState.from_js(values)


async def watch_runs(page: Any) -> None:
    """Count the script runs that start from now on (:attr:`PageState.runs`)."""
    await page.evaluate(_WATCH_RUNS_JS)


# ----------------------------------------------------------------------------- verification


class Verdict(Enum):
    """Where a verification stands, judged from one :class:`PageState`."""

    #: This session's verification at k is shown: listed as run here, chart and metrics drawn,
    #: the script run over.
    DONE = "done"
    #: An exception or an error is shown (e.g. the memory budget refused the work).
    FAILED = "failed"
    #: The queue notice is shown: waiting for a slot.
    QUEUED = "queued"
    #: Idle, showing the page as before the click (nothing verified at k, or only a kept
    #: verification read back from the server): the click has started nothing so far.
    NOT_STARTED = "not started"
    #: Anything else: the run is under way, or over and the chart still loading.
    WORKING = "working"


def verified_here(text: str, k: int) -> bool:
    """Whether the page lists an upload's verification at ``k`` as run in this session: "upload
    1a2b3c4d (k = 3)", not "(k = 3, read back from an earlier run)" (``verified_queries``)."""
    return re.search(rf"\bupload \S+ \(k = {int(k)}\)", text) is not None


def judge_verification(state: PageState, k: int, n_models: int) -> Verdict:
    """Where this session's verification of its upload at ``k`` stands (see :class:`Verdict`)."""
    if state.exceptions or state.errors:
        return Verdict.FAILED
    if state.queue is not None:
        return Verdict.QUEUED
    if not state.idle:
        return Verdict.WORKING
    if (
        verified_here(state.text, k)
        and state.charts == 1
        and state.metrics == METRICS_PER_MODEL * n_models
    ):
        return Verdict.DONE
    if NOT_VERIFIED_TEXT in state.text or KEPT_TEXT in state.text:
        return Verdict.NOT_STARTED
    return Verdict.WORKING


@dataclass(frozen=True)
class VerifyTimes:
    """How long a session waits for its verification.

    Attributes:
        timeout_s: seconds allowed since the click, or since the queue notice was last seen
            (waiting in the queue is the server working as meant).
        limit_s: seconds allowed since the click in all, queued or not.
        repeat_after_s: the page idle as before the click for this long after a script run has
            started and ended: the click was folded into another rerun; press again.
        unseen_after_s: the same with no script run seen since the click.
        poll_s: seconds between two reads of the page.
        press_s: how long one press again may wait for the button to be clickable; a press
            that cannot be made in that time (the button re-rendered, covered or replaced) is
            counted and tried again at a later read, within the same deadlines.
    """

    timeout_s: float = 600.0
    limit_s: float = 1800.0
    repeat_after_s: float = 3.0
    unseen_after_s: float = 10.0
    poll_s: float = 0.25
    press_s: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "timeout_s",
            "limit_s",
            "repeat_after_s",
            "unseen_after_s",
            "poll_s",
            "press_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds; got {value!r}.")
        if self.limit_s < self.timeout_s:
            raise ValueError(
                f"limit_s ({self.limit_s}) must be at least timeout_s ({self.timeout_s})."
            )


@dataclass
class VerifyProgress:
    """What the session saw while it waited: for the report."""

    #: The most requests ahead it was shown (None: never queued).
    queued_ahead: int | None = None
    #: Times the button was pressed again (the page idle as before the click).
    clicks_repeated: int = 0
    #: Presses again that could not be made within ``VerifyTimes.press_s``.
    presses_missed: int = 0
    #: The last state read.
    last: PageState | None = None


class VerificationFailed(AssertionError):
    """The page showed an error or an exception, or the verification did not finish in time."""


async def click_and_await_verification(
    page: Any,
    k: int,
    n_models: int,
    progress: VerifyProgress,
    times: VerifyTimes | None = None,
) -> PageState:
    """Press "Retrain to verify" and wait until the page shows this session's verification at
    ``k`` (:attr:`Verdict.DONE`); press again when the click started nothing.

    Returns:
        The page's state once done.

    Raises:
        VerificationFailed: an exception or error is shown, or the time is up (the message says
            what the page showed last).
    """
    times = times or VerifyTimes()
    button = page.get_by_role("button", name=VERIFY_BUTTON, exact=True)
    await watch_runs(page)
    await button.click()
    clicked = time.monotonic()
    deadline = clicked + times.timeout_s
    idle_since: float | None = None
    while True:
        state = await read_page(page)
        progress.last = state
        verdict = judge_verification(state, k, n_models)
        now = time.monotonic()
        if verdict is Verdict.DONE:
            return state
        if verdict is Verdict.FAILED:
            shown = (state.exceptions or state.errors)[0]
            raise VerificationFailed(
                f"the page shows {'an exception' if state.exceptions else 'an error'}: "
                f"{shown[:300]}"
            )
        if verdict is Verdict.QUEUED:
            deadline = now + times.timeout_s
            ahead = state.queued_ahead
            if ahead is not None:
                progress.queued_ahead = max(progress.queued_ahead or 0, ahead)
        if verdict is Verdict.NOT_STARTED:
            idle_since = now if idle_since is None else idle_since
            wait = times.repeat_after_s if state.runs else times.unseen_after_s
            if now - idle_since >= wait:
                # Idle as before the click: the click did not reach the script (a user would
                # press again). Counted, so that a report shows how often.
                await watch_runs(page)
                if await _press_again(button, times):
                    progress.clicks_repeated += 1
                else:
                    progress.presses_missed += 1
                idle_since = None
        else:
            idle_since = None
        if now > deadline or now - clicked > times.limit_s:
            waited = now - clicked
            why = (
                f"still queued after {waited:.0f} s"
                if verdict is Verdict.QUEUED
                else f"{verdict.value} after {waited:.0f} s"
            )
            raise VerificationFailed(f"the verification did not finish: {why}")
        await page.wait_for_timeout(times.poll_s * 1000)


async def _press_again(button: Any, times: VerifyTimes) -> bool:
    """Press the button; False when Playwright could not within ``times.press_s`` (a load test
    once lost a session that way: its press waited 30 s on a button the page was re-rendering)."""
    from playwright.async_api import TimeoutError as PressTimeout

    try:
        await button.click(timeout=times.press_s * 1000)
    except PressTimeout:
        return False
    return True


# ----------------------------------------------------------------------------- failures


@dataclass(frozen=True)
class FailureRecord:
    """What a failed session's page showed: its state, and where the evidence was written."""

    state: PageState | None
    screenshot: Path | None
    text_file: Path | None

    def describe(self, root: Path) -> str:
        """One paragraph for the report (paths relative to ``root``)."""

        def name(path: Path | None) -> str:
            if path is None:
                return "none"
            try:
                return str(path.relative_to(root))
            except ValueError:
                return str(path)

        parts = []
        if self.state is None:
            parts.append("the page could not be read")
        else:
            parts.append(self.state.summary())
            parts.append(
                "the page said: " + " | ".join(f"“{m[:300]}”" for m in self.state.messages)
                if self.state.messages
                else "no message on the page"
            )
            parts.append(f"visible text: “{self.state.excerpt()}”")
        parts.append(f"screenshot {name(self.screenshot)}, page text {name(self.text_file)}")
        return "; ".join(parts)


async def record_failure(page: Any, stem: Path) -> FailureRecord:
    """Read the page, save a full-page screenshot (``<stem>.png``) and its state and whole
    visible text (``<stem>.txt``); each best effort (the page may be gone)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = screenshot = text_file = None
    try:
        state = await read_page(page, timeout_s=30.0)
    except Exception:  # the page may be gone; the report says so
        state = None
    try:
        path = stem.with_suffix(".png")
        await page.screenshot(path=str(path), full_page=True, timeout=60_000)
        screenshot = path
    except Exception:  # best effort
        screenshot = None
    if state is not None:
        path = stem.with_suffix(".txt")
        lines = [state.summary(), "", "Messages:", *state.messages, "", "Exceptions:"]
        lines += [*state.exceptions, "", "Visible text of the main area:", state.text]
        path.write_text("\n".join(lines) + "\n")
        text_file = path
    return FailureRecord(state, screenshot, text_file)
