"""The shared explainer: prepared once in the background, watched by every session that needs it.

Also where a domain error becomes the message a page shows: core's words, plus the sidebar
control that fixes it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import streamlit as st

from core.budget import WorkEstimate
from core.data import Dataset
from core.errors import (
    ConvergenceError,
    InfluenceExplorerError,
    NonFiniteFeaturesError,
    NotPositiveDefiniteError,
    PreparationCancelled,
    ServerBusyError,
    SolverDivergedError,
)
from core.explainer import Explainer
from core.store import ArtifactStore
from dashboard.services import preparing
from dashboard.services.capacity import Ticket, WorkQueue, work_queue
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


class Abandoned(Exception):
    """Raised inside a preparation's progress callback when nobody has watched it for a while:
    the build stops there, and the next visitor starts a new one (cached features are kept)."""


#: Seconds a preparation goes on without anybody watching it before it stops at its next
#: progress callback (a watching page checks in every 0.3 s; a reload or a page switch takes a
#: few seconds at most).
ABANDON_AFTER_S = 15.0
#: Preparations unfinished at once (running or queued): one per engine config, and no more than
#: this many configs. A session asking for another gets a message instead of another thread.
MAX_UNFINISHED = 3
#: Finished explainers kept (least recently used dropped first), as the shared cache kept before.
MAX_FINISHED = 4


class Preparation:
    """Builds an explainer in a background thread and reports progress to whoever watches.

    Nothing here touches Streamlit, so one preparation can be watched from many sessions at once.
    Watchers check in (:meth:`touch`); when none has for ``abandon_after`` seconds the build
    stops at its next progress callback (:class:`Abandoned`), so work nobody waits for does not
    go on after the user left. The build runs as heavy work: it waits for a slot in the server's
    :class:`~dashboard.services.capacity.WorkQueue` and for its memory estimate to fit the budget.

    Args:
        build: ``build(job)`` returns the prepared explainer; it reports progress through
            ``job.report`` and enters the queue through ``job.admitted``.
        queue: the server's work queue.
        abandon_after: seconds without a watcher after which the build stops.
    """

    def __init__(
        self,
        build: Callable[[Preparation], Explainer],
        *,
        queue: WorkQueue | None = None,
        abandon_after: float = ABANDON_AFTER_S,
    ) -> None:
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._cancel = threading.Event()
        self._stage, self._done, self._total = "Starting", 0, 0
        self._started = time.monotonic()
        self._watched = self._started
        self._queue = queue
        self.abandon_after = float(abandon_after)
        self.seconds: float | None = None
        self.result: Explainer | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(build,), name="influence-explorer-prepare", daemon=True
        )
        self._thread.start()

    def touch(self) -> None:
        """A watcher checks in: the build is still wanted."""
        with self._lock:
            self._watched = time.monotonic()

    @property
    def unwatched_for(self) -> float:
        with self._lock:
            return time.monotonic() - self._watched

    def report(self, stage: str, done: int, total: int) -> None:
        """The build's progress callback; raises :class:`Abandoned` when nobody watches."""
        if self._cancel.is_set():
            raise PreparationCancelled(
                f"Preparation was cancelled during '{self._stage}'; what was computed so far is "
                "cached, so preparing again resumes from there."
            )
        if self.unwatched_for > self.abandon_after:
            raise Abandoned(f"nobody watched for {self.abandon_after:.0f} s")
        with self._lock:
            self._stage, self._done, self._total = stage, int(done), int(total)

    @contextmanager
    def admitted(self, estimate: WorkEstimate) -> Iterator[None]:
        """Run the block once the work queue admits ``estimate``; while queued, the stage says
        how many requests are ahead, and the wait ends if nobody watches any more."""
        if self._queue is None:
            yield
            return

        def waiting(ticket: Ticket) -> None:
            ahead = ticket.ahead()
            requests = "request" if ahead == 1 else "requests"
            self.report(f"Queued: {ahead} {requests} ahead of this one", 0, 0)

        with self._queue.admitted(estimate, waiting=waiting, poll=0.3):
            yield

    def _run(self, build: Callable[[Preparation], Explainer]) -> None:
        try:
            self.result = build(self)
        except BaseException as exc:  # handed to the page, which decides how to show it
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self._started
            self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Ask the build to stop at its next progress report (the page's Cancel)."""
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set() and not self.finished

    @property
    def cancelled(self) -> bool:
        return self.finished and isinstance(self.error, PreparationCancelled)

    @property
    def abandoned(self) -> bool:
        return isinstance(self.error, Abandoned)

    @property
    def alive(self) -> bool:
        """The build's thread is still running (it may be waiting in the queue)."""
        return self._thread.is_alive()

    def wait(self, timeout: float) -> bool:
        return self._finished.wait(timeout)

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            return ProgressSnapshot(
                self._stage, self._done, self._total, time.monotonic() - self._started
            )


class Preparations:
    """The server's preparations: one per engine config, a bounded number unfinished at once,
    and the last few finished ones kept (least recently used dropped first). Thread-safe."""

    def __init__(
        self, *, max_unfinished: int = MAX_UNFINISHED, max_finished: int = MAX_FINISHED
    ) -> None:
        self.max_unfinished = int(max_unfinished)
        self.max_finished = int(max_finished)
        self._lock = threading.Lock()
        self._jobs: OrderedDict[EngineSpec, Preparation] = OrderedDict()

    def get(self, engine: EngineSpec, start: Callable[[], Preparation]) -> Preparation:
        """The preparation for ``engine``, started with ``start()`` if there is none (or the last
        one was abandoned).

        Raises:
            ServerBusyError: ``max_unfinished`` other configs are being prepared already.
        """
        with self._lock:
            job = self._jobs.get(engine)
            if job is not None and job.abandoned:
                del self._jobs[engine]
                job = None
            if job is None:
                # A preparation whose thread has ended is finished (or abandoned); a thread
                # still stopping after it was abandoned counts until it has.
                busy = [j for j in self._jobs.values() if not j.finished]
                if len(busy) >= self.max_unfinished:
                    raise ServerBusyError(
                        f"The server is already preparing {len(busy)} other model "
                        "configurations, its limit. Try again when one has finished (the page "
                        "that started it shows its progress), or choose settings that are "
                        "prepared already."
                    )
                job = start()
                self._jobs[engine] = job
            self._jobs.move_to_end(engine)
            job.touch()
            finished = [key for key, j in self._jobs.items() if j.finished and key != engine]
            for key in finished[: max(0, len(finished) - (self.max_finished - 1))]:
                del self._jobs[key]
            return job

    def peek(self, engine: EngineSpec) -> Preparation | None:
        """The preparation for ``engine`` if there is one, without starting it."""
        with self._lock:
            return self._jobs.get(engine)

    def forget(self, engine: EngineSpec) -> None:
        """Drop the preparation for ``engine`` (e.g. a failed one, to try again)."""
        with self._lock:
            self._jobs.pop(engine, None)

    def unfinished(self) -> int:
        with self._lock:
            return sum(not j.finished for j in self._jobs.values())


@st.cache_resource(show_spinner=False)
def preparations() -> Preparations:
    """The server process's preparations (cleared with Streamlit's resource cache in tests)."""
    return Preparations()


def start_preparation(engine: EngineSpec, dataset: Dataset) -> Preparation:
    def build(job: Preparation) -> Explainer:
        explainer = Explainer(dataset, engine.config, store=ArtifactStore())
        # Construction is cheap and knows the sizes; the estimate decides admission.
        with job.admitted(explainer.preparation_estimate()):
            return explainer.prepare(job.report)

    return Preparation(build, queue=work_queue())


def preparation(settings: Settings) -> Preparation:
    """The shared preparation of the explainer for these settings (started on first call).

    Raises:
        InfluenceExplorerError: the dataset cannot be opened, the settings are invalid, or the
            server is preparing as many other configurations as it allows (ServerBusyError).
    """
    dataset = load_dataset(settings.dataset, settings.image_size)
    # settings.engine builds (and so validates) core's config in this thread, so an invalid
    # setting reaches the page directly rather than through the background thread.
    engine = settings.engine
    return preparations().get(engine, lambda: start_preparation(engine, dataset))


def explainer_if_ready(settings: Settings | None = None) -> Explainer | None:
    """The explainer if it is built, without waiting and without starting a preparation (for
    pages that can do without)."""
    settings = settings or current_settings()
    try:
        job = preparations().peek(settings.engine)
    except InfluenceExplorerError:
        return None
    return job.result if job is not None and job.finished else None


def require_explainer(settings: Settings | None = None) -> Explainer:
    """The explainer for the sidebar's settings; shows progress while it is prepared.

    On a domain error (e.g. an unavailable backbone) shows ``st.error`` with a retry button and
    stops the page; any other exception is raised, so tests see it.
    """
    settings = settings or current_settings()
    for _ in range(2):
        try:
            ask_first(settings)
            job = preparation(settings)
        except InfluenceExplorerError as exc:
            st.error(error_message(exc, settings))
            st.stop()
        if not job.finished:
            preparing.watch(job, settings)
        if job.cancelled:
            ask_first(settings)
        # Abandoned just before this session came to watch it: the second call starts anew.
        if not job.abandoned:
            break
    if job.error is not None:
        if not isinstance(job.error, InfluenceExplorerError):
            raise job.error
        st.error(error_message(job.error, settings))
        if st.button("Try again", key="state_retry_preparation"):
            preparations().forget(settings.engine)
            st.rerun()
        st.stop()
    assert job.result is not None
    for warning in job.result.warnings:
        # E.g. LiSSA too short to have converged: the scores are shown, with this caveat.
        st.warning(f"{warning}\n\n**In this dashboard:** {_SOLVER_FIX}", icon="⚠️")
    return job.result


def ask_first(settings: Settings) -> None:
    """Before starting (or restarting) a preparation: after a cancelled one, say so and offer it
    again; for a large choice nobody has confirmed, show its cost and wait (both stop the page).

    Raises:
        InfluenceExplorerError: the dataset cannot be opened or the settings are invalid.
    """
    engine = settings.engine
    job = preparations().peek(engine)
    ask_after_cancel(engine, job, settings)
    if job is None and preparing.needs_confirmation(settings):
        preparing.ask(settings)


def ask_after_cancel(key: EngineSpec, job: Preparation | None, settings: Settings) -> None:
    """When ``job`` (the preparation kept under ``key``: the settings' own, or the first look's)
    was cancelled: drop it, so *Prepare* starts afresh, say so, and ask before preparing the
    settings again (stops the page). Nothing otherwise."""
    if job is None or not job.cancelled:
        return
    preparations().forget(key)
    preparing.forget(settings.engine)
    st.info(f"{job.error}", icon="⏹️")
    preparing.ask(settings)


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
