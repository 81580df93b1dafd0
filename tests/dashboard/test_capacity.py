"""The work queue: a bounded number of slots, first come first served, a memory budget, and the
place in the queue a waiting user is shown; requests that leave while queued, and entries whose
thread has ended without leaving."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException
from streamlit.runtime.scriptrunner_utils.script_requests import RerunData

from core.budget import MemoryBudget, WorkEstimate
from core.errors import InfluenceExplorerError, MemoryBudgetError, ServerBusyError
from dashboard.services import capacity
from dashboard.services.background import Preparation
from dashboard.services.capacity import WorkQueue, default_slots, queue_message
from dashboard.services.runs import SessionRuns

MIB = 2**20
#: Seconds a test waits for something that happens within a second or two when the queue works
#: (generous for a busy machine; reached only when the queue is stuck).
STUCK_AFTER_S = 20.0


def work(mib: int, what: str = "verifying by retraining") -> WorkEstimate:
    return WorkEstimate(what, mib * MIB, {"the kernel": mib * MIB}, "Choose fewer images.")


def budget(limit_mib: int, resident_mib: int = 100) -> MemoryBudget:
    return MemoryBudget(limit_mib * MIB, resident=lambda: resident_mib * MIB)


def test_no_more_than_the_slots_run_and_the_rest_wait_first_come_first_served() -> None:
    queue = WorkQueue(2, budget(10_000))
    tickets = [queue.join(work(10), f"job {i}") for i in range(5)]
    assert [t.admitted for t in tickets] == [True, True, False, False, False]
    assert queue.running == 2 and queue.waiting == 3
    # What each waiting user is told: the two running plus those queued before it.
    assert [t.ahead() for t in tickets] == [0, 0, 2, 3, 4]

    tickets[1].leave()
    assert tickets[2].admitted and not tickets[3].admitted
    assert [t.ahead() for t in tickets[3:]] == [2, 3]
    tickets[3].leave()  # a user who navigates away gives up the place
    assert tickets[4].ahead() == 2
    tickets[0].leave()
    assert tickets[4].admitted
    tickets[2].leave()
    tickets[4].leave()
    assert queue.running == 0 and queue.waiting == 0


def test_leaving_twice_frees_one_slot_only() -> None:
    queue = WorkQueue(1, budget(10_000))
    first, second, third = (queue.join(work(10)) for _ in range(3))
    first.leave()
    first.leave()
    assert second.admitted and not third.admitted


def test_a_waiting_thread_is_admitted_when_a_slot_frees() -> None:
    queue = WorkQueue(1, budget(10_000))
    holder = queue.join(work(10))
    seen: list[int] = []
    order: list[str] = []

    def other() -> None:
        with queue.admitted(
            work(10), waiting=lambda ticket: seen.append(ticket.ahead()), poll=0.02
        ):
            order.append("other ran")

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.2)
    assert order == [] and seen and set(seen) == {1}  # told one request is ahead, repeatedly
    holder.leave()
    thread.join(timeout=5)
    assert order == ["other ran"]
    assert queue.running == 0


def test_work_that_cannot_fit_even_alone_is_refused_at_once_with_what_it_needs() -> None:
    queue = WorkQueue(2, budget(1000, resident_mib=600))
    start = time.monotonic()
    with pytest.raises(MemoryBudgetError) as refused:
        queue.join(work(500))
    assert time.monotonic() - start < 1
    message = str(refused.value)
    assert "verifying by retraining" in message
    assert "500 MiB" in message and "400 MiB" in message  # needs, and what is free
    assert "mostly the kernel" in message and "Choose fewer images." in message
    assert "INFLUENCE_MEMORY_BUDGET" in message
    assert refused.value.needed == 500 * MIB and refused.value.free == 400 * MIB
    assert queue.waiting == 0


def test_work_that_fits_only_once_running_work_ends_waits_for_its_memory() -> None:
    queue = WorkQueue(4, budget(1000, resident_mib=100))
    big = queue.join(work(600))
    second = queue.join(work(600))  # a slot is free, the memory is not
    third = queue.join(work(10))  # first come, first served: it does not overtake
    assert big.admitted and not second.admitted and not third.admitted
    assert queue.budget.reserved == 600 * MIB
    big.leave()
    assert second.admitted and third.admitted
    assert queue.budget.reserved == 610 * MIB
    second.leave()
    third.leave()
    assert queue.budget.reserved == 0


def test_work_that_stops_fitting_while_it_waits_is_refused_when_nothing_else_runs() -> None:
    resident = [100 * MIB]
    queue = WorkQueue(1, MemoryBudget(1000 * MIB, resident=lambda: resident[0]))
    holder = queue.join(work(500))
    waiting = queue.join(work(500))
    resident[0] = 700 * MIB  # the process grew meanwhile (e.g. sessions' pages)
    holder.leave()
    with pytest.raises(MemoryBudgetError, match="Not enough memory"):
        waiting.wait(1)


def test_a_full_queue_says_so() -> None:
    queue = WorkQueue(1, budget(10_000), max_waiting=2)
    _tickets = [queue.join(work(1)) for _ in range(3)]
    with pytest.raises(ServerBusyError, match="2 requests waiting already"):
        queue.join(work(1))


def test_the_waiting_message_counts_requests_ahead() -> None:
    assert "**1 request ahead of yours**" in queue_message(1, 3.2, "verifying")
    text = queue_message(2, 12.4, "verifying by retraining")
    assert "Queued for verifying by retraining: **2 requests ahead of yours** (12 s so far)" in text
    assert "navigate away to cancel" in text


def test_the_number_of_slots_comes_from_the_environment() -> None:
    assert default_slots({"INFLUENCE_WORKERS": "3"}) == 3
    assert default_slots({}) >= 1
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(InfluenceExplorerError, match="INFLUENCE_WORKERS"):
            default_slots({"INFLUENCE_WORKERS": bad})


# ------------------------------------------------- requests that leave, owners that have ended


class Session:
    """A session's script thread running heavy work the way a page does: ``SessionRuns.run``
    through the real :func:`~dashboard.services.capacity.heavy_work`, whose queue notice is drawn
    into a stand-in for ``st.empty()``. Streamlit stops a script (the user navigates away, closes
    the tab, or a widget reruns the page) by raising at its next ``st`` call; :meth:`interrupt`
    does the same at the next notice. A script thread outlives a rerun (it runs the page again),
    so this one stays alive after its run until :meth:`end`."""

    def __init__(self, name: str, runs: SessionRuns, gate: threading.Event | None = None) -> None:
        self.name = name
        self.runs = runs
        self.gate = gate  # the work blocks on it, if given (to hold a slot)
        self.notices: list[str] = []
        self.outcome: str | BaseException | None = None
        self.done = threading.Event()
        self._raise: BaseException | None = None
        self._end = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        _SESSIONS[threading.get_ident()] = self
        try:
            self.runs.run(self.name, self)
            self.outcome = "ran"
        except BaseException as exc:  # what Streamlit's script runner would catch
            self.outcome = exc
        finally:
            self.done.set()
        self._end.wait(STUCK_AFTER_S * 3)

    def start(self) -> Session:
        self.thread.start()
        return self

    def interrupt(self, exc: BaseException) -> None:
        self._raise = exc

    def draw(self, text: str | None) -> None:
        if self._raise is not None:
            raise self._raise
        if text is not None:
            self.notices.append(text)

    def end(self) -> None:
        """Stop waiting if still queued, let the work finish if held, and let the thread end."""
        if not self.done.is_set():
            self.interrupt(StopException())
        if self.gate is not None:
            self.gate.set()
        self._end.set()
        self.thread.join(timeout=STUCK_AFTER_S)


_SESSIONS: dict[int, Session] = {}


class _Box:
    """``st.empty()`` in a :class:`Session`'s thread: where heavy_work draws its queue notice."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def info(self, text: str) -> None:
        self._session.draw(text)

    def empty(self) -> None:
        self._session.draw(None)


