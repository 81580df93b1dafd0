"""Explanations of the query by every model, heatmaps of one training image, the models compared,
and verification by retraining.

Explanations and heatmaps are shared across sessions, keyed by content: the frozen settings (or
the engine's part of them) and the query's key, never by a session. Verifications are this
session's own and remembered for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from core.compare import Comparison, LabelMakeup, PairAgreement, compare_models
from core.errors import InfluenceExplorerError
from core.explainer import Explainer, Explanation
from core.validation import Verification
from dashboard.services.engines import stop_on_domain_error
from dashboard.services.facts import class_names
from dashboard.services.query import Query
from dashboard.services.runs import SessionRuns
from dashboard.services.settings import EngineSpec, Settings

__all__ = [
    "MAX_VERIFICATIONS_PER_SESSION",
    "SIGN_CONVENTION",
    "Comparison",
    "LabelMakeup",
    "PairAgreement",
    "VerifyRun",
    "compare",
    "explain",
    "heatmap",
    "run_verification",
    "verification",
    "verified_queries",
]

SIGN_CONVENTION = (
    "Influence score ≈ test loss after removing the training image − test loss with it. "
    "**Positive: it helped** the prediction (removing it would raise the loss); "
    "**negative: it hurt**. Units: test loss."
)
#: Verifications remembered per session (oldest dropped first), to keep sessions small.
MAX_VERIFICATIONS_PER_SESSION = 20


@st.cache_data(max_entries=64, show_spinner=False)
def _explanation(
    settings: Settings, query_key: str, _explainer: Explainer, _engine_args: dict[str, Any]
) -> Explanation:
    # The settings key the engine, k and the estimate: everything the explanation depends on.
    return _explainer.explain(k=settings.k, estimate=settings.estimate, **_engine_args)


def explain(explainer: Explainer, query: Query, settings: Settings) -> Explanation:
    """Every model's explanation of the query (cached by the settings and the query's content).

    A domain error (e.g. a diverging LiSSA estimate) is shown with ``st.error`` and stops the page.
    """
    try:
        return _explanation(settings, query.key, explainer, query.engine_args())
    except InfluenceExplorerError as exc:
        stop_on_domain_error(exc)


@st.cache_data(max_entries=128, show_spinner=False)
def _heatmap(
    engine: EngineSpec,
    query_key: str,
    model_key: str,
    train_index: int,
    _explainer: Explainer,
    _engine_args: dict[str, Any],
) -> np.ndarray:
    return _explainer.heatmap(model_key, train_index, **_engine_args)


def heatmap(
    explainer: Explainer, query: Query, settings: Settings, model_key: str, train_index: int
) -> np.ndarray:
    """(H, W, C) d(test loss)/d(pixel) of one training image, for one model.

    A domain error is shown with ``st.error`` and stops the page.
    """
    try:
        return _heatmap(
            settings.engine, query.key, model_key, int(train_index), explainer, query.engine_args()
        )
    except InfluenceExplorerError as exc:
        stop_on_domain_error(exc)


def compare(explanation: Explanation, explainer: Explainer) -> Comparison:
    """Every pair of models' agreement on this explanation, and each model's label make-up."""
    return compare_models(explanation.models, class_names(explainer))


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyRun:
    """A verification: which engine, which query (by content) and how many images per model."""

    engine: EngineSpec
    query_key: str
    k: int


def _verify(
    run: VerifyRun,
    explainer: Explainer,
    query: Query,
    progress: Callable[[str, int, int], None],
) -> dict[str, Verification]:
    return explainer.verify(k=run.k, progress=progress, **query.engine_args())


# Not shared across sessions: a verification takes a minute and is asked for on purpose, and its
# progress belongs to the session that asked.
_VERIFICATIONS: SessionRuns[VerifyRun, dict[str, Verification]] = SessionRuns(
    "state_verifications", _verify, limit=MAX_VERIFICATIONS_PER_SESSION
)


def verification(settings: Settings, query: Query, k: int) -> dict[str, Verification] | None:
    """Results (model key -> verification) of an earlier verification in this session, if any."""
    return _VERIFICATIONS.remembered(VerifyRun(settings.engine, query.key, int(k)))


def verified_queries(settings: Settings) -> list[tuple[str, int]]:
    """(what, k) verified in this session for the current engine, oldest first."""
    out = []
    engine = settings.engine
    for run in _VERIFICATIONS.remembered_keys():
        if run.engine != engine:
            continue
        kind, _, value = run.query_key.partition(":")
        out.append((f"test image #{value}" if kind == "test" else f"upload {value[:8]}", run.k))
    return out


def run_verification(
    explainer: Explainer,
    query: Query,
    settings: Settings,
    k: int,
    progress: Callable[[str, int, int], None],
) -> dict[str, Verification]:
    """Retrain every model without each of its top-k images and remember the result here.

    ``progress(stage, done, total)`` is called after every retrain; when it raises (Streamlit
    stops the script because the user navigated away), retraining stops with it.

    Raises:
        InfluenceExplorerError: core refused or a retrain failed for good.
    """
    run = VerifyRun(settings.engine, query.key, int(k))
    return _VERIFICATIONS.run(run, explainer, query, progress)
