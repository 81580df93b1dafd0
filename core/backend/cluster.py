"""Connecting to a Dask cluster, checking it, and describing it.

:func:`connect` turns a :class:`~core.backend.ClusterSpec` into a :class:`Cluster` (a
``distributed.Client``, the local cluster it started if any, and a
:class:`~core.backend.runner.DaskRunner`). Before any work it checks that the driver, scheduler
and workers run the same versions of the packages that matter (Dask's own check,
``client.get_versions(check=True)``, extended with torch, numpy, scipy and this package, and the
code of the kernels the workers will run), so a mismatch is one clear message, not a strange
failure in the middle of a fit.

:func:`cluster_info` is what a front end shows: the scheduler's address, the workers, their
threads and memory, and whether they have a GPU.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.backend import ClusterSpec, cluster_spec
from core.backend.runner import DaskRunner
from core.errors import ClusterError

#: Seconds to wait for a scheduler (and for a local cluster's workers) before giving up.
CONNECT_TIMEOUT = 20

#: Packages whose versions must match between the driver and every worker (besides Dask's own
#: list: dask, distributed, msgpack, cloudpickle, tornado, toolz, numpy, pandas, lz4, python).
CHECKED_PACKAGES: tuple[str, ...] = ("torch", "numpy", "scipy", "influence-explorer")


@dataclass(frozen=True)
class WorkerInfo:
    """One worker, for display.

    Attributes:
        address: its address.
        threads: threads it runs tasks on.
        memory_limit: bytes it may use (0 when unlimited).
    """

    address: str
    threads: int
    memory_limit: int


@dataclass(frozen=True)
class ClusterInfo:
    """What a front end shows about where the engine runs.

    Attributes:
        mode: "in-process", "local" (a LocalCluster this process started), "remote" (reached
            by address) or "attached" (a client the caller made).
        address: the scheduler's address ("" in-process).
        workers: one :class:`WorkerInfo` each (empty in-process).
        devices: how many workers have a CUDA GPU.
    """

    mode: str
    address: str
    workers: tuple[WorkerInfo, ...]
    devices: int = 0

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def threads(self) -> int:
        return sum(w.threads for w in self.workers)

    @property
    def memory(self) -> int:
        """Total worker memory limit in bytes."""
        return sum(w.memory_limit for w in self.workers)

    def summary(self) -> str:
        """One line, e.g. "Dask cluster tcp://10.0.0.5:8786: 16 workers, 16 threads, 250 GiB"."""
        if self.mode == "in-process":
            return "In-process (no cluster; set INFLUENCE_CLUSTER to use one)"
        kind = "local Dask cluster" if self.mode == "local" else "Dask cluster"
        gpus = f", {self.devices} with a GPU" if self.devices else ""
        return (
            f"{kind} {self.address}: {self.n_workers} worker{'s' if self.n_workers != 1 else ''}"
            f"{gpus}, {self.threads} thread{'s' if self.threads != 1 else ''}, "
            f"{self.memory / 2**30:.1f} GiB memory"
        )


IN_PROCESS = ClusterInfo(mode="in-process", address="", workers=())


def _kernel_fingerprint() -> str:
    """A digest of the code the workers run for us (the backend's modules), so that a worker
    with another version of it is refused before it computes something different."""
    digest = hashlib.sha256()
    for name in ("kernels.py", "shards.py", "models.py", "engine.py", "runner.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def _worker_identity() -> dict[str, Any]:
    """Run on every worker: can it import this package, at which version and code?"""
    import torch

    import core

    return {
        "version": core.__version__,
        "code": _kernel_fingerprint(),
        "cuda": bool(torch.cuda.is_available()),
    }


class Cluster:
    """A connected cluster: the Dask client, the local cluster it started (if any), a runner.

    Use as a context manager, or call :meth:`close`.

    Attributes:
        spec: what was asked for.
        client: the ``distributed.Client``.
        runner: a :class:`~core.backend.runner.DaskRunner` on it.
    """

    def __init__(self, spec: ClusterSpec, client: Any, local: Any | None) -> None:
        self.spec = spec
        self.client = client
        self._local = local
        self.runner = DaskRunner(client)
        self._cuda: dict[str, bool] = {}

    def info(self) -> ClusterInfo:
        """The cluster now: address, workers, threads, memory, GPUs."""
        return cluster_info(self)

    def close(self) -> None:
        """Disconnect, and stop the local cluster if this process started it."""
        # Shutting down spawned workers logs a warning per worker that is slow to exit; the
        # workers are ours and being stopped on purpose.
        logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
        try:
            self.client.close()
        finally:
            if self._local is not None:
                self._local.close()
                self._local = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    spec: ClusterSpec | str | None = None,
    *,
    timeout: float = CONNECT_TIMEOUT,
    check: bool = True,
) -> Cluster:
    """Start or reach the cluster ``spec`` describes (default: ``$INFLUENCE_CLUSTER``).

    ``local:N`` starts N single-threaded worker processes on this machine (the calling
    script needs an ``if __name__ == "__main__":`` guard); ``tcp://``/``tls://`` connects to
    a running scheduler.

    Args:
        spec: a :class:`~core.backend.ClusterSpec` or its text form.
        timeout: seconds to wait for the scheduler and workers.
        check: verify package versions and the workers' code before returning.
    Raises:
        ClusterError: no cluster configured, unreachable, or mismatched versions.
    """
    if isinstance(spec, str):
        spec = ClusterSpec.parse(spec, source="connect()")
    elif spec is None:
        spec = cluster_spec()
        if spec is None:
            raise ClusterError(
                "No cluster is configured: set INFLUENCE_CLUSTER to 'local:N', "
                "'tcp://HOST:PORT' or 'tls://HOST:PORT' (or pass one to connect())."
            )
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise ClusterError(
            "Running on a cluster needs Dask: pip install 'influence-explorer[cluster]' "
            "(on the driver, the scheduler and every worker)."
        ) from error
    local = None
    try:
        if spec.kind == "local":
            local = LocalCluster(
                n_workers=spec.n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                timeout=timeout,
            )
            client = Client(local, timeout=timeout)
        else:
            client = Client(spec.address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        if local is not None:
            local.close()
        where = f"the scheduler at {spec.address}" if spec.kind == "remote" else "local workers"
        raise ClusterError(
            f"Could not reach {where} within {timeout:g} s ({type(error).__name__}: {error}). "
            "Is `dask scheduler` running there and reachable (firewall, TLS certificates)?"
        ) from error
    cluster = Cluster(spec, client, local)
    if check:
        try:
            check_cluster(cluster, timeout=timeout)
        except BaseException:
            cluster.close()
            raise
    return cluster


def attach(client: Any, *, timeout: float = CONNECT_TIMEOUT, check: bool = True) -> Cluster:
    """Use a ``distributed.Client`` you already have (from dask-jobqueue's ``SLURMCluster``,
    the Kubernetes operator's ``KubeCluster``, a cloud provider, ...), after the same checks as
    :func:`connect`. Closing the returned cluster closes the client, not the deployment."""
    cluster = Cluster(ClusterSpec("attached", address=str(client.scheduler.address)), client, None)
    if check:
        check_cluster(cluster, timeout=timeout)
    return cluster


def check_cluster(cluster: Cluster, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse a cluster without workers, with mismatched package versions, or whose workers
    cannot import this package or run other code than the driver.

    Raises:
        ClusterError: naming what differs and where.
    """
    client = cluster.client
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as error:
        raise ClusterError(
            f"The scheduler at {client.scheduler.address} has no workers (waited {timeout:g} s). "
            "Start some with `dask worker SCHEDULER_ADDRESS`."
        ) from error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            client.get_versions(check=True, packages=list(CHECKED_PACKAGES))
        except ValueError as error:  # Dask raises for what it considers errors
            raise ClusterError(
                f"The driver, scheduler and workers run different package versions; install "
                f"the same versions everywhere before running:\n{error}"
            ) from error
    mismatch = [str(w.message) for w in caught if "Mismatched versions" in str(w.message)]
    if mismatch:
        raise ClusterError(
            "The driver, scheduler and workers run different package versions; install the "
            f"same versions everywhere before running:\n{mismatch[0]}"
        )
    try:
        identities = client.run(_worker_identity)
    except (ModuleNotFoundError, ImportError) as error:
        raise ClusterError(
            "The workers cannot import influence-explorer's `core` package; install it (pip "
            "install 'influence-explorer[cluster]') on the scheduler and every worker "
            f"({error})."
        ) from error
    import core

    mine = {"version": core.__version__, "code": _kernel_fingerprint()}
    for address, identity in identities.items():
        if identity["version"] != mine["version"] or identity["code"] != mine["code"]:
            raise ClusterError(
                f"Worker {address} runs influence-explorer {identity['version']} (code "
                f"{identity['code']}), the driver {mine['version']} (code {mine['code']}); "
                "install the same version on every worker and restart them."
            )
    cluster._cuda = {a: bool(i["cuda"]) for a, i in identities.items()}


def cluster_info(cluster: Cluster | None) -> ClusterInfo:
    """Where the engine runs, for display: :data:`IN_PROCESS` for ``None``, else the
    cluster's scheduler address and its workers' threads and memory.

    Raises:
        ClusterError: the client has lost its scheduler (see ``DaskRunner.connected_client``).

    The dashboard's cluster line is ``cluster_info(cluster).summary()``.
    """
    if cluster is None:
        return IN_PROCESS
    with cluster.runner.stage("Asking the scheduler about its workers"):
        info = cluster.runner.connected_client().scheduler_info(n_workers=-1)
    workers = tuple(
        WorkerInfo(
            address=address,
            threads=int(w.get("nthreads") or 0),
            memory_limit=int(w.get("memory_limit") or 0),
        )
        for address, w in sorted(info.get("workers", {}).items())
    )
    devices = sum(1 for w in workers if cluster._cuda.get(w.address))
    return ClusterInfo(
        mode=cluster.spec.kind,
        address=str(info.get("address") or cluster.client.scheduler.address),
        workers=workers,
        devices=devices,
    )


def describe(option: str | None = None) -> str:
    """The cluster line for a setting without connecting: "In-process ..." when unset, else
    the spec (front ends show :func:`cluster_info` once connected)."""
    spec = cluster_spec(option)
    return IN_PROCESS.summary() if spec is None else f"Dask cluster {spec} (not connected yet)"


__all__ = [
    "CHECKED_PACKAGES",
    "IN_PROCESS",
    "Cluster",
    "ClusterInfo",
    "WorkerInfo",
    "attach",
    "check_cluster",
    "cluster_info",
    "connect",
    "describe",
]
