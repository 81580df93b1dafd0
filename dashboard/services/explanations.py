"""Explanations of the query by every model, heatmaps of one training image, the models compared,
and verification by retraining.

Explanations and heatmaps are shared across sessions, keyed by content: the frozen settings (or
the engine's part of them) and the query's key, never by a session. A verification is computed
for the session that asks and kept in the artifact store by the same content (the engine's
dataset and configuration, the query, k), so a link to a verified view shows the same numbers to
whoever opens it, without retraining again. Also here: the documents a view exports (core.report)
and how big a model's scores are (core.report.score_scale).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from core import report as core_report
from core.compare import Comparison, LabelMakeup, PairAgreement, compare_models
from core.errors import CacheError, InfluenceExplorerError
from core.explainer import Explainer, Explanation, ModelExplanation
from core.report import ScoreScale
from core.store import ArtifactStore, CacheKey
from core.validation import Verification
from dashboard.services.capacity import retraining
from dashboard.services.engines import require_explainer, stop_on_domain_error
from dashboard.services.facts import class_names, train_ids, train_labels
from dashboard.services.query import Query
from dashboard.services.runs import SessionRuns
from dashboard.services.settings import EngineSpec, Settings

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_VERIFICATIONS_PER_SESSION",
    "NEGLIGIBLE_LOSS_CHANGE",
    "QUICK_CHECK_K",
    "SIGN_CONVENTION",
    "Comparison",
    "ExportedDocuments",
    "LabelMakeup",
    "PairAgreement",
    "ScoreScale",
    "VerifyRun",
    "compare",
    "explain",
    "explanation_documents",
    "heatmap",
    "heatmap_scale",
    "probability_text",
    "run_verification",
    "score_scale",
    "verification",
    "verification_documents",
    "verified_earlier",
    "verified_queries",
]

NEGLIGIBLE_LOSS_CHANGE = core_report.NEGLIGIBLE_LOSS_CHANGE
HEATMAP_FLOOR = core_report.HEATMAP_FLOOR
#: The quick check on Explain: retrain without each of the top 10 by |score|, every model.
QUICK_CHECK_K = 10

SIGN_CONVENTION = (
    "Influence score ≈ test loss after removing the training image − test loss with it. "
    "**Positive: it helped** the prediction (removing it would raise the loss); "
    "**negative: it hurt**. Units: test loss."
)
#: Verifications remembered per session (oldest dropped first), to keep sessions small.
MAX_VERIFICATIONS_PER_SESSION = 20


@st.cache_data(max_entries=64, show_spinner=False)
def _explanation(
    settings: Settings,
    query_key: str,
    models: tuple[str, ...],
    _explainer: Explainer,
    _engine_args: dict[str, Any],
) -> Explanation:
    # The settings key the engine, k and the estimate; with the models (a first look has fewer).
    return _explainer.explain(k=settings.k, estimate=settings.estimate, **_engine_args)


def explain(explainer: Explainer, query: Query, settings: Settings) -> Explanation:
    """Every model's explanation of the query (cached by the settings and the query's content).

    A domain error (e.g. a diverging LiSSA estimate) is shown with ``st.error`` and stops the page.
    """
    try:
        return _explanation(
            settings, query.key, tuple(explainer.models), explainer, query.engine_args()
        )
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
    """(H, W, C) d(test loss)/d(pixel) of one training image, for one model (a model sharded on
    the server's cluster through its in-process copy). A domain error stops the page."""
    if explainer.on_cluster(model_key):
        explainer = require_explainer(settings, in_process=True)
    try:
        return _heatmap(
            settings.engine, query.key, model_key, int(train_index), explainer, query.engine_args()
        )
    except InfluenceExplorerError as exc:
        stop_on_domain_error(exc)


def compare(explanation: Explanation, explainer: Explainer) -> Comparison:
    """Every pair of models' agreement on this explanation, and each model's label make-up."""
    return compare_models(explanation.models, class_names(explainer))


def score_scale(model: ModelExplanation) -> ScoreScale:
    """How large one model's scores are and whether they are negligible (core's rule)."""
    return core_report.score_scale(model.scores, model.loss)


def heatmap_scale(values: np.ndarray) -> float:
    """The |value| a heatmap shows at full colour (core's rule: never below HEATMAP_FLOOR)."""
    return core_report.heatmap_scale(values)


def probability_text(explainer: Explainer, model_key: str, probability: float) -> str:
    """E.g. "Platt-scaled p = 0.84" for a Platt-scaled model, "p = 0.61" otherwise."""
    kind = core_report.probability_kind(explainer.models[model_key].model)
    return core_report.probability_text(probability, kind)


# --------------------------------------------------------------------------- exports


@dataclass(frozen=True)
class ExportedDocuments:
    """A view's downloads: file name stem and the documents' text."""

    stem: str
    json: str
    csv: str
    html: str


@st.cache_data(max_entries=8, show_spinner="Preparing the downloads…")
def _explanation_documents(
    settings: Settings,
    query_key: str,
    title: str,
    link: str,
    checked: bool,
    _explainer: Explainer,
    _engine_args: dict[str, Any],
    _explanation: Explanation,
    _checks: dict[str, Verification] | None,
) -> ExportedDocuments:
    report = core_report.build_report(
        _explainer,
        **_engine_args,
        title=title,
        k=settings.k,
        estimate=settings.estimate,
        explanations={settings.estimate: _explanation},
        checks=_checks,
        link=link,
    )
    kind, _, value = query_key.partition(":")
    stem = f"influence-test-{value}" if kind == "test" else f"influence-upload-{value[:12]}"
    return ExportedDocuments(
        stem=stem,
        json=core_report.report_json(report),
        csv=core_report.report_csv(report),
        html=core_report.report_html(report),
    )


def explanation_documents(
    explainer: Explainer,
    query: Query,
    settings: Settings,
    explanation: Explanation,
    *,
    link: str,
    checks: dict[str, Verification] | None = None,
) -> ExportedDocuments:
    """The explanation of every model as JSON, CSV and a self-contained HTML report (the same
    documents ``influence explain --output`` writes), cached by the view's content.

    A domain error is shown with ``st.error`` and stops the page.
    """
    title = query.title.replace("`", "")
    try:
        return _explanation_documents(
            settings,
            query.key,
            title,
            link,
            checks is not None,
            explainer,
            query.engine_args(),
            explanation,
            checks,
        )
    except InfluenceExplorerError as exc:
        stop_on_domain_error(exc)


def verification_documents(
    explainer: Explainer,
    query: Query,
    result: dict[str, Verification],
    *,
    link: str,
) -> tuple[str, str, str]:
    """One query's verification as (JSON, scatter CSV, statistics CSV), as ``influence verify
    --output`` writes them."""
    names = list(class_names(explainer))
    ids = [str(i) for i in train_ids(explainer)]
    labels = [names[int(c)] for c in train_labels(explainer)]
    verified = [
        core_report.VerifiedQuery(query.title.replace("`", ""), query.test_index, dict(result))
    ]
    document = core_report.verification_json(
        verified,
        model_labels={key: fitted.label for key, fitted in explainer.models.items()},
        train_ids=ids,
        train_labels=labels,
        settings=core_report.explainer_settings(explainer),
        link=link,
    )
    scatter = core_report.verification_csv(verified, train_ids=ids, train_labels=labels)
    return document, scatter, core_report.verification_statistics_csv(verified)


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
    "state_verifications",
    _verify,
    limit=MAX_VERIFICATIONS_PER_SESSION,
    estimate=retraining("verifying by retraining"),
)


