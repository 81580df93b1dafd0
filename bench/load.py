"""Many users at once: concurrent browser sessions against one ``streamlit run``.

Usage: ``python -m bench.load [--sessions 20] [--waves 1] [--verify-k 3] [--budget 3G] [--solo]``

Starts the dashboard (``streamlit run dashboard/streamlit_app.py``) on a free port with the
artifact cache prepared and the memory budget ``--budget`` (``$INFLUENCE_MEMORY_BUDGET``), opens
one warm-up session (and with ``--solo`` one session alone, for uncontended latencies), then runs
``--waves`` waves of ``--sessions`` Playwright browser contexts at once (one Chromium; each context
is its own Streamlit session).
Every session, as a user would:

1. **open** the app and wait until both models' explanations of test image #0 are shown;
2. **select** its own test image (a different one per session) by number;
3. **upload** its own image (different pixels and size per session) and wait for its explanation;
4. **verify** on the Verify page: retrain without each of the top ``--verify-k`` images (heavy
   work: the server runs a few at a time, and a session that has to wait must be shown its
   place in the queue; the most requests ahead it was shown is recorded);
5. **return** to Explain, where its upload must still be the query, then back to its test image.

Each step's latency is the time from the user's action until the page shows its result (and the
script run has finished); a verification is judged by what the page shows
(``bench/load_page.py``: this session's run at k listed, its chart and metrics drawn, no exception
or error), and a failed session's page is recorded (its state, messages, visible text and a
screenshot under ``test-artifacts/``). Isolation is checked on the way: each page must show its
own test image, its own upload (file name *and* original size) and its own verification, and no
page may show another session's file name or test image heading. The server's resident memory
(VmRSS) is sampled every half second; VmHWM gives its peak. After the last wave every browser context is
closed and the server is watched until its housekeeping has shut the sessions down
(``dashboard/services/housekeeping.py``): the resident memory then is compared with the baseline.

Results go to ``bench/results/load.md``. ``tests/load/test_load.py`` (``pytest -m load``) runs the
same scenario and asserts success, isolation and a memory bound, without writing results.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.load_page import (
    FailureRecord,
    VerifyProgress,
    VerifyTimes,
    click_and_await_verification,
    record_failure,
)

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Generous: on a shared 2-core machine ten renderers and the server compete for the CPU.
ACTION_TIMEOUT_MS = 600_000
HEALTH_TIMEOUT_S = 300.0
#: The test images the sessions select: all different, none of them #0 (the start page).
N_TEST_IMAGES = 200
ACTIONS = ("open", "select", "upload", "verify", "return")
#: The models the dashboard explains and verifies by default (both lists on Explain, four
#: metrics each on Verify).
MODEL_KEYS = ("svm", "logreg")
#: A verification's wait: the action timeout since the click or since the queue notice was last
#: seen, and three times that in all (a queue that never moves fails the session, and says so).
VERIFY_TIMES = VerifyTimes(timeout_s=ACTION_TIMEOUT_MS / 1000, limit_s=3 * ACTION_TIMEOUT_MS / 1000)
#: How long to wait, after the sessions end, for the server to have shut them down (its grace
#: period, ``SESSION_GRACE_S`` = 30 s, plus a few of its sweeps). 60 s was once too short on a
#: machine at load 5 (1,518 MiB against a 1,273 MiB baseline after 60 s; the same test passed
#: at 7% above it when rerun): the sweeps run on the same two busy cores.
RELEASE_WAIT_S = 120.0
#: After the session alone: the server's grace period for a disconnected session and a sweep.
SOLO_SETTLE_S = 40.0


# ----------------------------------------------------------------------------- the server


@dataclass
class ServerProcess:
    url: str
    pid: int
    log: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def streamlit_server(
    cache_dir: Path, log: Path, extra_env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """``streamlit run`` of the dashboard on a free port, as ``make run`` would start it
    (``extra_env``: e.g. a memory budget or a number of workers for this server)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            "OMP_WAIT_POLICY": "PASSIVE",
            "INFLUENCE_CACHE_DIR": str(cache_dir),
            **(extra_env or {}),
        }
    )
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "dashboard/streamlit_app.py",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        # A measurement must not change under it: with the default watcher, saving a module of
        # the worktree while the server runs reloads it, and objects made before no longer
        # pickle ("not the same object as core.explainer.Explanation") in every session.
        "--server.fileWatcherType",
        "none",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {process.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"streamlit not healthy after {HEALTH_TIMEOUT_S:.0f} s; see {log}"
                )
            time.sleep(0.5)
        yield ServerProcess(url, process.pid, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (from /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class MemorySampler:
    """Samples a process's resident memory and the machine's load average in a thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic time, VmRSS KiB)
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self.loads.append(os.getloadavg()[0])
            self._stop.wait(self.interval)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def current_mib(self) -> float:
        return (_status_kib(self.pid, "VmRSS") or 0) / 1024

    def peak_mib(self) -> float:
        """The kernel's high-water mark (VmHWM): the true peak, not only sampled moments."""
        return (_status_kib(self.pid, "VmHWM") or 0) / 1024

    def max_between_mib(self, start: float, end: float) -> float:
        values = [rss for t, rss in self.samples if start <= t <= end]
        return max(values, default=0) / 1024


# ----------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class SessionPlan:
    """What one simulated user does: its own test image and its own upload."""

    number: int
    test_index: int
    filename: str
    upload: bytes
    original_size: tuple[int, int]  # (width, height) of the uploaded file


def session_image(number: int, wave: int) -> tuple[bytes, tuple[int, int]]:
    """A PNG 'product photo' unique to the session: its own pixels and its own size."""
    from tests.upload_corpus import garment_photo

    seed = 1000 * wave + number
    photo = garment_photo(background=235 - 3 * number, garment=(40, 60 + 5 * number, 90), seed=seed)
    width, height = 60 + 2 * number, 80
    image = Image.fromarray(photo).resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue(), (width, height)


def plan_sessions(count: int, wave: int) -> list[SessionPlan]:
    step = (N_TEST_IMAGES - 1) // max(count, 1)
    plans = []
    for number in range(count):
        data, size = session_image(number, wave)
        plans.append(
            SessionPlan(
                number=number,
                # Distinct, never 0; shifted per wave so a wave does not reuse the last's cache.
                test_index=1 + (number * step + 7 * wave) % (N_TEST_IMAGES - 1),
                filename=f"wave{wave}-session{number}.png",
                upload=data,
                original_size=size,
            )
        )
    return plans


@dataclass
class SessionResult:
    plan: SessionPlan
    wave: int
    seconds: dict[str, float] = field(default_factory=dict)
    isolation_checks: int = 0
    error: str | None = None
    #: The most requests ahead of this session's verification it was shown (None: never queued).
    queued_ahead: int | None = None
    #: How often "Retrain to verify" had to be pressed again (the page idle, nothing started).
    clicks_repeated: int = 0
    #: Presses again that Playwright could not make in time (tried again later).
    presses_missed: int = 0
    #: What the page showed when the session failed (script state, charts, metrics, queue
    #: notice, messages, visible text) and where its screenshot and text were written.
    failure: FailureRecord | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and set(self.seconds) == set(ACTIONS)


async def _idle(page: Any) -> None:
    """Until Streamlit has finished the current script run."""
    await page.wait_for_timeout(300)
    await page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()


def _heading(page: Any, text: str) -> Any:
    return page.get_by_role("heading", name=re.compile(rf"^{re.escape(text)}$"))


async def _explained(page: Any, title: str) -> None:
    """The Explain page shows ``title`` with both models' helpful and harmful lists."""
    from playwright.async_api import expect

    await expect(_heading(page, title)).to_be_visible()
    await _idle(page)
    await expect(_heading(page, title)).to_be_visible()
    for key in MODEL_KEYS:
        column = page.locator(f".st-key-explain_model_{key}")
        await expect(column.get_by_text("Most harmful")).to_be_visible()
        await expect(column.locator('[class*="st-key-explain_inspect_"]').first).to_be_visible()
    if await page.get_by_test_id("stException").count():
        raise AssertionError("the page shows an exception")


async def _no_other_session(page: Any, plan: SessionPlan, others: list[SessionPlan]) -> int:
    """Isolation: nothing of another session's upload or selection is on this page."""
    headings = "\n".join(await page.get_by_role("heading").all_inner_texts())
    text = await page.get_by_role("main").inner_text()
    for other in others:
        if other.filename in text or other.filename in headings:
            raise AssertionError(f"session {plan.number} shows {other.filename}")
        if f"Test image #{other.test_index}" in headings.splitlines():
            raise AssertionError(
                f"session {plan.number} shows session {other.number}'s test image heading"
            )
    return 1


async def _navigate(page: Any, title: str) -> None:
    await page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    await _idle(page)


async def run_session(
    browser: Any, url: str, plan: SessionPlan, others: list[SessionPlan], verify_k: int, wave: int
) -> SessionResult:
    from playwright.async_api import expect

    result = SessionResult(plan, wave)
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    page = await context.new_page()
    action = "open"
    width, height = plan.original_size
    own_upload = f"Uploaded {plan.filename}"
    original = f"Original: PNG, {width}×{height}, RGB."
    try:
        start = time.monotonic()
        await page.goto(url)
        await _explained(page, "Test image #0")
        result.seconds[action] = time.monotonic() - start

        action = "select"
        await page.get_by_text("…or pick one of the 200 test images").click()
        box = page.locator(".st-key-explain_goto input")
        await box.fill(str(plan.test_index))
        start = time.monotonic()
        await box.press("Enter")
        await _explained(page, f"Test image #{plan.test_index}")
        result.seconds[action] = time.monotonic() - start
        result.isolation_checks += await _no_other_session(page, plan, others)

        action = "upload"
        start = time.monotonic()
        await page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
            files=[{"name": plan.filename, "mimeType": "image/png", "buffer": plan.upload}]
        )
        await _explained(page, own_upload)
        await expect(page.get_by_text(original, exact=True)).to_be_visible()
        result.seconds[action] = time.monotonic() - start
        result.isolation_checks += await _no_other_session(page, plan, others)

        action = "verify"
        await _navigate(page, "Verify")
        await expect(_heading(page, own_upload)).to_be_visible()
        box = page.locator(".st-key-verify_k input")
        await box.fill(str(verify_k))
        await box.press("Enter")
        # The new k has been applied once the page has written it into the address; clicking
        # before that rerun has run lets Streamlit fold the click into it, and the click is lost.
        await page.wait_for_url(re.compile(rf"[?&]vk={verify_k}(&|$)"))
        await _idle(page)
        start = time.monotonic()
        progress = VerifyProgress()
        try:
            shown = await click_and_await_verification(
                page, verify_k, len(MODEL_KEYS), progress, VERIFY_TIMES
            )
        finally:
            result.queued_ahead = progress.queued_ahead
            result.clicks_repeated = progress.clicks_repeated
            result.presses_missed = progress.presses_missed
        result.seconds[action] = time.monotonic() - start
        # Verifications are kept on the server by content, so a test image verified earlier by
        # anyone is listed too (seen: test image #0 with k = 10); uploads are this session's
        # own, and only its one upload may be listed.
        listed = shown.text.partition("Verified in this session")[2]
        if listed.count("upload ") != 1:
            raise AssertionError(
                f"the session lists uploads' verifications it did not run: {listed[:200]!r}"
            )
        result.isolation_checks += await _no_other_session(page, plan, others)

        action = "return"
        start = time.monotonic()
        await _navigate(page, "Explain")
        await _explained(page, own_upload)
        await expect(page.get_by_text(original, exact=True)).to_be_visible()
        await page.get_by_role("button", name="Back to the test images").click()
        await _explained(page, f"Test image #{plan.test_index}")
        result.seconds[action] = time.monotonic() - start
        result.isolation_checks += await _no_other_session(page, plan, others)
    except Exception as error:  # recorded per session; the run goes on for the others
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        result.error = f"{action}: {first_line[:300]}"
        result.failure = await record_failure(page, ARTIFACTS / f"load-w{wave}-s{plan.number}")
    finally:
        await context.close()
    return result


# ----------------------------------------------------------------------------- a whole run


@dataclass
class WaveReport:
    wave: int
    seconds: float
    rss_before_mib: float
    rss_max_mib: float
    rss_after_mib: float
    server_cpu_seconds: float


@dataclass
class LoadResult:
    sessions: int
    waves: int
    verify_k: int
    results: list[SessionResult]
    wave_reports: list[WaveReport]
    solo: SessionResult | None
    warmup_seconds: float
    baseline_rss_mib: float
    peak_rss_mib: float
    load_before: float
    load_max: float
    load_after: float
    seconds: float
    #: The server's memory budget in bytes ($INFLUENCE_MEMORY_BUDGET), None for its default.
    budget_bytes: int | None = None
    #: Resident memory once the ended sessions were shut down, and how long that took after the
    #: last browser context closed (None: not back within 10% of the baseline in RELEASE_WAIT_S).
    released_rss_mib: float = float("nan")
    release_seconds: float | None = None

    @property
    def queued(self) -> list[SessionResult]:
        """Sessions that were shown their place in the queue while their verification waited."""
        return [r for r in self.results if r.queued_ahead is not None]

    @property
    def failures(self) -> list[str]:
        return [
            f"wave {r.wave} session {r.plan.number}: {r.error or 'incomplete'}"
            + (f"; {r.failure.describe(REPO)}" if r.failure is not None else "")
            for r in self.results
            if not r.ok
        ]

    def latencies(self, action: str) -> np.ndarray:
        return np.array([r.seconds[action] for r in self.results if action in r.seconds])


def nearest_rank(values: np.ndarray, percent: float) -> float:
    """The nearest-rank percentile: a value that was actually observed (no interpolation)."""
    ordered = np.sort(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return float(ordered[rank - 1])


async def _run_waves(
    chromium: str,
    url: str,
    sessions: int,
    waves: int,
    verify_k: int,
    sampler: MemorySampler,
    solo: bool,
) -> tuple[float, SessionResult | None, list[SessionResult], list[WaveReport]]:
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=ACTION_TIMEOUT_MS)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            # One session first, alone: the shared models are prepared (from the disk cache)
            # once, as on a server that has been up for a while.
            start = time.monotonic()
            warmup = await browser.new_context()
            warmup.set_default_timeout(ACTION_TIMEOUT_MS)
            page = await warmup.new_page()
            await page.goto(url)
            await _explained(page, "Test image #0")
            await warmup.close()
            warmup_seconds = time.monotonic() - start
            # The same steps by one user alone: what each action costs without contention.
            alone = None
            if solo:
                (plan,) = plan_sessions(1, wave=0)
                alone = await run_session(browser, url, plan, [], verify_k, wave=0)
                # Let the server shut that session down, so the baseline below holds what every
                # action loads once (imports, thread pools, the allocator's arenas) and no
                # session's own state: memory not returned after the waves is then theirs.
                await asyncio.sleep(SOLO_SETTLE_S)

            results: list[SessionResult] = []
            reports = []
            for wave in range(1, waves + 1):
                plans = plan_sessions(sessions, wave)
                before = sampler.current_mib()
                cpu_before = cpu_seconds(sampler.pid)
                start = time.monotonic()
                wave_results = await asyncio.gather(
                    *(
                        run_session(
                            browser,
                            url,
                            plan,
                            [p for p in plans if p is not plan],
                            verify_k,
                            wave,
                        )
                        for plan in plans
                    )
                )
                end = time.monotonic()
                cpu_used = cpu_seconds(sampler.pid) - cpu_before
                results.extend(wave_results)
                # Streamlit keeps a closed session's state for a while; a short pause lets the
                # disconnects register before the next wave.
                await asyncio.sleep(5)
                reports.append(
                    WaveReport(
                        wave=wave,
                        seconds=end - start,
                        rss_before_mib=before,
                        rss_max_mib=sampler.max_between_mib(start, end),
                        rss_after_mib=sampler.current_mib(),
                        server_cpu_seconds=cpu_used,
                    )
                )
        finally:
            await browser.close()
    return warmup_seconds, alone, results, reports


def _wait_for_release(sampler: MemorySampler, baseline: float) -> tuple[float, float | None]:
    """Watch the server after every session ended: (resident MiB at the end, seconds until it was
    back within 10% of ``baseline``, or None)."""
    start = time.monotonic()
    while time.monotonic() - start < RELEASE_WAIT_S:
        now = sampler.current_mib()
        if now <= 1.1 * baseline:
            return now, time.monotonic() - start
        time.sleep(1.0)
    return sampler.current_mib(), None


def run_load_test(
    *,
    sessions: int = 20,
    waves: int = 1,
    verify_k: int = 3,
    budget: str | None = None,
    solo: bool = False,
    cache_dir: Path | None = None,
    chromium: str | None = None,
) -> LoadResult:
    """Start the server, run the waves, wait for the sessions to be shut down, stop the server;
    see the module docstring. ``budget``: the server's ``$INFLUENCE_MEMORY_BUDGET``."""
    from core.budget import ENV_MEMORY_BUDGET, parse_budget
    from tests.prepared_cache import cache_dir as default_cache
    from tests.prepared_cache import prepare_default_explainer

    chromium = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("no Chromium on PATH (Debian: apt-get install chromium)")
    directory = cache_dir or default_cache()
    prepare_default_explainer(directory)  # features on disk, as after `influence precompute`
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    env = {ENV_MEMORY_BUDGET: budget} if budget else {}
    with streamlit_server(directory, ARTIFACTS / "load-server.log", env) as server:
        sampler = MemorySampler(server.pid).start()
        try:
            warmup_seconds, alone, results, reports = asyncio.run(
                _run_waves(chromium, server.url, sessions, waves, verify_k, sampler, solo)
            )
            baseline = reports[0].rss_before_mib if reports else sampler.current_mib()
            released, release_seconds = _wait_for_release(sampler, baseline)
            peak = sampler.peak_mib()
        finally:
            sampler.stop()
    return LoadResult(
        sessions=sessions,
        waves=waves,
        verify_k=verify_k,
        results=results,
        wave_reports=reports,
        solo=alone,
        warmup_seconds=warmup_seconds,
        baseline_rss_mib=baseline,
        peak_rss_mib=peak,
        load_before=load_before,
        load_max=max(sampler.loads, default=load_before),
        load_after=os.getloadavg()[0],
        seconds=time.monotonic() - started,
        budget_bytes=parse_budget(budget) if budget else None,
        released_rss_mib=released,
        release_seconds=release_seconds,
    )


# ----------------------------------------------------------------------------- report


ACTION_LABELS = {
    "open": "open the app (both explanations of test image #0 shown)",
    "select": "select a test image by number",
    "upload": "upload an image and see both explanations",
    "verify": "verify: retrain without the top k of each model",
    "return": "back to Explain (upload still there), then to the test image",
}


def markdown_report(result: LoadResult) -> str:
    from bench.common import markdown_table

    ok = sum(r.ok for r in result.results)
    total = len(result.results)
    rows = []
    for action in ACTIONS:
        values = result.latencies(action)
        if len(values) == 0:
            continue
        alone = result.solo.seconds.get(action) if result.solo is not None else None
        rows.append(
            [
                ACTION_LABELS[action],
                "–" if alone is None else f"{alone:.1f}",
                len(values),
                f"{np.median(values):.1f}",
                f"{nearest_rank(values, 95):.1f}",
                f"{values.max():.1f}",
            ]
        )
    waves = [
        [
            w.wave,
            f"{w.seconds:.0f}",
            f"{w.server_cpu_seconds:.0f} ({w.server_cpu_seconds / result.sessions:.1f} per session)",
            f"{w.rss_before_mib:.0f}",
            f"{w.rss_max_mib:.0f}",
            f"{w.rss_after_mib:.0f}",
        ]
        for w in result.wave_reports
    ]
    checks = sum(r.isolation_checks for r in result.results)
    solo_note = ""
    if result.solo is not None and not result.solo.ok:
        solo_note = f" The session alone failed: {result.solo.error}."
    queued = result.queued
    most_ahead = max((r.queued_ahead or 0 for r in queued), default=0)
    queue_note = (
        f" {len(queued)} of {total} sessions were shown their place in the queue while their "
        f"verification waited for a slot (at most {most_ahead} requests ahead); the others "
        "started at once."
    )
    budget = (
        "its default memory budget"
        if result.budget_bytes is None
        else f"a memory budget of {result.budget_bytes / 2**20:.0f} MiB"
    )
    warmup_note = (
        "then one session ran every step alone."
        if result.solo is not None
        else "no session ran alone (the 'alone' column is empty)."
    )
    repeated = sum(r.clicks_repeated for r in result.results)
    missed = sum(r.presses_missed for r in result.results)
    lines = [
        f"{result.waves} wave(s) of {result.sessions} concurrent browser sessions (Playwright "
        f"contexts in one Chromium) against one `streamlit run` with {budget}; verify with k = "
        f"{result.verify_k}. **{ok} of {total} sessions completed every step.**{queue_note} "
        f"{checks} isolation checks passed (each page showed only its own test image, upload "
        "and verification, and nothing of any other session's)." + solo_note,
        "",
        f"'Retrain to verify' had to be pressed again {repeated} time(s) in all (the page idle "
        "and nothing started: the click was folded into another rerun); "
        f"{missed} press(es) again could not be made within "
        f"{VERIFY_TIMES.press_s:.0f} s and were tried again later.",
        "",
        f"The machine is shared and small: 2 cores for the server, Chromium's {result.sessions} "
        "renderers and other people's jobs. 1-minute load average "
        f"{result.load_before:.1f} before, up to {result.load_max:.1f} during, "
        f"{result.load_after:.1f} after. The latencies under load are therefore mostly waiting "
        "for a core, and are upper bounds for a server whose users' browsers run on their own "
        "machines; the server's own CPU time per session is in the second table. A warm-up "
        f"session prepared the shared models first ({result.warmup_seconds:.0f} s, from the "
        f"disk cache), {warmup_note}",
        "",
        "Latency per action, seconds, from the user's action until the page shows the result "
        f"and the script run has finished (p95 by nearest rank, over all {result.waves} waves):",
        "",
        markdown_table(["action", "alone", "n", "p50", "p95", "max"], rows),
        "",
        "Server CPU and memory (resident set, MiB) per wave:",
        "",
        markdown_table(
            [
                "wave",
                "wall time (s)",
                "server CPU (s)",
                "RSS before",
                "RSS max (sampled)",
                "RSS after",
            ],
            waves,
        ),
        "",
        f"Peak resident memory of the server (VmHWM): **{result.peak_rss_mib:.0f} MiB**, "
        f"{result.peak_rss_mib - result.baseline_rss_mib:.0f} MiB above the "
        f"{result.baseline_rss_mib:.0f} MiB it held before the first wave"
        + (
            "."
            if result.budget_bytes is None
            else f"; the budget was {result.budget_bytes / 2**20:.0f} MiB."
        ),
        "",
        "After the last browser context closed, the server's resident memory was "
        f"{result.released_rss_mib:.0f} MiB"
        + (
            f", back within 10% of the baseline after {result.release_seconds:.0f} s (the "
            "housekeeping shuts a session down 30 s after it disconnects)."
            if result.release_seconds is not None
            else f", not back within 10% of the baseline after {RELEASE_WAIT_S:.0f} s."
        ),
    ]
    if result.failures:
        lines += ["", "Failures:", "", *(f"- {failure}" for failure in result.failures)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--waves", type=int, default=1)
    parser.add_argument("--verify-k", type=int, default=3)
    parser.add_argument("--budget", default="3G", help="the server's INFLUENCE_MEMORY_BUDGET")
    parser.add_argument("--solo", action="store_true", help="first run one session alone")
    args = parser.parse_args()
    from bench.common import write_results

    result = run_load_test(
        sessions=args.sessions,
        waves=args.waves,
        verify_k=args.verify_k,
        budget=args.budget,
        solo=args.solo,
    )
    body = markdown_report(result)
    path = write_results("load", "Many users: concurrent browser sessions", body)
    print(body)
    print(f"\nwritten to {path}")
    sys.exit(0 if not result.failures else 1)


if __name__ == "__main__":
    main()
