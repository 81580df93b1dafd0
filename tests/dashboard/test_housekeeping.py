"""Housekeeping: uploaded files bounded per session, in all and by age, on Streamlit's own
in-memory manager; sessions shut down once they have been gone for the grace period.

The same bounds against a real server (60 files of 9.9 MB posted past the widget) are in
``tests/e2e/test_hardening_e2e.py``.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

import pytest
from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
from streamlit.runtime.uploaded_file_manager import UploadedFileRec

from core.errors import MemoryBudgetError
from dashboard.services import housekeeping
from dashboard.services.housekeeping import Janitor, UploadBounds, upload_memory_limit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def post(manager: MemoryUploadedFileManager, session: str, name: str, size: int) -> None:
    manager.add_file(session, UploadedFileRec(name, f"{name}.png", "image/png", b"x" * size))


def held(manager: MemoryUploadedFileManager) -> dict[str, list[str]]:
    return {s: list(files) for s, files in manager.file_storage.items() if files}


@pytest.fixture
def manager() -> MemoryUploadedFileManager:
    return MemoryUploadedFileManager("/_stcore/upload_file")


def test_a_session_keeps_only_its_newest_files(manager: MemoryUploadedFileManager) -> None:
    bounds = UploadBounds(manager, per_session=2, total_bytes=10**9)
    assert bounds.install()
    for i in range(60):
        post(manager, "flooder", f"f{i}", 1000)
    post(manager, "neighbour", "mine", 1000)
    assert held(manager) == {"flooder": ["f58", "f59"], "neighbour": ["mine"]}
    assert bounds.removed == 58
    # The widget's own read of the newest file still works.
    assert [f.file_id for f in manager.get_files("flooder", ["f59"])] == ["f59"]


def test_all_sessions_together_keep_at_most_the_byte_bound_oldest_first(
    manager: MemoryUploadedFileManager,
) -> None:
    clock = Clock()
    bounds = UploadBounds(manager, per_session=2, total_bytes=3000, clock=clock)
    bounds.install()
    for session in ("a", "b", "c", "d"):
        clock.now += 1
        post(manager, session, f"{session}1", 1000)
    assert held(manager) == {"b": ["b1"], "c": ["c1"], "d": ["d1"]}
    assert bounds.held_bytes() == 3000
    # A file larger than the bound on its own is kept (Streamlit's maxUploadSize bounds it);
    # everything older goes.
    clock.now += 1
    post(manager, "e", "e1", 5000)
    assert held(manager) == {"e": ["e1"]}


def test_files_nobody_used_expire(manager: MemoryUploadedFileManager) -> None:
    clock = Clock()
    bounds = UploadBounds(manager, per_session=2, total_bytes=10**9, max_age=600, clock=clock)
    bounds.install()
    post(manager, "a", "old", 10)
    clock.now = 500
    post(manager, "b", "new", 10)
    assert bounds.expire() == 0
    clock.now = 601
    assert bounds.expire() == 1
    assert held(manager) == {"b": ["new"]}


def test_installing_twice_wraps_once_and_an_unknown_manager_is_left_alone(
    manager: MemoryUploadedFileManager,
) -> None:
    bounds = UploadBounds(manager, per_session=1)
    assert bounds.install() and bounds.install()
    post(manager, "a", "1", 10)
    post(manager, "a", "2", 10)
    assert held(manager) == {"a": ["2"]} and bounds.removed == 1
    assert not UploadBounds(object()).install()


def test_the_upload_memory_bound_comes_from_the_environment() -> None:
    assert upload_memory_limit({}) == 256 * 2**20
    assert upload_memory_limit({"INFLUENCE_UPLOAD_MEMORY": "1G"}) == 2**30
    with pytest.raises(MemoryBudgetError, match="not a memory size"):
        upload_memory_limit({"INFLUENCE_UPLOAD_MEMORY": "lots"})


@dataclass
class FakeRuntime:
    """What the janitor uses of Streamlit's Runtime: which sessions are connected, and the
    thread-safe call that shuts a stored (disconnected) session down."""

    active: set[str] = field(default_factory=set)
    shut_down: list[str] = field(default_factory=list)

    def is_active_session(self, session_id: str) -> bool:
        return session_id in self.active

    def clear_user_info_for_session(self, session_id: str) -> None:
        self.shut_down.append(session_id)


def test_a_session_gone_for_the_grace_period_is_shut_down_and_its_files_freed(
    manager: MemoryUploadedFileManager,
) -> None:
    clock = Clock()
    bounds = UploadBounds(manager, total_bytes=10**9, max_age=10**6, clock=clock)
    bounds.install()
    runtime = FakeRuntime(active={"stays", "leaves"})
    janitor = Janitor(runtime, bounds, grace=30, clock=clock)
    janitor.seen("stays")
    janitor.seen("leaves")
    post(manager, "leaves", "upload", 100)
    post(manager, "stays", "upload", 100)
    post(manager, "never-ran", "flood", 100)  # posted files, never ran a script
    assert janitor.tick() == 0

    runtime.active = {"stays"}
    clock.now = 20
    assert janitor.tick() == 0  # a reload or a network blip reconnects within the grace
    clock.now = 31
    assert janitor.tick() == 2
    assert sorted(runtime.shut_down) == ["leaves", "never-ran"]
    assert held(manager) == {"stays": ["upload"]}
    clock.now = 1000
    assert janitor.tick() == 0  # the connected session is never closed
    assert runtime.shut_down.count("leaves") == 1


def test_after_a_session_ends_garbage_is_collected_and_memory_trimmed_on_the_next_sweeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A closed session's objects hold each other in cycles; Streamlit closes it on its event
    # loop after the sweep that asked, so the release must come on the sweeps after too.
    trims: list[float] = []
    monkeypatch.setattr(housekeeping, "release_freed_memory", lambda: trims.append(clock.now))
    clock = Clock()
    runtime = FakeRuntime(active={"leaves"})
    janitor = Janitor(runtime, None, grace=30, clock=clock)
    janitor.seen("leaves")
    janitor.tick()
    assert trims == []  # nothing ended, nothing to release

    class Node:
        pass

    def closed_session() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle, as a closed session's objects are
        return weakref.ref(a)

    runtime.active = set()
    clock.now = 31
    assert janitor.tick() == 1
    enabled = gc.isenabled()
    gc.disable()  # only the janitor's own collection may free the cycle
    try:
        gone = closed_session()  # garbage that appears after the sweep that closed the session
        assert gone() is not None
        for now in (33, 35):
            clock.now = now
            assert janitor.tick() == 0
        assert gone() is None
    finally:
        if enabled:
            gc.enable()
    assert trims == [31, 33, 35]
    clock.now = 37
    janitor.tick()
    assert trims == [31, 33, 35]  # RELEASE_SWEEPS sweeps, then quiet until something ends again


def test_shared_results_are_dropped_only_when_the_last_session_has_ended() -> None:
    dropped: list[float] = []
    clock = Clock()
    runtime = FakeRuntime(active={"a", "b"})
    janitor = Janitor(runtime, None, grace=30, clock=clock, when_idle=lambda: dropped.append(1))
    janitor.seen("a")
    janitor.seen("b")
    janitor.tick()
    runtime.active = {"b"}
    clock.now = 31
    assert janitor.tick() == 1 and dropped == []  # "b" is still there to share them
    runtime.active = set()
    clock.now = 40
    assert janitor.tick() == 0  # "b" left, but is within its grace
    clock.now = 71
    assert janitor.tick() == 1 and dropped == [1]
    clock.now = 200
    janitor.tick()
    assert dropped == [1]  # once per time the server falls idle
