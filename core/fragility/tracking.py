"""Progress of one or many cells as ``progress(done, total, stage)``."""

from __future__ import annotations

from collections.abc import Callable

#: progress(done, total, stage): units done of the total planned, and what is running now.
Progress = Callable[[int, int, str], None]


class Tracker:
    """Maps stage-level progress of one or many cells onto progress(done, total, stage)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = max(total, 1)
        self.done = 0
        self.prefix = ""

    def stage(self, text: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, f"{self.prefix}{text}")

    def advance(self, units: int, text: str) -> None:
        self.done = min(self.done + units, self.total)
        self.stage(text)

    def inner(self, units: int, text: str) -> Callable[[int, int], None]:
        """A (done, total) callback that spreads ``units`` over an inner loop."""
        start = self.done

        def callback(done: int, total: int) -> None:
            self.done = min(start + units * done // max(total, 1), self.total)
            self.stage(text)

        return callback

    def finish(self, start: int, units: int) -> None:
        self.done = min(start + units, self.total)
