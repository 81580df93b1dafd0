"""Where per-shard work runs: on a Dask cluster (:class:`DaskRunner`) or in this process
(:class:`LocalRunner`, used inside a worker's task and by tests of the kernels).

Both offer the same few operations over a list of shards, so the sharded models and engine are
written once:

- ``map(fn, columns, *common)``: ``fn(col_0[i], col_1[i], ..., *common)`` for every shard i; the
  results stay where they were computed (a worker's memory) and come back as handles;
- ``map_sum(fn, columns, *common)``: the sum of those results, brought to the driver. On a
  cluster each worker first sums the results of the shards it holds, one after the other (so at
  most one partial per worker exists, e.g. a p x p Hessian), then the workers' partials are
  summed in a tree;
- ``gather``, ``submit``, ``broadcast`` (ship a large value, e.g. a Cholesky factor, once).

Failures: a worker lost mid-job makes Dask recompute what it held and run its tasks elsewhere;
when that is impossible (the task killed its worker repeatedly, the cluster went away) the error
becomes a :class:`~core.errors.ClusterError` naming the stage (:meth:`Runner.stage`).
"""

from __future__ import annotations

import contextlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from core.errors import ClusterError

#: Partials summed per reduction task above the per-worker level.
SPLIT_EVERY = 4


