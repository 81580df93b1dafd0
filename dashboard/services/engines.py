"""The shared explainer: prepared once in the background, watched by every session that needs it.

Also where a domain error becomes the message a page shows: core's words, plus the sidebar
control that fixes it.
"""

from __future__ import annotations

import threading
import time
import weakref
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
    PreparationCancelled,
    SolverDivergedError,
)
from core.explainer import Explainer
from core.store import ArtifactStore
from dashboard.services import preparing
from dashboard.services.settings import (
    DAMPING_CHOICES,
    EngineSpec,
    Settings,
    current_settings,
    load_dataset,
)

#: progress(stage, done, total), as core reports it while preparing.
Progress = Callable[[str, int, int], None]
#: build(progress, cancelled): the explainer, prepared; stops when cancelled() turns True.
Build = Callable[[Progress, Callable[[], bool]], Explainer]


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
    on and the next visitor finds it further along (or done). :meth:`cancel` asks the build to
    stop (core stops at its next progress report with ``PreparationCancelled``, the job's error).
    """

    def __init__(self, build: Build) -> None:
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._cancel = threading.Event()
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

    def _run(self, build: Build) -> None:
        try:
            self.result = build(self._report, self._cancel.is_set)
        except BaseException as exc:  # handed to the page, which decides how to show it
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self._started
            self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Ask the build to stop at its next progress report."""
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set() and not self.finished

    @property
    def cancelled(self) -> bool:
        return self.finished and isinstance(self.error, PreparationCancelled)

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
    def build(progress: Progress, cancelled: Callable[[], bool]) -> Explainer:
        explainer = Explainer(_dataset, engine.config, store=ArtifactStore())
        return explainer.prepare(progress, cancel=cancelled)

    job = Preparation(build)
    _started()[engine] = job
    return job


@st.cache_resource(show_spinner=False)
def _started() -> weakref.WeakValueDictionary[EngineSpec, Preparation]:
    """Engine -> its preparation while the shared cache holds it: whether a choice has been
    started, without starting it."""
    return weakref.WeakValueDictionary()


def _ask_first(settings: Settings) -> None:
    """Before starting (or restarting) a preparation: after a cancelled one, say so and offer it
    again; for a large choice nobody has confirmed, show its cost and wait (both stop the page)."""
    engine = settings.engine
    job = _started().get(engine)
    if job is not None and job.cancelled:
        # The cancelled job leaves the shared cache, so Prepare starts afresh.
        _preparation.clear(engine, None)
        _started().pop(engine, None)
        preparing.forget(engine)
        st.info(f"{job.error}", icon="⏹️")
        preparing.ask(settings)
    if job is None and preparing.needs_confirmation(settings):
        preparing.ask(settings)


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
    """The explainer if it is built, without waiting (for pages that can do without); a large
    choice nobody has confirmed is not started (see :mod:`.preparing`)."""
    settings = settings or current_settings()
    try:
        job = _started().get(settings.engine)
        if (job is None and preparing.needs_confirmation(settings)) or (job and job.cancelled):
            return None
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
        _ask_first(settings)
        job = preparation(settings)
    except InfluenceExplorerError as exc:
        st.error(error_message(exc, settings))
        st.stop()
    if not job.finished:
        preparing.watch(job, settings)
    if job.cancelled:
        _ask_first(settings)
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
