"""Run an experiment once and remember its result for this session.

Every page that runs something expensive (Verify, Groups, Data cleaning, Attack, Trust's live run)
follows one flow: a button computes the result for the page's settings, and the result is shown
again, without a click, whenever the user comes back to the same settings. A
:class:`SessionRuns` is that flow for one kind of result: the computation (usually an
``st.cache_data`` function, so sessions asking the same question share it) and a bounded,
per-session memory of what this session asked for, keyed by a frozen description of the run.

:class:`StageProgress` is the progress bar such a cached computation draws.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import streamlit as st

from core.budget import WorkEstimate
from dashboard.services.capacity import heavy_work

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: Results of one kind remembered per session (oldest dropped first), to keep sessions small.
MAX_RESULTS_PER_SESSION = 10


class SessionRuns(Generic[K, T]):
    """One kind of result: how to compute it, and the ones this session asked for.

    Args:
        slot: the session-state key holding the remembered results (starts with ``state_``).
        compute: ``compute(key, *args)`` computes the result the run ``key`` describes; ``args``
            are what must not key anything (the explainer, a progress callback).
        limit: results remembered per session; asking again moves a result to the newest.
        estimate: ``estimate(key, *args)``, the memory the computation needs; when given, it
            runs as heavy work (:func:`~dashboard.services.capacity.heavy_work`): queued behind
            other heavy work, the user shown its place, and refused if it cannot fit the
            server's memory budget.
    """

    def __init__(
        self,
        slot: str,
        compute: Callable[..., T],
        *,
        limit: int = MAX_RESULTS_PER_SESSION,
        estimate: Callable[..., WorkEstimate] | None = None,
    ) -> None:
        self.slot = slot
        self._compute = compute
        self.limit = int(limit)
        self._estimate = estimate

    def remembered(self, key: K) -> T | None:
        """This session's earlier result for exactly this run, if any."""
        return st.session_state.get(self.slot, {}).get(key)

    def remembered_keys(self) -> list[K]:
        """The runs remembered in this session, oldest first."""
        return list(st.session_state.get(self.slot, {}))

    def run(self, key: K, *args: Any) -> T:
        """Compute the run and remember its result for this session.

        Raises:
            Whatever ``compute`` raises (e.g. a domain error), or MemoryBudgetError /
            ServerBusyError when the server cannot take the work; nothing is remembered then.
        """
        if self._estimate is None:
            result = self._compute(key, *args)
        else:
            with heavy_work(self._estimate(key, *args)):
                result = self._compute(key, *args)
        self.remember(key, result)
        return result

    def remember(self, key: K, result: T) -> None:
        """Remember a result for this session (e.g. one read back from the artifact store)."""
        remembered = dict(st.session_state.get(self.slot, {}))
        remembered.pop(key, None)  # re-inserted below, as the newest
        remembered[key] = result
        while len(remembered) > self.limit:
            remembered.pop(next(iter(remembered)))
        st.session_state[self.slot] = remembered


class StageProgress:
    """``progress(stage, done, total)`` shown as a progress bar, for a cached computation.

    Create it inside the cached function: Streamlit records what a cached function draws and
    replays it on a cache hit, and a bar created outside the function would not exist during the
    replay (CacheReplayClosureError). Updates are thinned to whole percents so a replay stays
    short. Each update is also where Streamlit stops the run when the user navigates away; the
    computation stops with it and nothing is cached.
    """

    def __init__(self, title: str) -> None:
        self._title = title
        self._bar = st.progress(0.0, text=f"{title}: starting…")
        self._last: tuple[str, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        fraction = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        mark = (stage, int(100 * fraction))
        if mark == self._last:
            return
        self._last = mark
        self._bar.progress(fraction, text=f"{self._title} · {stage}: {done}/{total}")

    def clear(self) -> None:
        self._bar.empty()
