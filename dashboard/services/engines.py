"""The shared explainer: prepared once in the background, watched by every session that needs it.

Also where a domain error becomes the message a page shows: core's words, plus the sidebar
control that fixes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import streamlit as st

from core.data import Dataset
from core.errors import (
    ConvergenceError,
    InfluenceExplorerError,
    NonFiniteFeaturesError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from core.explainer import Explainer
from core.store import ArtifactStore
from dashboard.services.settings import (
    DAMPING_CHOICES,
    EngineSpec,
    Settings,
    current_settings,
    load_dataset,
)

#: progress(stage, done, total), as core reports it while preparing.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where a preparation is: its stage, units done of the stage's total, seconds so far."""

    stage: str
    done: int
    total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


class Preparation:
    """Builds an explainer in a background thread and reports progress to whoever watches.

    Nothing here touches Streamlit, so it is safe to create inside ``st.cache_resource`` and to
    watch from many sessions at once. A session that navigates away stops watching; the build goes
    on and the next visitor finds it further along (or done).
    """

    def __init__(self, build: Callable[[Progress], Explainer]) -> None:
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._stage, self._done, self._total = "Starting", 0, 0
        self._started = time.monotonic()
        self.seconds: float | None = None
        self.result: Explainer | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(build,), name="influence-explorer-prepare", daemon=True
        )
        self._thread.start()

    def _report(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            self._stage, self._done, self._total = stage, int(done), int(total)

    def _run(self, build: Callable[[Progress], Explainer]) -> None:
        try:
            self.result = build(self._report)
        except BaseException as exc:  # handed to the page, which decides how to show it
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self._started
            self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float) -> bool:
        return self._finished.wait(timeout)

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            return ProgressSnapshot(
                self._stage, self._done, self._total, time.monotonic() - self._started
            )


@st.cache_resource(max_entries=4, show_spinner=False)
def _preparation(engine: EngineSpec, _dataset: Dataset) -> Preparation:
    # The engine's dataset and image size determine _dataset, so it need not key the cache.
    def build(progress: Progress) -> Explainer:
        return Explainer(_dataset, engine.config, store=ArtifactStore()).prepare(progress)

    return Preparation(build)


def preparation(settings: Settings) -> Preparation:
    """The shared preparation of the explainer for these settings (started on first call).

    Raises:
        InfluenceExplorerError: the dataset cannot be opened or the settings are invalid.
    """
    dataset = load_dataset(settings.dataset, settings.image_size)
    # settings.engine builds (and so validates) core's config in this thread, so an invalid
    # setting reaches the page directly rather than through the background thread.
    return _preparation(settings.engine, dataset)


def explainer_if_ready(settings: Settings | None = None) -> Explainer | None:
    """The explainer if it is built, without waiting (for pages that can do without)."""
    settings = settings or current_settings()
    try:
        job = preparation(settings)
    except InfluenceExplorerError:
        return None
    return job.result if job.finished else None


def require_explainer(settings: Settings | None = None) -> Explainer:
    """The explainer for the sidebar's settings; shows progress while it is prepared.

    On a domain error (e.g. an unavailable backbone) shows ``st.error`` with a retry button and
    stops the page; any other exception is raised, so tests see it.
    """
    settings = settings or current_settings()
    try:
        job = preparation(settings)
    except InfluenceExplorerError as exc:
        st.error(error_message(exc, settings))
        st.stop()
    if not job.finished:
        _watch(job)
    if job.error is not None:
        if not isinstance(job.error, InfluenceExplorerError):
            raise job.error
        st.error(error_message(job.error, settings))
        if st.button("Try again", key="state_retry_preparation"):
            _preparation.clear(settings.engine, None)
            st.rerun()
        st.stop()
    assert job.result is not None
    for warning in job.result.warnings:
        # E.g. LiSSA too short to have converged: the scores are shown, with this caveat.
        st.warning(f"{warning}\n\n**In this dashboard:** {_SOLVER_FIX}", icon="⚠️")
    return job.result


def _watch(job: Preparation) -> None:
    """Show the preparation's progress until it finishes."""
    with st.status("Preparing the models (first launch only)…", expanded=True) as status:
        st.caption(
            "Features are computed once and cached on disk; fitting the models and their "
            "influence engines follows. Later launches take seconds."
        )
        bar = st.progress(0.0, text="Starting…")
        while not job.wait(0.3):
            snap = job.snapshot()
            detail = f" ({snap.done}/{snap.total})" if snap.total else ""
            bar.progress(snap.fraction, text=f"{snap.stage}{detail} · {snap.elapsed:.0f} s")
        failed = job.error is not None
        status.update(
            label="Preparation failed" if failed else f"Models ready ({job.seconds:.0f} s)",
            state="error" if failed else "complete",
            expanded=False,
        )


_SOLVER_FIX = (
    "choose *Exact (Cholesky)* as the solver, or a larger *Damping*, in the sidebar under "
    "*Advanced*."
)


def error_message(error: InfluenceExplorerError, settings: Settings | None = None) -> str:
    """Core's message for a domain error, plus what to change in this dashboard to fix it.

    Core's messages name settings as the engine knows them (damping, lissa_depth, a weights
    file); the sidebar offers fewer, so where one of its controls is the fix, say which.
    """
    settings = settings or current_settings()
    fix = None
    if isinstance(error, NotPositiveDefiniteError):
        suggested = error.suggested_damping
        enough = [d for d in DAMPING_CHOICES if suggested is not None and d >= suggested]
        fix = (
            f"set *Damping* to {enough[0]:g} or more in the sidebar under *Advanced*."
            if enough
            else "choose a larger *Damping* in the sidebar under *Advanced*."
        )
    elif isinstance(error, (SolverDivergedError, ConvergenceError)) and settings.solver != "exact":
        fix = _SOLVER_FIX
    elif isinstance(error, SolverDivergedError):
        fix = "choose a larger *Damping* in the sidebar under *Advanced*."
    elif isinstance(error, NonFiniteFeaturesError):
        fix = "choose another backbone in the sidebar."
    return str(error) if fix is None else f"{error}\n\n**In this dashboard:** {fix}"


def stop_on_domain_error(error: InfluenceExplorerError) -> NoReturn:
    """Show a domain error the dashboard's way and stop the page."""
    st.error(error_message(error))
    st.stop()
