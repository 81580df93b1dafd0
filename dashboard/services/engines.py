"""The shared explainer: prepared once in the background (:mod:`.background`), watched by every
session that needs it, on the server's cluster if it has one (:mod:`.cluster`).

Also where a domain error becomes the message a page shows: core's words, plus the sidebar
control that fixes it.
"""

from __future__ import annotations

from typing import Any, NoReturn

import streamlit as st

from core.data import Dataset
from core.errors import (
    ConvergenceError,
    InfluenceExplorerError,
    NonFiniteFeaturesError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from core.explainer import Explainer
from core.store import ArtifactStore
from dashboard.services import preparing
from dashboard.services.background import (
    InProcess,
    Preparation,
    PreparationKey,
    preparations,
)
from dashboard.services.capacity import work_queue
from dashboard.services.cluster import current_cluster
from dashboard.services.settings import (
    DAMPING_CHOICES,
    EngineSpec,
    Settings,
    current_settings,
    load_dataset,
)


def start_preparation(
    engine: EngineSpec, dataset: Dataset, cluster: Any | None = None
) -> Preparation:
    def build(job: Preparation) -> Explainer:
        explainer = Explainer(dataset, engine.config, store=ArtifactStore(), cluster=cluster)
        # Construction is cheap and knows the sizes; the estimate decides admission.
        with job.admitted(explainer.preparation_estimate()):
            return explainer.prepare(job.report)

    return Preparation(build, queue=work_queue())


def _placement(settings: Settings, in_process: bool) -> tuple[PreparationKey, Any | None]:
    """Where the explainer for these settings is kept and the cluster it runs on (None:
    in-process). ``in_process``: the page needs the training rows here."""
    cluster = current_cluster()
    if cluster is None:
        return settings.engine, None
    if in_process:
        return InProcess(settings.engine), None
    return settings.engine, cluster


def preparation(settings: Settings, *, in_process: bool = False) -> Preparation:
    """The shared preparation of the explainer for these settings (started on first call); on
    the server's cluster if it has one, unless ``in_process``.

    Raises:
        InfluenceExplorerError: the dataset cannot be opened, the settings are invalid, or the
            server is preparing as many other configurations as it allows (ServerBusyError).
    """
    dataset = load_dataset(settings.dataset, settings.image_size)
    # settings.engine builds (and so validates) core's config in this thread, so an invalid
    # setting reaches the page directly rather than through the background thread.
    engine = settings.engine
    key, cluster = _placement(settings, in_process)
    return preparations().get(key, lambda: start_preparation(engine, dataset, cluster))


def explainer_if_ready(settings: Settings | None = None) -> Explainer | None:
    """The explainer if it is built, without waiting and without starting a preparation (for
    pages that can do without)."""
    settings = settings or current_settings()
    try:
        job = preparations().peek(settings.engine)
    except InfluenceExplorerError:
        return None
    return job.result if job is not None and job.finished else None


def require_explainer(settings: Settings | None = None, *, in_process: bool = False) -> Explainer:
    """The explainer for the sidebar's settings; shows progress while it is prepared.

    ``in_process``: the page refits on changed training rows or differentiates through them
    (Groups, Data cleaning, Attack, heatmaps), so on a server with a cluster it gets a copy of
    the models prepared in this process, and says so.

    On a domain error (e.g. an unavailable backbone) shows ``st.error`` with a retry button and
    stops the page; any other exception is raised, so tests see it.
    """
    settings = settings or current_settings()
    key = _placement(settings, in_process)[0]
    if isinstance(key, InProcess):
        st.caption(IN_PROCESS_NOTE)
    for _ in range(2):
        try:
            ask_first(settings, key)
            job = preparation(settings, in_process=in_process)
        except InfluenceExplorerError as exc:
            st.error(error_message(exc, settings))
            st.stop()
        if not job.finished:
            preparing.watch(job, settings)
        if job.cancelled:
            ask_first(settings, key)
        # Abandoned just before this session came to watch it: the second call starts anew.
        if not job.abandoned:
            break
    if job.error is not None:
        if not isinstance(job.error, InfluenceExplorerError):
            raise job.error
        st.error(error_message(job.error, settings))
        if st.button("Try again", key="state_retry_preparation"):
            preparations().forget(key)
            st.rerun()
        st.stop()
    assert job.result is not None
    for warning in job.result.warnings:
        # E.g. LiSSA too short to have converged: the scores are shown, with this caveat.
        st.warning(f"{warning}\n\n**In this dashboard:** {_SOLVER_FIX}", icon="⚠️")
    return job.result


#: Shown on a page that uses the in-process copy while the server has a cluster.
IN_PROCESS_NOTE = (
    "This server runs the logistic regression on a Dask cluster; this work refits it on "
    "changed training rows or differentiates through them, so it uses a copy of the models "
    "prepared in the server's own process (its scores agree with the cluster's)."
)


def ask_first(settings: Settings, key: PreparationKey | None = None) -> None:
    """Before starting (or restarting) a preparation: after a cancelled one, say so and offer it
    again; for a large choice nobody has confirmed, show its cost and wait (both stop the page).
    ``key``: where the preparation is kept (default: the settings' engine).

    Raises:
        InfluenceExplorerError: the dataset cannot be opened or the settings are invalid.
    """
    engine = settings.engine
    key = engine if key is None else key
    job = preparations().peek(key)
    ask_after_cancel(key, job, settings)
    if job is None and preparing.needs_confirmation(settings):
        preparing.ask(settings)


def ask_after_cancel(key: PreparationKey, job: Preparation | None, settings: Settings) -> None:
    """When ``job`` (the preparation kept under ``key``: the settings' own, or the first look's)
    was cancelled: drop it, so *Prepare* starts afresh, say so, and ask before preparing the
    settings again (stops the page). Nothing otherwise."""
    if job is None or not job.cancelled:
        return
    preparations().forget(key)
    preparing.forget(settings.engine)
    st.info(f"{job.error}", icon="⏹️")
    preparing.ask(settings)


_SOLVER_FIX = (
    "choose *Exact (Cholesky)* as the solver, or a larger *Damping*, in the sidebar under "
    "*Advanced*."
)


def error_message(error: InfluenceExplorerError, settings: Settings | None = None) -> str:
    """Core's message for a domain error, plus what to change in this dashboard to fix it.

    Core's messages name settings as the engine knows them (damping, lissa_depth, a weights
    file); the sidebar offers fewer, so where one of its controls is the fix, say which.
    """
    settings = settings or current_settings()
    fix = None
    if isinstance(error, NotPositiveDefiniteError):
        suggested = error.suggested_damping
        enough = [d for d in DAMPING_CHOICES if suggested is not None and d >= suggested]
        fix = (
            f"set *Damping* to {enough[0]:g} or more in the sidebar under *Advanced*."
            if enough
            else "choose a larger *Damping* in the sidebar under *Advanced*."
        )
    elif isinstance(error, (SolverDivergedError, ConvergenceError)) and settings.solver != "exact":
        fix = _SOLVER_FIX
    elif isinstance(error, SolverDivergedError):
        fix = "choose a larger *Damping* in the sidebar under *Advanced*."
    elif isinstance(error, NonFiniteFeaturesError):
        fix = "choose another backbone in the sidebar."
    return str(error) if fix is None else f"{error}\n\n**In this dashboard:** {fix}"


def stop_on_domain_error(error: InfluenceExplorerError) -> NoReturn:
    """Show a domain error the dashboard's way and stop the page."""
    st.error(error_message(error))
    st.stop()
