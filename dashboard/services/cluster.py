"""Where the dashboard computes: this server's process, or the Dask cluster ``$INFLUENCE_CLUSTER``
names.

Whoever runs the server sets it; users cannot change it. Unset, every page computes in this
process and Dask is not imported. Set, the server connects once (:func:`server_cluster`, shared
by every session) and its explainers run the logistic regression there, as the command line
does (:mod:`core.backend`): the backbone features, the choice of λ, the fit, the influence engine
and leave-one-out retraining. The RBF SVM on pixels stays in this process.

Work that needs the logistic regression's training rows in one place uses an in-process copy
of the models, prepared on first use (``engines.require_explainer(in_process=True)``). That is
the per-pixel heatmap, and the Groups, Data cleaning and Attack pages, which refit on removed,
relabelled or perturbed rows.

A setting that is malformed, or a cluster that cannot be reached, leaves the server computing
in-process. The sidebar then says why and offers to try again (:func:`reconnect`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import streamlit as st

from core.errors import ClusterError

#: Seconds the sidebar reuses the workers' count and memory before asking the scheduler again.
INFO_TTL_S = 15


@dataclass(frozen=True)
class ServerCluster:
    """The server's cluster as connected at start (or on the last *Try again*).

    Attributes:
        setting: ``$INFLUENCE_CLUSTER`` as parsed ("" when unset or malformed).
        cluster: the connected :class:`core.backend.cluster.Cluster`, or None (in-process).
        error: why a set value is not used (malformed, unreachable, mismatched versions).
    """

    setting: str = ""
    cluster: Any | None = None
    error: str = ""


def connect_from(environ: Mapping[str, str], *, timeout: float | None = None) -> ServerCluster:
    """Connect to the cluster ``environ`` names, or say why not (never raises a domain error).
    ``timeout``: seconds to wait for the scheduler and workers (default: core's)."""
    from core.backend import ENV_CLUSTER, cluster_spec

    try:
        spec = cluster_spec(environ=environ)
    except ClusterError as exc:
        return ServerCluster(error=str(exc))
    if spec is None:
        return ServerCluster()
    from core.backend.cluster import CONNECT_TIMEOUT, connect

    try:
        cluster = connect(spec, timeout=CONNECT_TIMEOUT if timeout is None else timeout)
    except ClusterError as exc:
        return ServerCluster(f"{spec}", error=f"{ENV_CLUSTER}={spec}: {exc}")
    atexit.register(cluster.close)
    return ServerCluster(f"{spec}", cluster)


@st.cache_resource(show_spinner="Connecting to the Dask cluster…")
def server_cluster() -> ServerCluster:
    """The server process's cluster: connected on first use, then shared by every session."""
    return connect_from(os.environ)


def current_cluster() -> Any | None:
    """The connected cluster the explainers run on, or None to compute in-process."""
    return server_cluster().cluster


def reconnect() -> None:
    """Drop the server's connection (closing it) and the explainers built on it, whose training
    rows were its workers', so the next page connects again and prepares them there."""
    from dashboard.services.background import preparations

    state = server_cluster()
    server_cluster.clear()
    _info.clear()
    if state.cluster is not None:
        preparations().forget_built_on(state.cluster)
        state.cluster.close()


@st.cache_data(ttl=INFO_TTL_S, show_spinner=False)
def _info(setting: str, connection: int, _cluster: Any) -> Any:
    """The cluster's :class:`~core.backend.cluster.ClusterInfo`, or why it has none (a string:
    cached too, so a scheduler that went away costs one wait per ``INFO_TTL_S``, not one per
    page). ``connection``: which connection (a new one is asked anew)."""
    from core.backend.cluster import cluster_info

    try:
        return cluster_info(_cluster)  # refuses a client that knows it lost the scheduler
    except ClusterError as exc:
        return str(exc)
    except Exception as exc:  # the scheduler went away unnoticed: say so, keep serving
        return f"{type(exc).__name__}: {exc}"


def cluster_line(state: ServerCluster) -> tuple[str, bool]:
    """The cluster's part of the sidebar's compute line, and whether it is a problem to show as
    a warning: its workers' count and memory, or why the server computes in-process.
    ("", False) when no cluster is set."""
    if state.error:
        return f"Computing in-process instead of on the cluster. {state.error}", True
    if state.cluster is None:
        return "", False
    info = _info(state.setting, id(state.cluster), state.cluster)
    if isinstance(info, str):
        return (
            f"The Dask cluster ({state.setting}) does not answer, and work sent to it fails "
            f"until it is back and connected again. {info}",
            True,
        )
    if info.n_workers == 0:
        return (
            f"The Dask cluster {info.address} ({state.setting}) has no workers now; work sent to "
            "it waits until some join.",
            True,
        )
    return f"Computed on a {info.summary()} ({state.setting}).", False
