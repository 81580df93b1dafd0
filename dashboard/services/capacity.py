"""How much heavy work the server takes on at once, and what a waiting user sees.

Heavy work (preparing an explainer, verifying by retraining, the Training data pages'
experiments, a fragility live run) goes through one :class:`WorkQueue` per server process:

- a bounded number of **slots** (``$INFLUENCE_WORKERS``, default: the machine's cores): at most
  that many pieces of heavy work run at once, whoever asked;
- a first-come, first-served **queue** for the rest, whose position each waiting session is shown
  ("2 requests ahead of yours") and which it leaves when the user navigates away or closes the tab;
- the **memory budget** (:class:`core.budget.MemoryBudget`): work is admitted only when its
  estimate fits next to the work already running, and refused at once, with a message saying how
  much it needs and what is free, when it could not fit even on an idle server.

The work itself runs in the session's own script thread once admitted (so its progress bar and
Streamlit's stop-on-navigation work as before); the queue only decides when it may start. Nothing
here but :func:`heavy_work` touches Streamlit, so the queue is tested without a server.

Every entry remembers the thread that joined (its **owner**: the script thread, or a preparation's
background thread), which is the thread that leaves. An entry whose owner has ended without
leaving can never be left, so whenever the queue is consulted (a request joins, leaves, waits or
asks its place) such entries are dropped and their memory reservations released: a waiting user
never waits behind work nobody will finish. The queue cannot tell a live owner that is stuck from
one that is busy, so it does not try: work that is admitted runs as long as its thread does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import streamlit as st

from core.budget import MemoryBudget, Reservation, WorkEstimate, network_estimate, refit_estimate
from core.errors import InfluenceExplorerError, MemoryBudgetError
from core.explainer import Explainer

#: Environment variable: pieces of heavy work run at once (the rest wait in the queue).
ENV_WORKERS = "INFLUENCE_WORKERS"
#: Most requests waiting at once; beyond that a request is told to come back later.
MAX_WAITING = 64
#: Seconds a waiting thread sleeps at most before it looks again for entries whose owner has
#: ended (nobody else would wake it for them).
RECHECK_S = 1.0

_LOGGER = logging.getLogger(__name__)


def default_slots(environ: dict[str, str] | None = None) -> int:
    """``$INFLUENCE_WORKERS`` if set, else the machine's cores (at least 1).

    Raises:
        InfluenceExplorerError: the variable is not a whole number >= 1.
    """
    text = (os.environ if environ is None else environ).get(ENV_WORKERS, "").strip()
    if not text:
        return max(1, os.cpu_count() or 1)
    if not text.isdigit() or int(text) < 1:
        raise InfluenceExplorerError(
            f"{ENV_WORKERS}={text[:20]!r} must be a whole number of at least 1."
        )
    return int(text)


# Compared by identity: two requests for the same work (sessions verifying on the same models)
# are equal in every other field, and leaving, or asking one's place, must find the entry that
# asks, not the first equal one.
@dataclass(eq=False)
class _Entry:
    estimate: WorkEstimate
    label: str
    #: The thread that joined, and so the one that waits, runs the work and leaves.
    owner: threading.Thread
    admitted: bool = False
    refused: MemoryBudgetError | None = None
    reservation: Reservation | None = None


class Ticket:
    """One request's place in the :class:`WorkQueue`: wait for it, then leave when done."""

    def __init__(self, queue: WorkQueue, entry: _Entry) -> None:
        self._queue = queue
        self._entry = entry
        self.joined = time.monotonic()

    @property
    def admitted(self) -> bool:
        return self._entry.admitted

    def ahead(self) -> int:
        """Requests ahead of this one: waiting before it, plus those running (0 once admitted)."""
        return self._queue._ahead(self._entry)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds to be admitted; True once admitted. Call it from the
        thread that joined (the queue drops an entry once that thread has ended).

        Raises:
            MemoryBudgetError: the work was refused (it cannot fit in the memory budget).
        """
        return self._queue._wait(self._entry, timeout)

    def leave(self) -> None:
        """Give up the place, or the slot once admitted (idempotent)."""
        self._queue._leave(self._entry)


class WorkQueue:
    """A bounded number of slots, first come first served, admitted against a memory budget.

    The thread that joins owns its entry; entries whose owner has ended without leaving are
    dropped (their reservations released) whenever the queue is consulted.

    Args:
        slots: pieces of work that may run at once.
        budget: the process's memory budget; an entry is admitted when a slot is free and its
            estimate fits next to the running work's reservations.
        max_waiting: most entries waiting at once (the rest are refused at once).
    """

    def __init__(self, slots: int, budget: MemoryBudget, *, max_waiting: int = MAX_WAITING) -> None:
        if slots < 1:
            raise InfluenceExplorerError(f"slots must be >= 1; got {slots!r}.")
        self.slots = int(slots)
        self.budget = budget
        self.max_waiting = int(max_waiting)
        self._changed = threading.Condition()
        self._waiting: list[_Entry] = []
        self._running: list[_Entry] = []

    @property
    def running(self) -> int:
        with self._changed:
            self._tidy()
            return len(self._running)

    @property
    def waiting(self) -> int:
        with self._changed:
            self._tidy()
            return len(self._waiting)

    def join(self, estimate: WorkEstimate, label: str = "") -> Ticket:
        """Queue a piece of work.

        Raises:
            MemoryBudgetError: it could not fit even with no other work running (refused at once,
                without waiting).
            ServerBusyError: too many requests are waiting already.
        """
        from core.errors import ServerBusyError

        if not self.budget.could_ever_fit(estimate):
            raise self.budget.refusal(estimate)
        entry = _Entry(estimate, label or estimate.what, threading.current_thread())
        with self._changed:
            self._drop_vanished()
            if len(self._waiting) >= self.max_waiting:
                raise ServerBusyError(
                    f"The server has {len(self._waiting)} requests waiting already; try again "
                    "in a minute."
                )
            self._waiting.append(entry)
            self._admit()
        return Ticket(self, entry)

    def _drop_vanished(self) -> None:
        # Called with the lock held. An entry whose owner thread has ended will never be left: its
        # slot and reservation would be held, or its place at the head kept, for good.
        for entry in [e for e in (*self._running, *self._waiting) if not e.owner.is_alive()]:
            _LOGGER.warning(
                "Work queue: dropped %s %r, whose thread %r ended without leaving the queue.",
                "running" if entry.admitted else "waiting",
                entry.label,
                entry.owner.name,
            )
            self._discard(entry)

    def _discard(self, entry: _Entry) -> None:
        # Called with the lock held: the entry gives up its place, or its slot and reservation.
        if entry in self._waiting:
            self._waiting.remove(entry)
        if entry in self._running:
            self._running.remove(entry)
        if entry.reservation is not None:
            self.budget.release(entry.reservation)
            entry.reservation = None

    def _tidy(self) -> None:
        # Called with the lock held, wherever the queue is consulted.
        self._drop_vanished()
        self._admit()

    def _admit(self) -> None:
        # Called with the lock held. Strictly first come, first served: the head waits for a slot
        # and for memory, and nobody overtakes it.
        while self._waiting and len(self._running) < self.slots:
            head = self._waiting[0]
            try:
                head.reservation = self.budget.reserve(head.estimate)
            except MemoryBudgetError as refusal:
                if self._running:
                    return  # memory may come back when running work finishes
                # Nothing else holds a reservation: it will not fit by waiting.
                head.refused = refusal
                self._waiting.pop(0)
                self._changed.notify_all()
                continue
            self._waiting.pop(0)
            head.admitted = True
            self._running.append(head)
            self._changed.notify_all()

    def _ahead(self, entry: _Entry) -> int:
        with self._changed:
            self._tidy()
            if entry.admitted or entry not in self._waiting:
                return 0
            return self._waiting.index(entry) + len(self._running)

    def _wait(self, entry: _Entry, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while True:
                self._tidy()
                if entry.refused is not None:
                    raise entry.refused
                if entry.admitted:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Bounded, so that an entry ahead whose owner has ended is noticed: nobody
                # leaves for it, so nothing else would wake this thread.
                self._changed.wait(min(remaining, RECHECK_S))

    def _leave(self, entry: _Entry) -> None:
        with self._changed:
            self._discard(entry)
            self._tidy()
            self._changed.notify_all()

    @contextmanager
    def admitted(
        self,
        estimate: WorkEstimate,
        label: str = "",
        *,
        waiting: Callable[[Ticket], None] | None = None,
        poll: float = 0.5,
    ) -> Iterator[Ticket]:
        """Join, wait until admitted (calling ``waiting(ticket)`` every ``poll`` seconds while
        queued: it may raise to give up), run the block, leave.

        Raises:
            MemoryBudgetError, ServerBusyError: as :meth:`join` and :meth:`Ticket.wait`.
        """
        ticket = self.join(estimate, label)
        try:
            while not ticket.wait(poll):
                if waiting is not None:
                    waiting(ticket)
            yield ticket
        finally:
            ticket.leave()


@st.cache_resource(show_spinner=False)
def work_queue() -> WorkQueue:
    """The server process's one queue (created on first use, with the environment's settings)."""
    return WorkQueue(default_slots(), MemoryBudget.from_environment())


def compute_summary(slots: int, limit_bytes: int, *, on_cluster: bool = False) -> str:
    """What this server computes itself, for the sidebar (read-only: set by whoever runs it):
    its heavy-work slots and memory budget. ``on_cluster``: the explainers' logistic regression
    runs on a Dask cluster (:mod:`dashboard.services.cluster`), so this process does the rest."""
    here = (
        f"{slots} piece{'s' if slots != 1 else ''} of heavy work at once, within a memory budget "
        f"of {limit_bytes / 2**30:.1f} GiB"
    )
    if not on_cluster:
        return f"Computed in-process on this server: {here}."
    return (
        "On this server (the RBF SVM, the logistic regression's heatmaps and its copy for the "
        f"Groups, Data cleaning and Attack pages): {here}."
    )


def queue_message(ahead: int, waited: float, what: str) -> str:
    """What a waiting user reads, e.g. "Queued: 2 requests ahead of yours (12 s so far)"."""
    requests = "request" if ahead == 1 else "requests"
    return (
        f"Queued for {what}: **{ahead} {requests} ahead of yours** ({waited:.0f} s so far). "
        "The server runs a few heavy tasks at a time and starts yours as soon as one finishes; "
        "navigate away to cancel."
    )


@contextmanager
def heavy_work(estimate: WorkEstimate) -> Iterator[None]:
    """Run the block as heavy work: queued (showing the user its place) and admitted against
    the memory budget. Use it in a page's script thread.

    Raises:
        MemoryBudgetError: the work cannot fit in the budget (the message says what to change).
        ServerBusyError: the queue is full.
    """
    box = st.empty()
    shown = False

    def show(ticket: Ticket) -> None:
        nonlocal shown
        shown = True
        # Every update is a point where Streamlit stops this script when the user navigates
        # away or closes the tab; the ticket is then given up by the `finally` below.
        box.info(queue_message(ticket.ahead(), time.monotonic() - ticket.joined, estimate.what))

    try:
        with work_queue().admitted(estimate, waiting=show):
            if shown:
                box.empty()
            yield
    finally:
        if shown:
            box.empty()


# ----------------------------------------------------------------------------- estimates


def retraining(what: str, *, new_engine: bool = False) -> Callable[..., WorkEstimate]:
    """``estimate(run, explainer, ...)`` for work that retrains an explainer's models one at a
    time (``new_engine``: each retrained model also gets its own influence engine)."""

    def estimate(run: object, explainer: Explainer, *rest: object) -> WorkEstimate:
        return refit_estimate(what, explainer.model_shapes(), new_engine=new_engine)

    return estimate


def network_run(run: object) -> WorkEstimate:
    """A fragility live run (``run.setting``, ``run.config``): a small network trained, its
    dense Hessian formed (at most ``config.influence.exact_max_params`` parameters; larger
    networks use the last layer's block) and retrained."""
    config = run.config  # type: ignore[attr-defined]
    return network_estimate(
        "a live run of the fragility study",
        n_params=int(config.influence.exact_max_params),
        n_train=int(config.n_train),
        input_dim=int(config.image_size) ** 2,
    )
