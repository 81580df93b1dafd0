"""Past one machine: the engine on a Dask cluster, in-process by default.

One switch, ``INFLUENCE_CLUSTER`` (or ``--cluster`` on the command line):

- unset (or empty): everything runs in-process exactly as without this package, and Dask is
  not imported;
- ``local:N``: a local cluster of N single-threaded worker processes
  (``LocalCluster(n_workers=N, threads_per_worker=1)``); a script that starts one needs an
  ``if __name__ == "__main__":`` guard, because the workers are new Python processes;
- ``tcp://host:port`` or ``tls://host:port``: a running Dask scheduler (``dask scheduler``,
  Kubernetes, SLURM via dask-jobqueue, ...). TLS takes its certificates from Dask's
  configuration (``distributed.comm.tls.*``).

What runs where (docs/architecture.md has the map):

- :mod:`core.backend.shards` — training rows live in shards (features float32, labels) in the
  workers' memory; features are computed by the workers over image shards (on a GPU when a
  worker has one) and written to the artifact store.
- :mod:`core.backend.models` — the convex models (binary or C-class) fitted by map-reduce:
  every Newton step sums per-shard gradients and Hessians (or Hessian-vector products) with a
  tree reduction; the factorisation and the step stay on the driver. They implement the engine's
  :class:`~core.influence.TwiceDifferentiable` protocol.
- :mod:`core.backend.selection` — λ by the rule of :mod:`core.selection`, each cross-validation
  fold fitted on the shards.
- :mod:`core.backend.engine` — :class:`~core.backend.engine.ShardedInfluenceEngine`, the same
  :class:`~core.influence.InfluenceEngine` with the per-training-point quantities (scores of all
  three estimates, the exact-in-the-margin default included, top-k, self-influence, leverages)
  mapped over shards, so no (test x train) matrix is ever formed; leave-one-out retrainings are
  independent tasks.
- :mod:`core.backend.cluster` — connecting, the version check, and :func:`cluster_info`, the
  line a front end shows (address, workers, memory).

This module itself imports neither Dask nor torch.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import ClusterError

#: The environment variable that selects the cluster (empty or unset: in-process).
ENV_CLUSTER = "INFLUENCE_CLUSTER"

#: Most workers ``local:N`` starts; more is never useful on one machine.
MAX_LOCAL_WORKERS = 256

_LOCAL = re.compile(r"^local:(\d+)$")
_REMOTE = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")

_FORMS = "'local:N' (N worker processes on this machine), 'tcp://HOST:PORT' or 'tls://HOST:PORT'"


@dataclass(frozen=True)
class ClusterSpec:
    """Which cluster to use. Build with :meth:`parse` (or :func:`cluster_spec`).

    Attributes:
        kind: "local" (start a LocalCluster), "remote" (connect to a running scheduler) or
            "attached" (a client the caller made, see :func:`core.backend.cluster.attach`).
        n_workers: for "local", the number of single-threaded worker processes.
        address: for "remote", the scheduler's ``tcp://`` or ``tls://`` address (any address
            for "attached").
    """

    kind: str
    n_workers: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "local":
            if not (isinstance(self.n_workers, int) and 1 <= self.n_workers <= MAX_LOCAL_WORKERS):
                raise ClusterError(
                    f"n_workers must be an integer from 1 to {MAX_LOCAL_WORKERS} for a local "
                    f"cluster; got {self.n_workers!r}."
                )
        elif self.kind == "remote":
            if not (isinstance(self.address, str) and _REMOTE.match(self.address)):
                raise ClusterError(
                    f"address must look like tcp://HOST:PORT or tls://HOST:PORT; got "
                    f"{self.address!r}."
                )
        elif self.kind == "attached":
            if not (isinstance(self.address, str) and self.address):
                raise ClusterError("An attached cluster needs its scheduler's address.")
        else:
            raise ClusterError(f"kind must be 'local', 'remote' or 'attached'; got {self.kind!r}.")

    @classmethod
    def parse(cls, text: str, *, source: str = ENV_CLUSTER) -> ClusterSpec:
        """``local:N``, ``tcp://host:port`` or ``tls://host:port`` -> a spec.

        Args:
            text: the setting.
            source: where it came from, for the message (``INFLUENCE_CLUSTER``, ``--cluster``).
        Raises:
            ClusterError: anything else, with the accepted forms.
        """
        value = text.strip()
        local = _LOCAL.match(value)
        if local:
            n = int(local.group(1))
            if not 1 <= n <= MAX_LOCAL_WORKERS:
                raise ClusterError(
                    f"{source}={text!r}: a local cluster needs 1 to {MAX_LOCAL_WORKERS} workers. "
                    f"Use {_FORMS}, or leave it unset to run in-process."
                )
            return cls("local", n_workers=n)
        remote = _REMOTE.match(value)
        if remote and 0 < int(remote.group(3)) < 65536:
            return cls("remote", address=value)
        raise ClusterError(
            f"{source}={text!r} is not a cluster. Use {_FORMS}, or leave it unset to run "
            "in-process."
        )

    def __str__(self) -> str:
        return f"local:{self.n_workers}" if self.kind == "local" else str(self.address)


def cluster_spec(
    option: str | None = None, environ: Mapping[str, str] | None = None
) -> ClusterSpec | None:
    """The cluster the user asked for: ``option`` (``--cluster``) if given, else
    ``$INFLUENCE_CLUSTER``; ``None`` (in-process) when neither is set or both are empty.

    Raises:
        ClusterError: a setting that is not one of the accepted forms.
    """
    if option is not None and option.strip():
        return ClusterSpec.parse(option, source="--cluster")
    env = os.environ if environ is None else environ
    value = env.get(ENV_CLUSTER, "")
    if not value.strip():
        return None
    return ClusterSpec.parse(value, source=ENV_CLUSTER)


#: Public name -> the submodule that defines it (imported on first use, so that importing
#: core.backend does not import Dask).
_PUBLIC: dict[str, str] = {
    "Cluster": "core.backend.cluster",
    "ClusterInfo": "core.backend.cluster",
    "attach": "core.backend.cluster",
    "cluster_info": "core.backend.cluster",
    "connect": "core.backend.cluster",
    "ShardedData": "core.backend.shards",
    "Shard": "core.backend.shards",
    "ArrayImages": "core.backend.shards",
    "ImageFiles": "core.backend.shards",
    "extract_features": "core.backend.shards",
    "ShardedLinearModel": "core.backend.models",
    "ShardedLogisticRegression": "core.backend.models",
    "ShardedNystroemSVM": "core.backend.models",
    "ShardedInfluenceEngine": "core.backend.engine",
    "ShardedTopK": "core.backend.engine",
    "DaskRunner": "core.backend.runner",
    "LocalRunner": "core.backend.runner",
}

__all__ = sorted([*_PUBLIC, "ENV_CLUSTER", "ClusterSpec", "cluster_spec"])


def __getattr__(name: str) -> Any:
    module_name = _PUBLIC.get(name)
    if module_name is None:
        raise AttributeError(f"module 'core.backend' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
