"""Before and while preparing: what a choice costs, asking before a large one, progress and Cancel.

A choice of classes (or a dataset, or every training image) that was not prepared before can cost
minutes: many classes mean C times the parameters, a full dataset many more images. Before such a
preparation starts, the page shows core's estimate (:meth:`core.explainer.Explainer.cost`: stage
by stage, floating-point operations, memory, images still to featurise) and waits for the user to
press *Prepare*; small ones start at once, as does the default choice (what a first launch
prepares). While it runs, every stage is named with its count ("Choosing the logistic
regression's λ on 1,500 images: 12 of 60") and a *Cancel* button stops it at the next stage report;
what was computed so far (features, fitted parameters) stays cached.

Confirmation is kept per :class:`~.settings.EngineSpec` for the whole server (the preparation it
starts is shared by every session), and forgotten when the preparation is cancelled.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from core.errors import InfluenceExplorerError
from core.explainer import Explainer, PreparationCost
from core.files import human_bytes
from core.linalg import gemm_rate
from core.store import ArtifactStore
from dashboard.services.settings import EngineSpec, Settings, load_dataset

if TYPE_CHECKING:
    from dashboard.services.background import Preparation

#: A preparation estimated above any of these asks before it starts. The floating-point count is
#: about a minute of dense linear algebra at the 20-50 GFLOP/s two cores sustain; featurising a
#: thousand images through the backbone takes about as long.
CONFIRM_FROM_FLOPS = 3e12
CONFIRM_FROM_IMAGES = 1000
CONFIRM_FROM_BYTES = 4 * 2**30


@st.cache_resource(show_spinner=False)
def machine_rate() -> float:
    """This server's float64 matrix-multiply rate in GFLOP/s, measured once per process."""
    return gemm_rate(1024)


@st.cache_data(ttl=30, max_entries=32, show_spinner=False)
def estimate(engine: EngineSpec) -> PreparationCost:
    """Core's estimate of preparing this engine (cheap: it only looks up which features are
    cached). Kept 30 s, since preparing other choices fills the cache meanwhile.

    Raises:
        InfluenceExplorerError: the dataset cannot be opened or the settings are invalid.
    """
    dataset = load_dataset(engine.dataset, engine.image_size)
    return Explainer(dataset, engine.config, store=ArtifactStore()).cost()


def is_large(cost: PreparationCost) -> bool:
    """Whether preparing is worth asking about first (see the module's thresholds)."""
    return (
        cost.flops >= CONFIRM_FROM_FLOPS
        or cost.uncached_images >= CONFIRM_FROM_IMAGES
        or cost.peak_memory_bytes >= CONFIRM_FROM_BYTES
    )


@st.cache_resource(show_spinner=False)
def _confirmed() -> tuple[set[EngineSpec], threading.Lock]:
    return set(), threading.Lock()


def confirm(engine: EngineSpec) -> None:
    confirmed, lock = _confirmed()
    with lock:
        confirmed.add(engine)


def forget(engine: EngineSpec) -> None:
    """Ask again next time (after a cancelled preparation)."""
    confirmed, lock = _confirmed()
    with lock:
        confirmed.discard(engine)
    estimate.clear()


def needs_confirmation(settings: Settings) -> bool:
    """Whether these settings' preparation must be confirmed before it starts: a large choice
    nobody on this server has confirmed yet (the default choice never asks).

    Raises:
        InfluenceExplorerError: the dataset cannot be opened or the settings are invalid.
    """
    engine = settings.engine
    if engine == Settings().engine:
        return False
    confirmed, lock = _confirmed()
    with lock:
        if engine in confirmed:
            return False
    return is_large(estimate(engine))


def cost_table(cost: PreparationCost, gflops: float) -> pd.DataFrame:
    """One row per stage: what it does, its count, memory and time at ``gflops``."""
    rows = []
    for stage in cost.stages:
        rows.append(
            {
                "stage": stage.stage,
                "GFLOP": f"{stage.flops / 1e9:,.0f}" if stage.flops else "",
                "images to featurise": f"{stage.images:,}" if stage.images else "",
                "memory": human_bytes(stage.memory_bytes),
                "seconds at the rate measured": f"{stage.flops / (gflops * 1e9):,.0f}"
                if stage.flops
                else "",
            }
        )
    return pd.DataFrame(rows)