def _compute(key: str, session: Session) -> str:
    if session.gate is not None:
        session.gate.wait(STUCK_AFTER_S * 3)
    return f"verified {key}"


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Session]]:
    """``make(name, queue, mib=10, gate=None)``: a Session whose heavy work goes to ``queue``;
    every session is ended after the test, stuck or not."""
    made: list[Session] = []
    queues: list[WorkQueue] = []
    monkeypatch.setattr(capacity, "work_queue", lambda: queues[-1])
    monkeypatch.setattr(st, "empty", lambda: _Box(_SESSIONS[threading.get_ident()]))
    slot = "state_test_capacity_runs"

    def make(
        name: str, queue: WorkQueue, mib: int = 10, gate: threading.Event | None = None
    ) -> Session:
        if not queues or queues[-1] is not queue:
            queues.append(queue)
        # Every request asks for the same work: equal estimates, equal labels (as sessions
        # verifying on the same models do).
        runs = SessionRuns(slot, _compute, estimate=lambda key, session: work(mib))
        made.append(Session(name, runs, gate))
        return made[-1]

    yield make
    for session in made:
        session.end()
    _SESSIONS.clear()
    st.session_state.pop(slot, None)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STUCK_AFTER_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_each_of_many_requests_for_the_same_work_is_told_its_own_place() -> None:
    # Equal estimates and labels (sessions verifying on the same models): equal in every field.
    queue = WorkQueue(2, budget(10_000))
    tickets = [queue.join(work(10)) for _ in range(5)]
    assert [t.ahead() for t in tickets] == [0, 0, 2, 3, 4]


def test_a_request_that_leaves_takes_only_its_own_place() -> None:
    # Two requests for the same work are equal in every field while they wait; leaving must
    # still remove the one that leaves, not the first equal one.
    queue = WorkQueue(1, budget(10_000))
    holder, first, second = (queue.join(work(10)) for _ in range(3))
    second.leave()
    assert first.ahead() == 1 and queue.waiting == 1
    holder.leave()
    assert first.admitted and not second.admitted
    assert queue.running == 1 and queue.waiting == 0
    first.leave()
    assert queue.running == 0 and queue.budget.reserved == 0