def add_parts(*parts: Any) -> Any:
    """Sum partial results: numbers, numpy arrays, tensors, and tuples/lists/dicts of them."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(add_parts(*items) for items in zip(*parts, strict=True))
    if isinstance(first, list):
        return [add_parts(*items) for items in zip(*parts, strict=True)]
    if isinstance(first, dict):
        return {key: add_parts(*(p[key] for p in parts)) for key in first}
    if first is None:
        return None
    if isinstance(first, (int, float, np.number)):
        return sum(parts[1:], first)
    total = first.clone() if isinstance(first, torch.Tensor) else np.array(first, copy=True)
    for part in parts[1:]:
        total += part
    return total


def _apply_and_sum(fn: Callable[..., Any], rows: Sequence[Sequence[Any]], *common: Any) -> Any:
    """Run ``fn`` on each row of arguments in turn and sum the results (one worker's share)."""
    total = None
    for args in rows:
        part = fn(*args, *common)
        total = part if total is None else add_parts(total, part)
    return total


class Runner(ABC):
    """Runs per-shard functions; see the module docstring."""

    def __init__(self) -> None:
        self._stage = "work on the cluster"

    @property
    def current_stage(self) -> str:
        return self._stage

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Name the work inside, for error messages ("Fitting: Newton step 3", ...)."""
        previous, self._stage = self._stage, name
        try:
            yield
        finally:
            self._stage = previous

    @property
    @abstractmethod
    def n_workers(self) -> int: ...

    @property
    @abstractmethod
    def distributed(self) -> bool:
        """True when work runs outside this process."""

    @abstractmethod
    def map(
        self, fn: Callable[..., Any], columns: Sequence[Sequence[Any]], *common: Any
    ) -> list[Any]: ...

    @abstractmethod
    def map_sum(
        self,
        fn: Callable[..., Any],
        columns: Sequence[Sequence[Any]],
        *common: Any,
        where: Sequence[Any] | None = None,
    ) -> Any:
        """Σ_i fn(col_0[i], ..., *common). ``where``: per-shard handles whose placement the
        summing follows (default the first column), e.g. the data shards when the first column
        holds results computed next to them."""

    @abstractmethod
    def gather(self, handles: Sequence[Any]) -> list[Any]: ...

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    @abstractmethod
    def broadcast(self, value: Any) -> Any: ...

    def worker_memory(self) -> int | None:
        """The smallest worker memory limit in bytes, if known."""
        return None


class LocalRunner(Runner):
    """Everything in this process, shard after shard; handles are the values themselves."""

    @property
    def n_workers(self) -> int:
        return 1

    @property
    def distributed(self) -> bool:
        return False

    def map(
        self, fn: Callable[..., Any], columns: Sequence[Sequence[Any]], *common: Any
    ) -> list[Any]:
        return [fn(*args, *common) for args in zip(*columns, strict=True)]

    def map_sum(
        self,
        fn: Callable[..., Any],
        columns: Sequence[Sequence[Any]],
        *common: Any,
        where: Sequence[Any] | None = None,
    ) -> Any:
        return _apply_and_sum(fn, list(zip(*columns, strict=True)), *common)

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def broadcast(self, value: Any) -> Any:
        return value


def _lost_work_errors() -> tuple[type[BaseException], ...]:
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return (KilledWorker, FutureCancelledError, CommClosedError, TimeoutError)


class DaskRunner(Runner):
    """Per-shard work as Dask tasks on ``client``'s cluster.

    Args:
        client: a connected ``distributed.Client``.
    """

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.client = client
        self._address = str(getattr(getattr(client, "scheduler", None), "address", "") or "")

    def connected_client(self) -> Any:
        """The client, once it is known to be connected: a client that lost its scheduler
        fails deep inside Dask (or waits out its timeout), so refuse the work with a message
        naming the stage instead.

        Raises:
            ClusterError: the client is not running (reconnecting or closed).
        """
        status = str(getattr(self.client, "status", "running"))
        if status != "running":
            raise ClusterError(
                f"{self._stage}: the Dask scheduler {self._address or ''} is not reachable (the "
                f"client is {status}). Start it again, then connect again (the dashboard's "
                "sidebar has a button for it; the command line connects on every run)."
            )
        return self.client

    def _workers(self) -> dict[str, Any]:
        return dict(self.connected_client().scheduler_info(n_workers=-1)["workers"])

    @property
    def n_workers(self) -> int:
        return max(1, len(self._workers()))

    @property
    def distributed(self) -> bool:
        return True

    def worker_memory(self) -> int | None:
        limits = [int(w.get("memory_limit") or 0) for w in self._workers().values()]
        limits = [m for m in limits if m > 0]
        return min(limits) if limits else None

    def _key(self, fn: Callable[..., Any]) -> str:
        # Readable in Dask's dashboard and logs: the stage and the function.
        stage = "".join(c if c.isalnum() else "-" for c in self._stage.lower())[:40]
        return f"{stage}-{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex[:12]}"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.connected_client().submit(fn, *args, pure=False, key=self._key(fn))

    def map(
        self, fn: Callable[..., Any], columns: Sequence[Sequence[Any]], *common: Any
    ) -> list[Any]:
        return [self.submit(fn, *args, *common) for args in zip(*columns, strict=True)]

    def map_sum(
        self,
        fn: Callable[..., Any],
        columns: Sequence[Sequence[Any]],
        *common: Any,
        where: Sequence[Any] | None = None,
    ) -> Any:
        rows = list(zip(*columns, strict=True))
        partials = []
        for worker, members in self._group_by_worker(columns[0] if where is None else where):
            # Where the shards are, but elsewhere if that worker is gone or busy.
            placement = {} if worker is None else {"workers": [worker], "allow_other_workers": True}
            partials.append(
                self.connected_client().submit(
                    _apply_and_sum,
                    fn,
                    [rows[i] for i in members],
                    *common,
                    pure=False,
                    key=self._key(fn),
                    **placement,
                )
            )
        while len(partials) > 1:
            partials = [
                self.client.submit(
                    add_parts, *partials[i : i + SPLIT_EVERY], pure=False, key=self._key(add_parts)
                )
                for i in range(0, len(partials), SPLIT_EVERY)
            ]
        return self.gather(partials)[0]

    def _group_by_worker(self, handles: Sequence[Any]) -> list[tuple[str | None, list[int]]]:
        """Shard positions grouped by the worker holding ``handles[i]``, so each worker sums
        its own shards' results; positions whose holder is unknown are spread over groups."""
        from distributed import Future

        futures = [h for h in handles if isinstance(h, Future)]
        holders: dict[str, Any] = {}
        if futures:
            with contextlib.suppress(Exception):  # best effort: placement is only a hint
                holders = self.client.who_has(futures)
        groups: dict[str, list[int]] = {}
        unplaced = []
        for i, handle in enumerate(handles):
            where = holders.get(handle.key) if isinstance(handle, Future) else None
            if where:
                groups.setdefault(sorted(where)[0], []).append(i)
            else:
                unplaced.append(i)
        out: list[tuple[str | None, list[int]]] = list(groups.items())
        if unplaced:
            # No placement known (not computed yet): split them evenly, placed by the scheduler.
            n = max(1, min(self.n_workers, len(unplaced)))
            out.extend((None, unplaced[j::n]) for j in range(n))
        return out

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        try:
            return list(self.connected_client().gather(list(handles)))
        except _lost_work_errors() as error:
            raise ClusterError(
                f"{self._stage}: the cluster lost work it could not recover "
                f"({type(error).__name__}: {error}). A worker died more often than Dask retries a "
                "task (out of memory? see the workers' logs), or the scheduler went away. Check "
                "the cluster and run again."
            ) from error
        except MemoryError as error:
            raise ClusterError(
                f"{self._stage}: a worker ran out of memory. Use more workers or smaller shards."
            ) from error

    def broadcast(self, value: Any) -> Any:
        # A copy on every worker: losing one worker loses no copy the others need.
        return self.connected_client().scatter(value, broadcast=True, hash=False)


__all__ = ["DaskRunner", "LocalRunner", "Runner", "add_parts"]
