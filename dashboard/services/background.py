"""Preparations in the background: one thread per explainer configuration, watched by any number
of sessions, bounded in number, stopped when nobody watches.

Nothing here touches Streamlit's pages; :mod:`.engines` starts preparations and shows them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import streamlit as st

from core.budget import WorkEstimate
from core.errors import PreparationCancelled, ServerBusyError
from core.explainer import Explainer
from dashboard.services.capacity import Ticket, WorkQueue
from dashboard.services.settings import EngineSpec


@dataclass(frozen=True)
class InProcess:
    """The key of an explainer prepared in this process although the server has a cluster: the
    copy for work that needs the training rows in one place (see :mod:`.cluster`)."""

    engine: EngineSpec


#: What a preparation is kept under: the settings' engine, or its in-process copy.
PreparationKey = EngineSpec | InProcess


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
        self._jobs: OrderedDict[PreparationKey, Preparation] = OrderedDict()

    def get(self, engine: PreparationKey, start: Callable[[], Preparation]) -> Preparation:
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

    def peek(self, engine: PreparationKey) -> Preparation | None:
        """The preparation for ``engine`` if there is one, without starting it."""
        with self._lock:
            return self._jobs.get(engine)

    def forget(self, engine: PreparationKey) -> None:
        """Drop the preparation for ``engine`` (e.g. a failed one, to try again)."""
        with self._lock:
            self._jobs.pop(engine, None)

    def forget_built_on(self, cluster: object) -> int:
        """Drop every finished explainer built on ``cluster`` (its shards go with the
        connection); returns how many."""
        with self._lock:
            stale = [
                key
                for key, job in self._jobs.items()
                if job.finished and getattr(job.result, "cluster", None) is cluster
            ]
            for key in stale:
                del self._jobs[key]
            return len(stale)

    def unfinished(self) -> int:
        with self._lock:
            return sum(not j.finished for j in self._jobs.values())


@st.cache_resource(show_spinner=False)
def preparations() -> Preparations:
    """The server process's preparations (cleared with Streamlit's resource cache in tests)."""
    return Preparations()