@pytest.mark.parametrize(
    "interruption",
    [RerunException(RerunData()), StopException()],
    ids=["rerun (a widget, another page)", "stop (the tab closed)"],
)
def test_a_session_that_navigates_away_while_queued_strands_nobody(
    sessions: Callable[..., Session], interruption: BaseException
) -> None:
    """Issue 19: verifications left waiting for good. Three sessions verify on the same models
    with one slot; the third navigates away while queued (as the notice tells users to). The
    second must then run once the first finishes, and the third must not hold a slot."""
    queue = WorkQueue(1, budget(10_000))
    running = sessions("running", queue, gate=threading.Event()).start()
    until(lambda: queue.running == 1, "the first session's work runs")
    second = sessions("second", queue).start()
    until(lambda: queue.waiting == 1, "the second session is queued")
    third = sessions("third", queue).start()
    until(lambda: queue.waiting == 2, "the third session is queued behind it")
    until(lambda: bool(third.notices), "the third session is told its place")

    third.interrupt(interruption)
    assert third.done.wait(STUCK_AFTER_S) and third.outcome is interruption
    assert queue.waiting == 1
    assert running.gate is not None
    running.gate.set()  # the first session's work finishes

    assert second.done.wait(STUCK_AFTER_S), (
        f"the second session never ran (queue: {queue.running} running, {queue.waiting} "
        f"waiting; it was last told: {second.notices[-1:]})"
    )
    # The first session's thread leaves the queue before its run returns (it then remembers
    # the result), so the second may finish first: wait for both.
    assert running.done.wait(STUCK_AFTER_S)
    assert running.outcome == "ran" and second.outcome == "ran"
    assert queue.running == 0 and queue.waiting == 0 and queue.budget.reserved == 0


def _ended_thread(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, name="ended-without-leaving")
    thread.start()
    thread.join(timeout=STUCK_AFTER_S)
    assert not thread.is_alive()
    return thread


def test_work_whose_thread_ended_without_leaving_gives_its_slot_and_memory_back(
    sessions: Callable[..., Session],
) -> None:
    # Budget 1000 MiB, 100 MiB resident: the ghost's 600 MiB reservation leaves too little for
    # the next 600 MiB request, which must run once the ghost is dropped.
    queue = WorkQueue(1, budget(1000, resident_mib=100))
    tickets = []
    _ended_thread(lambda: tickets.append(queue.join(work(600))))
    assert tickets[0].admitted and queue.budget.reserved == 600 * MIB  # admitted at join
    waiting = sessions("waiting", queue, mib=600).start()
    assert waiting.done.wait(STUCK_AFTER_S), f"stuck behind the ended thread: {waiting.notices}"
    assert waiting.outcome == "ran"
    assert queue.running == 0 and queue.waiting == 0 and queue.budget.reserved == 0
    tickets[0].leave()  # a late leave is harmless
    assert queue.budget.reserved == 0


def test_a_queued_entry_whose_thread_ended_is_not_admitted_or_counted(
    sessions: Callable[..., Session],
) -> None:
    queue = WorkQueue(1, budget(10_000))
    holder = sessions("holder", queue, gate=threading.Event()).start()
    until(lambda: queue.running == 1, "the holder runs")
    _ended_thread(lambda: queue.join(work(10)))  # queued at the head, then its thread ended
    waiting = sessions("waiting", queue).start()
    until(lambda: bool(waiting.notices), "the waiting session is told its place")
    # Only the running holder is ahead: the ended thread's place is not counted.
    assert "**1 request ahead of yours**" in waiting.notices[-1]
    assert holder.gate is not None
    holder.gate.set()
    assert waiting.done.wait(STUCK_AFTER_S), f"stuck behind the ended thread: {waiting.notices}"
    assert waiting.outcome == "ran" and queue.running == 0 and queue.waiting == 0


def test_a_preparation_is_not_stuck_behind_work_whose_thread_ended() -> None:
    queue = WorkQueue(1, budget(10_000))
    _ended_thread(lambda: queue.join(work(10)))  # admitted, holding the only slot

    def build(job: Preparation) -> object:
        with job.admitted(work(100, "preparing the models")):
            return "explainer"

    job = Preparation(build, queue=queue, abandon_after=STUCK_AFTER_S * 3)
    assert job.wait(STUCK_AFTER_S), f"the preparation is stuck at {job.snapshot().stage!r}"
    assert job.result == "explainer" and queue.running == 0


def test_the_sidebar_says_what_this_server_computes_itself():
    alone = capacity.compute_summary(2, 6 * 2**30)
    assert alone == (
        "Computed in-process on this server: 2 pieces of heavy work at once, within a memory "
        "budget of 6.0 GiB."
    )
    assert "1 piece of heavy work" in capacity.compute_summary(1, 2**30)
    beside = capacity.compute_summary(2, 2**30, on_cluster=True)
    assert beside.startswith("On this server (the RBF SVM")
    assert "Groups, Data cleaning and Attack" in beside and "1.0 GiB" in beside
