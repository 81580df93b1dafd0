"""The convex reference rows: a model fitted to convergence and checked by exact leave-one-out
refits, in the same table as the networks."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from core.errors import InfluenceExplorerError
from core.fragility.config import CONVEX_MODELS, FragilityConfig, Setting
from core.fragility.data import StudyData
from core.fragility.results import (
    CurvatureResult,
    GroundTruthResult,
    PointResult,
    SettingResult,
    SolverResult,
)
from core.fragility.tracking import Tracker
from core.influence import InfluenceEngine
from core.linalg import spectrum_from_hessian
from core.models import DTYPE, KernelSVM, LinearModel, LogisticRegression
from core.validation import verify


class _NoOptimum(Exception):
    """The convex model has no (finite, unique) optimum to check influence at."""


def run_convex_cell(
    setting: Setting, config: FragilityConfig, data: StudyData, tracker: Tracker
) -> SettingResult:
    """Fit a convex reference model by Newton's method and check it by exact leave-one-out
    refits (no SGD, so no noise floor); the first-order estimate is the row's, the
    Newton-corrected one is kept alongside."""
    started = time.perf_counter()
    n = int(data.X_train.shape[0])
    X = data.X_train.reshape(n, -1).to(DTYPE)
    X_test = data.X_test.reshape(data.X_test.shape[0], -1).to(DTYPE)
    tracker.stage("fitting")
    try:
        model, engine = _fit(setting, X, data.y_train)
        fit_seconds = time.perf_counter() - started
        tracker.advance(2, "curvature")
        curvature = _curvature(setting, model)
    except _NoOptimum as reason:
        return skipped_result(setting, str(reason), time.perf_counter() - started)
    t = time.perf_counter()
    points = _check(engine, X_test, data, config.ground_truth.top_k, tracker)
    retrain_seconds = time.perf_counter() - t
    solver = SolverResult(
        "exact",
        "all",
        "exact",
        0.0,
        model.n_params_,
        fit_seconds,
        points,
        "first-order estimate; Newton fit and exact leave-one-out refits to gradient norm 1e-11",
    )
    ground_truth = GroundTruthResult(
        protocol=(
            "Convex reference: refitted without each top-k point by Newton's method to "
            "convergence, warm-started from the optimum (exact leave-one-out, no SGD)."
        ),
        retrain_epochs=0,
        seeds=1,
        n_retrained=len({j for p in points for j in p.train_indices}),
        control_drift=tuple(0.0 for _ in points),
        seed_pearson=tuple(math.nan for _ in points),
        seconds=retrain_seconds,
    )
    with torch.no_grad():
        train_accuracy = model.accuracy(X, data.y_train)
        test_accuracy = model.accuracy(X_test, data.y_test)
    return SettingResult(
        model=setting.model,
        label=setting.label,
        depth=0,
        width=0,
        weight_decay=float(setting.weight_decay),
        n_params=model.n_params_,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        gradient_norm=float(model.objective_gradient().norm()),
        curvature=(curvature,),
        solvers=(solver,),
        ground_truth=ground_truth,
        seconds=time.perf_counter() - started,
        timings=(
            ("fit", fit_seconds),
            ("curvature", curvature.seconds),
            ("retrain", retrain_seconds),
        ),
    )


def _fit(setting: Setting, X: torch.Tensor, y: torch.Tensor) -> tuple[LinearModel, InfluenceEngine]:
    wd = float(setting.weight_decay)
    model: LinearModel = (
        LogisticRegression(l2=wd) if setting.model == "logistic" else KernelSVM(l2=wd)
    )
    try:
        model.fit(X, y)
        return model, InfluenceEngine(model)
    except InfluenceExplorerError as error:
        raise _NoOptimum(
            f"{CONVEX_MODELS[setting.model]} with weight decay {wd:g} "
            + ("has no unique optimum here" if wd == 0 else "could not be fitted")
            + f" ({error})"
        ) from error


def _curvature(setting: Setting, model: LinearModel) -> CurvatureResult:
    t = time.perf_counter()
    spectrum = spectrum_from_hessian(model.hessian())
    if spectrum.smallest <= 1e-9 * max(spectrum.largest, 1e-300):
        # Without weight decay on separable pixels the loss keeps falling as ‖θ‖ grows: the
        # "optimum" is wherever Newton stopped and its Hessian is numerically singular.
        raise _NoOptimum(
            f"{CONVEX_MODELS[setting.model]} without enough weight decay "
            f"({setting.weight_decay:g}) has no finite optimum here: the fitted Hessian is "
            f"singular (eigenvalues {spectrum.smallest:.2g} to {spectrum.largest:.2g})."
        )
    return CurvatureResult(
        "all",
        model.n_params_,
        spectrum.smallest,
        spectrum.largest,
        "eigvalsh",
        0,
        time.perf_counter() - t,
    )


def _check(
    engine: InfluenceEngine, X_test: torch.Tensor, data: StudyData, top_k: int, tracker: Tracker
) -> tuple[PointResult, ...]:
    """Exact leave-one-out refits without each of the top k (first order) for the highest-loss
    and the median-loss test point."""
    test_losses = engine.model.loss(X_test, data.y_test)
    order = np.argsort(test_losses, kind="stable")
    points = {"high_loss": int(order[-1]), "median_loss": int(order[len(order) // 2])}
    rows = list(points.values())
    verifications = verify(
        engine,
        X_test[rows],
        data.y_test[rows],
        k=top_k,
        select_by="first_order",
        progress=tracker.inner(10, "exact leave-one-out retraining"),
    )
    out = []
    for (kind, row), v in zip(points.items(), verifications, strict=True):
        first, corrected = v.agreement["first_order"], v.agreement["corrected"]
        out.append(
            PointResult(
                kind=kind,
                test_index=row,
                test_id=data.test_ids[row],
                label=int(data.y_test[row]),
                test_loss=float(test_losses[row]),
                train_indices=tuple(int(j) for j in v.train_indices),
                train_ids=tuple(data.train_ids[int(j)] for j in v.train_indices),
                predicted=tuple(float(x) for x in v.predicted["first_order"]),
                actual=tuple(float(x) for x in v.actual),
                actual_std=tuple(0.0 for _ in v.actual),
                pearson=first.pearson,
                spearman=first.spearman,
                slope=first.slope,
                score_pearson=1.0,
                score_spearman=1.0,
                relative_error=0.0,
                corrected_pearson=corrected.pearson,
                corrected_spearman=corrected.spearman,
            )
        )
    return tuple(out)


def skipped_result(setting: Setting, reason: str, seconds: float, repeat: int = 0) -> SettingResult:
    """A cell's row when it was not run, with the reason."""
    arch = setting.architecture
    return SettingResult(
        model=setting.model,
        label=setting.label,
        depth=arch.depth if arch else 0,
        width=arch.width if arch else 0,
        weight_decay=float(setting.weight_decay),
        n_params=0,
        train_accuracy=math.nan,
        test_accuracy=math.nan,
        gradient_norm=math.nan,
        curvature=(),
        solvers=(),
        ground_truth=None,
        seconds=seconds,
        timings=(),
        skipped=reason,
        repeat=repeat,
        activation=arch.activation if arch else "",
    )
