"""Background preparations: stopped when nobody watches, bounded per server, queued as heavy
work (without a server: fake builds that only report progress)."""

from __future__ import annotations

import threading
import time

import pytest

from core.budget import MemoryBudget, WorkEstimate
from core.errors import MemoryBudgetError, ServerBusyError
from dashboard.services.background import Preparation, Preparations
from dashboard.services.capacity import WorkQueue
from dashboard.services.settings import DEMO_SPEC, Settings

MIB = 2**20


def endless(job: Preparation) -> object:
    """A build that reports progress until it is stopped."""
    done = 0
    while True:
        job.report("Computing features", done, 10**6)
        done += 1
        time.sleep(0.01)


def test_a_preparation_nobody_watches_stops_at_its_next_progress_report() -> None:
    job = Preparation(endless, abandon_after=0.3)
    for _ in range(5):  # watched: it goes on
        time.sleep(0.1)
        job.touch()
    assert not job.finished
    assert job.wait(5), "the build went on without anybody watching"
    assert job.abandoned and job.result is None
    job._thread.join(timeout=5)
    assert not job.alive


def engine(other_class: int) -> object:
    return Settings(dataset=DEMO_SPEC, classes=(0, other_class)).engine


def test_the_server_prepares_a_bounded_number_of_configurations_at_once() -> None:
    jobs = Preparations(max_unfinished=2, max_finished=4)
    started: list[Preparation] = []

    def start() -> Preparation:
        job = Preparation(endless, abandon_after=60)
        started.append(job)
        return job

    a, b, c = engine(6), engine(1), engine(2)
    first = jobs.get(a, start)
    assert jobs.get(a, start) is first  # one preparation per configuration, shared
    jobs.get(b, start)
    start_time = time.monotonic()
    with pytest.raises(ServerBusyError, match="already preparing 2 other model configurations"):
        jobs.get(c, start)
    assert time.monotonic() - start_time < 1
    assert len(started) == 2 and jobs.unfinished() == 2
    for job in started:  # let them stop
        job.abandon_after = 0
        job.wait(5)
    assert jobs.unfinished() == 0
    # Abandoned ones are started anew by the next visitor; the bound no longer refuses.
    again = jobs.get(a, start)
    assert again is not first and len(started) == 3
    jobs.get(c, start)
    for job in started[2:]:
        job.abandon_after = 0
        job.wait(5)


def test_a_preparation_waits_its_turn_showing_its_place_then_runs() -> None:
    queue = WorkQueue(1, MemoryBudget(10_000 * MIB, resident=lambda: 0))
    holder = queue.join(WorkEstimate("verifying", MIB))
    estimate = WorkEstimate("preparing the models", 100 * MIB)
    ran = threading.Event()

    def build(job: Preparation) -> object:
        with job.admitted(estimate):
            ran.set()
            return "explainer"

    job = Preparation(build, queue=queue, abandon_after=60)
    time.sleep(0.8)
    assert not ran.is_set()
    assert job.snapshot().stage == "Queued: 1 request ahead of this one"
    holder.leave()
    assert job.wait(5) and job.result == "explainer"


def test_a_preparation_that_cannot_fit_reports_the_budget_error() -> None:
    queue = WorkQueue(1, MemoryBudget(500 * MIB, resident=lambda: 100 * MIB))

    def build(job: Preparation) -> object:
        with job.admitted(WorkEstimate("preparing the models", 1000 * MIB)):
            return "explainer"

    job = Preparation(build, queue=queue)
    assert job.wait(5)
    assert isinstance(job.error, MemoryBudgetError)
    assert "Not enough memory on this server for preparing the models" in str(job.error)