#: Bump when what a kept verification holds changes; kept ones of another version are not read.
_KEPT_VERSION = 2
# Session-state key: the runs this session read back from the server.
_FROM_SERVER = "state_verifications_from_server"


def _kept_key(explainer: Explainer, run: VerifyRun) -> CacheKey:
    config = json.dumps(
        dataclasses.asdict(run.engine.config), sort_keys=True, default=str, separators=(",", ":")
    )
    return CacheKey.of(
        "verification",
        {
            "dataset": str(explainer.dataset.content_hash),
            "config": config,
            "query": run.query_key,
            "k": int(run.k),
            "version": _KEPT_VERSION,
            "core": core_report._version(),
        },
    )


def _keep(explainer: Explainer, run: VerifyRun, result: dict[str, Verification]) -> None:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"models": list(result)}
    for key, check in result.items():
        model_arrays, model_meta = core_report.verification_arrays(check)
        # The store names arrays by Python identifiers: "<model key>__<array>".
        arrays.update({f"{key}__{name}": values for name, values in model_arrays.items()})
        meta[key] = model_meta
    try:
        ArtifactStore().save(_kept_key(explainer, run), arrays, meta)
    except (CacheError, OSError) as exc:
        logger.warning("Could not keep a verification: %s", exc)


def _kept(explainer: Explainer, run: VerifyRun) -> dict[str, Verification] | None:
    artifact = ArtifactStore().load_artifact(_kept_key(explainer, run))
    if artifact is None:
        return None
    try:
        out = {}
        for key in artifact.meta["models"]:
            arrays = {
                name.split("__", 1)[1]: values
                for name, values in artifact.arrays.items()
                if name.split("__", 1)[0] == key
            }
            out[key] = core_report.verification_from_arrays(arrays, artifact.meta[key])
    except (KeyError, TypeError, InfluenceExplorerError):
        return None
    if set(out) != set(explainer.models):
        return None
    return out


def verification(
    settings: Settings, query: Query, k: int, explainer: Explainer | None = None
) -> dict[str, Verification] | None:
    """Results (model key -> verification) of this query at this k: this session's, else the one
    kept on the server (when ``explainer`` is given), else None."""
    run = VerifyRun(settings.engine, query.key, int(k))
    result = _VERIFICATIONS.remembered(run)
    if result is None and explainer is not None:
        result = _kept(explainer, run)
        if result is not None:
            _VERIFICATIONS.remember(run, result)
            st.session_state[_FROM_SERVER] = {*st.session_state.get(_FROM_SERVER, ()), run}
    return result


def verified_earlier(settings: Settings, query: Query, k: int) -> bool:
    """Whether this query's verification at this k was read back from the server (computed
    earlier, by this or another session) rather than run in this session."""
    run = VerifyRun(settings.engine, query.key, int(k))
    return run in st.session_state.get(_FROM_SERVER, ())


def verified_queries(settings: Settings) -> list[tuple[str, int, bool]]:
    """(what, k, read back) for the verifications this session has seen on the current engine,
    oldest first; ``read back`` when it was kept on the server from an earlier run (this or
    another session's) rather than run here."""
    out = []
    engine = settings.engine
    from_server = st.session_state.get(_FROM_SERVER, ())
    for run in _VERIFICATIONS.remembered_keys():
        if run.engine != engine:
            continue
        kind, _, value = run.query_key.partition(":")
        what = f"test image #{value}" if kind == "test" else f"upload {value[:8]}"
        out.append((what, run.k, run in from_server))
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
    result = _VERIFICATIONS.run(run, explainer, query, progress)
    _keep(explainer, run, result)
    st.session_state[_FROM_SERVER] = set(st.session_state.get(_FROM_SERVER, ())) - {run}
    return result
