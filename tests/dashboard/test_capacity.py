"""The work queue: a bounded number of slots, first come first served, a memory budget, and the
place in the queue a waiting user is shown."""

from __future__ import annotations

import threading
import time

import pytest

from core.budget import MemoryBudget, WorkEstimate
from core.errors import InfluenceExplorerError, MemoryBudgetError, ServerBusyError
from dashboard.services.capacity import WorkQueue, default_slots, queue_message

MIB = 2**20


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
