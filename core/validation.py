"""Ground truth by retraining, and how well influence estimates agree with it.

Removing training points follows the paper's definition: their loss terms are dropped while the
1/n and λ stay, i.e. the model is refitted with zero sample weights. Every retrain is warm-started
from θ̂ with the same damped Newton method and a tight tolerance, so the actual change in test loss
is accurate to far below the scores being checked (never SGD for the convex models).

The retrains of one call are solved together (:meth:`core.models.LinearModel.refit_without`: one
Newton iteration over a p x G block of parameters, each step by conjugate gradients preconditioned
with the Hessian without the removed points); any that does not reach the tolerance there is
retrained again on its own by ``model.refit``, the one-at-a-time path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import InfluenceExplorerError
from core.influence import Estimate, InfluenceEngine, top_k_by_magnitude
from core.models import LinearModel, as_labels

Progress = Callable[[int, int], None]

#: Gradient-norm tolerance of ground-truth retraining (the objective is O(1) in float64).
RETRAIN_TOL = 1e-11


@dataclass(frozen=True)
class RetrainResult:
    """Actual effect of removing groups of training points.

    Attributes:
        groups: the removed training indices, one array per retrain.
        actual: (n_groups, m) ℓ(z_test, θ̂_{-group}) - ℓ(z_test, θ̂) for each test point.
        base_loss: (m,) test losses of the original model.
        iterations: (n_groups,) Newton (or, solved together, quasi-Newton) steps each retrain
            took.
        gradient_norms: (n_groups,) final ‖∇R‖ of each retrain.
        seconds: wall time of all retrains.
        batched: (n_groups,) True where the retrain was solved with the others
            (:meth:`~core.models.LinearModel.refit_without`), False where it was refitted on its
            own; None when the caller did not say (e.g. the sharded engine's retraining tasks).
    """

    groups: tuple[np.ndarray, ...]
    actual: np.ndarray
    base_loss: np.ndarray
    iterations: np.ndarray
    gradient_norms: np.ndarray
    seconds: float
    batched: np.ndarray | None = None

    @property
    def converged(self) -> bool:
        return bool(np.all(self.gradient_norms <= 10 * RETRAIN_TOL))


def retrain_without(
    model: LinearModel,
    groups: Sequence[Any],
    X_test: Any,
    y_test: Any,
    *,
    tol: float = RETRAIN_TOL,
    progress: Progress | None = None,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batched: bool = True,
) -> RetrainResult:
    """Refit without each group of training points and measure the change in test loss.

    Args:
        model: the fitted model (not modified).
        groups: sequence of index arrays; each is removed in its own retrain.
        X_test: (m, D) test inputs; y_test: (m,) labels whose loss is measured.
        tol: gradient-norm tolerance of each retrain.
        progress: called as progress(done, total) as retrains finish.
        preconditioner: optional (H + damping)⁻¹ at θ̂ to speed up the Newton steps (see
            :meth:`~core.models.LinearModel.refit_without` and
            :meth:`~core.models.LinearModel.refit`); the result does not depend on it.
        batched: solve the retrains together (:meth:`~core.models.LinearModel.refit_without`),
            refitting one at a time only those that do not converge there; False refits every
            one on its own (``model.refit``), the path the batched one is tested against.
    """
    model._require_fitted()
    start = time.perf_counter()
    features = model.transform(X_test)
    labels = as_labels(y_test)
    base = model.per_example_losses(features, labels)
    groups = tuple(np.unique(np.asarray(g, dtype=np.int64).reshape(-1)) for g in groups)
    n = model.n_train_
    for group in groups:
        if group.size and (group.min() < 0 or group.max() >= n):
            raise InfluenceExplorerError(f"Training indices must be in [0, {n}); got {group}.")
    count = len(groups)
    actual = np.empty((count, features.shape[0]))
    iterations = np.zeros(count, dtype=np.int64)
    norms = np.full(count, np.inf)
    together = np.zeros(count, dtype=bool)
    if batched and getattr(model, "supports_batched_refit", False) and count:
        solved = model.refit_without(
            groups,
            tol=tol,
            preconditioner=preconditioner,
            progress=None if progress is None else (lambda done: progress(done, count)),
        )
        together = solved.converged.copy()
        iterations[together] = solved.iterations[together]
        norms[together] = solved.gradient_norms[together]
        d, c = features.shape[1], model.n_outputs_
        for i in np.flatnonzero(together):
            # The same expression as per_example_losses of a refitted model.
            scores = features @ solved.parameters[i].reshape(d, c)
            actual[i] = (model.loss_.value(scores, labels) - base).numpy()
    done = int(together.sum())
    for i in np.flatnonzero(~together):
        weights = model.sample_weight_.clone()
        weights[torch.as_tensor(groups[i])] = 0.0
        refitted = model.refit(sample_weight=weights, tol=tol, preconditioner=preconditioner)
        actual[i] = (refitted.per_example_losses(features, labels) - base).numpy()
        iterations[i] = refitted.fit_info_.iterations
        norms[i] = refitted.fit_info_.gradient_norm
        done += 1
        if progress is not None:
            progress(done, count)
    return RetrainResult(
        groups=groups,
        actual=actual,
        base_loss=base.numpy(),
        iterations=iterations,
        gradient_norms=norms,
        seconds=time.perf_counter() - start,
        batched=together,
    )


def loo_retrain(
    model: LinearModel,
    train_indices: Any,
    X_test: Any,
    y_test: Any,
    **kwargs: Any,
) -> RetrainResult:
    """Leave-one-out: :func:`retrain_without` with each index as its own group."""
    return retrain_without(
        model, [[int(i)] for i in np.asarray(train_indices)], X_test, y_test, **kwargs
    )


@dataclass(frozen=True)
class Agreement:
    """How predicted changes in test loss match actual ones.

    Attributes:
        pearson, spearman: correlations of actual with predicted.
        slope: least-squares slope through the origin, Σ predicted·actual / Σ predicted²: the
            factor by which actual exceeds predicted (1 means predicted ≈ actual, not only the
            right order).
        affine_slope, intercept: the least-squares line actual ≈ affine_slope·predicted +
            intercept, for comparison (its slope can be 1 while every prediction is off by the
            intercept).
        n: number of points compared.
    """

    pearson: float
    spearman: float
    slope: float
    affine_slope: float
    intercept: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {
            "pearson": self.pearson,
            "spearman": self.spearman,
            "slope": self.slope,
            "affine_slope": self.affine_slope,
            "intercept": self.intercept,
            "n": self.n,
        }


def agreement(predicted: Any, actual: Any) -> Agreement:
    """Pearson, Spearman, the slope through the origin and the affine fit of actual against
    predicted."""
    x = np.asarray(predicted, dtype=np.float64).reshape(-1)
    y = np.asarray(actual, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InfluenceExplorerError("predicted and actual must have the same length.")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Agreement(math.nan, math.nan, math.nan, math.nan, math.nan, int(x.size))
    # Imported here: scipy.stats takes about a second to import, which every start of the app
    # and the command line would otherwise pay before anything is verified.
    from scipy import stats

    pearson = float(np.corrcoef(x, y)[0, 1])
    spearman = float(stats.spearmanr(x, y).statistic)
    slope = float(x @ y / (x @ x))
    affine_slope, intercept = np.polyfit(x, y, 1)
    return Agreement(pearson, spearman, slope, float(affine_slope), float(intercept), int(x.size))


@dataclass(frozen=True)
class Verification:
    """Predicted against actual leave-one-out change in one test point's loss.

    Attributes:
        test_position: row of the test inputs this is about.
        train_indices: (k,) the retrained points (top k by |score| of ``selected_by``).
        predicted: estimate name -> (k,) predicted changes.
        actual: (k,) actual changes from retraining.
        agreement: estimate name -> :class:`Agreement`.
        selected_by: the estimate whose |score| chose the points.
        seconds: retraining wall time (shared by all test points verified together).
        converged: every retrain reached the tolerance.
    """

    test_position: int
    train_indices: np.ndarray
    predicted: dict[str, np.ndarray]
    actual: np.ndarray
    agreement: dict[str, Agreement]
    selected_by: str
    seconds: float
    converged: bool


def verify(
    engine: InfluenceEngine,
    X_test: Any,
    y_test: Any,
    *,
    k: int = 50,
    select_by: Estimate | None = None,
    progress: Progress | None = None,
    batched: bool = True,
) -> list[Verification]:
    """Check influence against leave-one-out retraining for the top k points of each test point.

    The points are the k largest by |score| under ``select_by`` (default: the engine's default
    estimate); every estimate the engine offers is compared on the same retrained points. Each
    point is retrained once even if several test points share it. ``batched``: as
    :func:`retrain_without` (False retrains one at a time, e.g. to compare with the sharded
    engine, whose retrains are such refits).

    Returns:
        One :class:`Verification` per test point.
    """
    select_by = engine.default_estimate if select_by is None else select_by
    if select_by not in engine.estimates:
        raise InfluenceExplorerError(f"select_by must be one of {', '.join(engine.estimates)}.")
    if k < 3:
        raise InfluenceExplorerError("k must be at least 3 to compute correlations.")
    model = engine.model
    scores = engine.score_estimates(X_test, y_test)
    k = min(k, engine.n_train)
    chosen = [top_k_by_magnitude(row, k) for row in scores[select_by]]
    union = np.unique(np.concatenate(chosen))
    retrained = loo_retrain(
        model,
        union,
        X_test,
        y_test,
        progress=progress,
        preconditioner=engine.preconditioner,
        batched=batched,
    )
    return verifications(
        chosen,
        union,
        retrained,
        lambda t, indices, rows: {e: scores[e][t, indices] for e in engine.estimates},
        select_by,
    )


def verifications(
    chosen: list[np.ndarray],
    union: np.ndarray,
    retrained: RetrainResult,
    predicted: Callable[[int, np.ndarray, np.ndarray], dict[str, np.ndarray]],
    select_by: str,
) -> list[Verification]:
    """One Verification per test point from retrainings of the union of their top k.

    Args:
        chosen: per test point t, the k training indices it verifies.
        union: the sorted distinct indices retrained (``retrained.actual`` rows in this order).
        retrained: the leave-one-out result over ``union`` (actual changes (len(union), m)).
        predicted: (t, indices, rows) -> estimate name -> the k predicted changes, where
            ``rows`` are the positions of ``indices`` in ``union``.
        select_by: the estimate the top k was chosen by.
    """
    position = {int(j): i for i, j in enumerate(union)}
    results = []
    for t, indices in enumerate(chosen):
        rows = np.array([position[int(j)] for j in indices])
        actual = retrained.actual[rows, t]
        by_estimate = predicted(t, indices, rows)
        results.append(
            Verification(
                test_position=t,
                train_indices=indices,
                predicted=by_estimate,
                actual=actual,
                agreement={e: agreement(v, actual) for e, v in by_estimate.items()},
                selected_by=select_by,
                seconds=retrained.seconds,
                converged=retrained.converged,
            )
        )
    return results


__all__ = [
    "RETRAIN_TOL",
    "Agreement",
    "RetrainResult",
    "Verification",
    "agreement",
    "loo_retrain",
    "retrain_without",
    "verifications",
    "verify",
]