def choice_text(cost: PreparationCost) -> str:
    """E.g. "10 classes, 5,000 training images"."""
    return f"{cost.n_classes} classes, {cost.n_train:,} training images"


def ask(settings: Settings) -> None:
    """Show what preparing these settings costs and a *Prepare* button; stop the page until it
    is pressed (then start it for every session)."""
    engine = settings.engine
    cost = estimate(engine)
    rate = machine_rate()
    with st.container(border=True, key="prepare_cost"):
        st.subheader(f"Prepare {choice_text(cost)}?", anchor=False)
        featurise = (
            f" and {cost.uncached_images:,} images to put through the backbone (features are "
            "computed once per image and cached for every later choice)"
            if cost.uncached_images
            else " (every image's features are cached already)"
        )
        st.markdown(
            f"Not prepared on this server yet. Core estimates **{cost.flops / 1e12:,.1f} TFLOP** "
            f"of dense linear algebra, about **{_duration(cost.seconds(rate))}** at the "
            f"{rate:.0f} GFLOP/s measured on this server{featurise}; peak memory about "
            f"**{human_bytes(cost.peak_memory_bytes)}**. The RBF SVM is {cost.svm}."
        )
        st.caption(
            "The estimate counts every stage's dense algebra with 10 Newton steps per fit; real "
            "fits often take fewer and cheaper steps, and a subset seen before starts from its "
            "cached parameters, so it is usually quicker. Preparation runs in the background "
            "(other sessions are not blocked) and can be cancelled."
        )
        st.dataframe(cost_table(cost, rate), hide_index=True, key="prepare_cost_table")
        if st.button("Prepare", type="primary", key="state_prepare_confirm"):
            confirm(engine)
            st.rerun()
    st.stop()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def watch(job: Preparation, settings: Settings, *, first_look: bool = False) -> None:
    """Show the preparation's progress until it finishes, with a *Cancel* button.

    ``first_look``: the job is the SVM-only first look, which needs no backbone features."""
    try:
        cost = estimate(settings.engine)
        what = choice_text(cost)
    except InfluenceExplorerError:  # the preparation reports its own errors
        cost, what = None, "the models"
    title = f"Preparing a first look at {what}…" if first_look else f"Preparing {what}…"
    with st.status(title, expanded=True) as status:
        st.caption(
            "The RBF SVM on pixels comes first, in seconds; the backbone's features and the "
            "logistic regression on them follow in the background while you look."
            if first_look
            else "Features are computed once per image and cached on disk; fitting both models "
            "and building their influence engines follows. A choice prepared before starts "
            "from its cached parameters."
        )
        if st.button(
            "Cancel",
            key="state_cancel_preparation",
            help="Stops at the next stage report (one dense factorisation cannot be "
            "interrupted); features and fitted parameters computed so far stay cached. The "
            "preparation is shared: this stops it for every session waiting on it.",
        ):
            job.cancel()
        bar = st.progress(0.0, text="Starting…")
        n = None if cost is None else cost.n_train
        while not job.wait(0.3):
            job.touch()  # still watched: the build goes on
            snap = job.snapshot()
            text = stage_text(snap.stage, snap.done, snap.total, n)
            if job.cancelling:
                text = f"Cancelling at the next stage report… ({text})"
            bar.progress(snap.fraction, text=f"{text} · {snap.elapsed:.0f} s")
        failed = job.error is not None
        ready = "First look ready: the RBF SVM" if first_look else "Models ready"
        status.update(
            label="Preparation stopped" if failed else f"{ready} ({job.seconds:.0f} s)",
            state="error" if failed else "complete",
            expanded=False,
        )


def stage_text(stage: str, done: int, total: int, n_train: int | None) -> str:
    """A progress line, e.g. "Choosing the logistic regression's λ on 5,000 images: 12 of 60"."""
    on = f" on {n_train:,} images" if n_train and stage.startswith(("Fitting", "Choosing")) else ""
    count = f": {done:,} of {total:,}" if total else ""
    return f"{stage}{on}{count}"
