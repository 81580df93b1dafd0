"""Influence of groups of training points (Koh, Ang, Teo & Liang 2019; Basu, You & Feizi 2020).

Removing a group U of training points follows the project's definition (docs/architecture.md): the
group's loss terms are dropped while the 1/n and λ stay,

    R_U(θ) = R(θ) - (1/n) Σ_{j∈U} w_j ℓ_j(θ),    R(θ) = (1/n) Σ_i w_i ℓ_i(θ) + (λ/2)‖θ‖²,

and the quantity predicted is the change in a test loss, ℓ_test(θ̂_{-U}) - ℓ_test(θ̂), in units of
test loss (positive: the group helped). Write g_U = Σ_{j∈U} w_j ∇ℓ_j(θ̂), A_U = Σ_{j∈U} w_j ∇²ℓ_j(θ̂)
and H = ∇²R(θ̂) (plus the solver's damping). Three estimates of θ̂_{-U} - θ̂ are compared, each
turned into a test-loss change by g_testᵀΔθ:

- ``"first_order"`` (Koh et al. 2019): Δθ₁ = (1/n) H⁻¹ g_U. Its test-loss change is exactly the sum of
  the members' first-order scores (influence is additive at first order).
- ``"second_order"`` (Basu et al. 2020): Δθ₂ = Δθ₁ + (1/n) H⁻¹ A_U Δθ₁
  = (1/n) H⁻¹ g_U + (1/n²) Σ_{i∈U} Σ_{j∈U} H⁻¹ w_i∇²ℓ_i H⁻¹ w_j∇ℓ_j. The double sum is the pairwise
  interaction term (its i = j part is each point's own second-order correction).
- ``"corrected"`` (the group analogue of the engine's Newton-corrected score): one exact Newton step
  from θ̂ on R_U, Δθ_N = (1/n) (H - A_U/n)⁻¹ g_U, computed by a Woodbury update on the low-rank
  per-example Hessian factors ∇²ℓ_j = (φ_j ⊗ B_j)(φ_j ⊗ B_j)ᵀ.

Derivation of the second-order term in this convention. Let R_t(θ) = R(θ) - (t/n) Σ_{j∈U} w_j ℓ_j(θ),
so t = 0 is the fitted model and t = 1 removes U, and let θ(t) be its minimiser:

    ∇R(θ(t)) - (t/n) g_U(θ(t)) = 0.

Differentiating once, [H(θ) - (t/n) A_U(θ)] θ' = (1/n) g_U(θ); at t = 0, θ'(0) = (1/n) H⁻¹ g_U = Δθ₁.
Differentiating again and setting t = 0,

    ∇³R[θ', θ'] - (1/n) A_U θ' + H θ'' = (1/n) A_U θ'   ⇒   θ''(0) = H⁻¹((2/n) A_U θ' - ∇³R[θ', θ']).

Dropping the third-derivative term, as Basu et al. do, the Taylor step θ(1) ≈ θ̂ + θ'(0) + ½θ''(0)
gives Δθ₂ above. Basu et al. renormalise the objective after removal to 1/(n - |U|), which puts the
factors (1 - 2p)/(1 - p)² and 1/(1 - p)² (p = |U|/n) on their two terms; keeping 1/n, as here, makes
both factors 1. Expanding the Newton step as a Neumann series,
(1/n)(H - A_U/n)⁻¹ g_U = Σ_k (1/n)(H⁻¹A_U/n)^k H⁻¹ g_U, shows that the first and second order
estimates are its first one and two terms: the Newton-corrected estimate sums the whole series
(still without third derivatives). When the terms share a sign, as they usually do for a group
that moves the model one way, the second order estimate lies between the other two.

Ground truth refits the model without each group (:func:`core.validation.retrain_without`,
warm-started and converged), so every figure here is predicted against actual.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.data import Dataset
from core.errors import InfluenceExplorerError
from core.explainer import FittedModel
from core.influence import ESTIMATES, InfluenceEngine
from core.linalg import cholesky_solve
from core.models import DTYPE, LinearModel, as_float64, as_labels
from core.validation import RETRAIN_TOL, Agreement, agreement, retrain_without

#: The three estimates of a group's effect: one, two, and all terms of the Newton step's series.
GROUP_ESTIMATES: tuple[str, ...] = ("first_order", "second_order", "corrected")
#: How groups are formed.
GROUP_KINDS: tuple[str, ...] = ("random", "class", "cluster", "helpful", "harmful", "custom")
#: Group sizes as fractions of the training set, about 0.25% to 25% (Koh et al. 2019).
DEFAULT_SIZES: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

StageProgress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


# ---------------------------------------------------------------------------------- k-means
@dataclass(frozen=True)
class KMeansResult:
    """A k-means clustering.

    Attributes:
        labels: (n,) cluster of each point.
        centers: (k, D) cluster means.
        inertia: sum of squared distances of the points to their centres.
        iterations: Lloyd iterations run.
    """

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    iterations: int


def _squared_distances(
    X: torch.Tensor, X_norms: torch.Tensor, centers: torch.Tensor
) -> torch.Tensor:
    # torch rather than numpy: one matrix product per k-means++ draw, and torch's threads stay
    # quiet on a busy machine.
    sq = X_norms[:, None] + (centers * centers).sum(1)[None, :] - 2.0 * (X @ centers.T)
    return sq.clamp_min_(0.0)


def kmeans(X: Any, n_clusters: int, *, seed: int = 0, max_iter: int = 100) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding, deterministic for a given seed.

    An emptied cluster is re-seeded with the point farthest from its centre, so every cluster
    keeps at least one point.

    Args:
        X: (n, D) points.
        n_clusters: k, between 1 and n.
        seed: seeds the k-means++ draws.
        max_iter: Lloyd iterations at most (it stops as soon as no assignment changes).
    """
    points = np.asarray(X, dtype=np.float64)
    if points.ndim != 2 or not np.isfinite(points).all():
        raise InfluenceExplorerError("k-means needs a finite (n, D) array of points.")
    n = points.shape[0]
    if not 1 <= int(n_clusters) <= n:
        raise InfluenceExplorerError(f"n_clusters must be between 1 and {n}; got {n_clusters}.")
    k = int(n_clusters)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.ascontiguousarray(points))
    norms = (data * data).sum(1)
    chosen = [int(rng.integers(n))]
    closest = _squared_distances(data, norms, data[chosen])[:, 0]
    for _ in range(1, k):
        weights = closest.numpy()
        total = weights.sum()
        # All remaining points coincide with a centre: any point will do.
        pick = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=weights / total))
        chosen.append(pick)
        closest = torch.minimum(closest, _squared_distances(data, norms, data[[pick]])[:, 0])
    centers = data[chosen].clone()
    labels = np.full(n, -1, dtype=np.int64)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        distances = _squared_distances(data, norms, centers)
        new_labels = distances.argmin(1).numpy()
        counts = np.bincount(new_labels, minlength=k)
        own = distances[torch.arange(n), torch.from_numpy(new_labels)].numpy()
        for empty in np.flatnonzero(counts == 0):
            # Take the farthest point from a cluster that keeps another member (k <= n ensures
            # one exists), so re-seeding never empties a cluster in turn.
            far = int(np.where(counts[new_labels] > 1, own, -np.inf).argmax())
            counts[new_labels[far]] -= 1
            new_labels[far] = empty
            counts[empty] = 1
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centers).index_add_(0, torch.from_numpy(labels), data)
        centers = sums / torch.from_numpy(counts).to(sums.dtype)[:, None]
    centers_np = centers.numpy()
    inertia = float(((points - centers_np[labels]) ** 2).sum())
    return KMeansResult(labels=labels, centers=centers_np, inertia=inertia, iterations=iterations)


# ---------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class Group:
    """A set of training points removed together.

    Attributes:
        kind: one of :data:`GROUP_KINDS`.
        indices: sorted, unique training indices.
        target_size: the size asked for (a k-means cluster has its own size).
        description: e.g. "random, 10 points" or "cluster 3 of 40 (12 points)".
    """

    kind: str
    indices: np.ndarray
    target_size: int
    description: str

    @property
    def size(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class GroupConfig:
    """Which groups to form. Frozen and hashable, so it can key a cache.

    Attributes:
        kinds: group kinds among "random", "class" (random within one class, the classes taken in
            turn), "cluster" (k-means clusters in the model's input space: backbone features for
            the logistic regression, pixels for the SVM), "helpful"/"harmful" (the top-k tails of
            the test point's scores), "custom" (``custom``).
        sizes: group sizes as fractions of the training set, in (0, 1).
        groups_per_size: groups of each random kind (random, class, cluster) per size; the tails
            give one group per size.
        custom: training indices of a user-chosen group (needed for kind "custom").
        seed: seeds the random groups and k-means.
        tail_estimate: which single-point score ranks the helpful and harmful tails.
    """

    kinds: tuple[str, ...] = ("random", "class", "cluster", "helpful", "harmful")
    sizes: tuple[float, ...] = DEFAULT_SIZES
    groups_per_size: int = 3
    custom: tuple[int, ...] | None = None
    seed: int = 0
    tail_estimate: str = "corrected"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "sizes", tuple(float(s) for s in self.sizes))
        if self.custom is not None:
            object.__setattr__(self, "custom", tuple(int(i) for i in self.custom))
            if "custom" not in self.kinds:
                object.__setattr__(self, "kinds", (*self.kinds, "custom"))
        if not self.kinds:
            raise InfluenceExplorerError("kinds must name at least one group kind.")
        unknown = [k for k in self.kinds if k not in GROUP_KINDS]
        if unknown:
            raise InfluenceExplorerError(
                f"kinds must be among {', '.join(GROUP_KINDS)}; got {', '.join(map(repr, unknown))}."
            )
        if "custom" in self.kinds and not self.custom:
            raise InfluenceExplorerError(
                "kind 'custom' needs the training indices of the group (custom=...)."
            )
        needs_sizes = any(k != "custom" for k in self.kinds)
        if needs_sizes and not self.sizes:
            raise InfluenceExplorerError("sizes must list at least one group size.")
        bad = [s for s in self.sizes if not (0 < s < 1 and math.isfinite(s))]
        if bad:
            raise InfluenceExplorerError(
                f"sizes are fractions of the training set, each in (0, 1); got {bad}."
            )
        if int(self.groups_per_size) < 1:
            raise InfluenceExplorerError(
                f"groups_per_size must be >= 1; got {self.groups_per_size!r}."
            )
        if self.tail_estimate not in ESTIMATES:
            raise InfluenceExplorerError(
                f"tail_estimate must be one of {', '.join(ESTIMATES)}; got {self.tail_estimate!r}."
            )


def size_count(fraction: float, n: int) -> int:
    """A size given as a fraction of n, as a number of points (at least 1, at most n - 1)."""
    return int(min(max(1, round(fraction * n)), n - 1))


def _sizes_in_points(config: GroupConfig, n: int) -> list[int]:
    """The config's distinct group sizes in points, increasing (two fractions may round alike)."""
    return sorted({size_count(f, n) for f in config.sizes})


def _n_clusters(size: int, n: int) -> int:
    """k for the k-means that makes clusters of about ``size`` points out of n."""
    return max(2, min(n, round(n / size)))


def count_groups(config: GroupConfig, n: int) -> int:
    """How many groups :func:`make_groups` forms for ``config`` on n training points, without
    forming them (no clustering, no scores): what a user is told before retraining once per group.

    Args:
        config: kinds, sizes and groups per size.
        n: training set size.
    """
    sizes = _sizes_in_points(config, n)
    total = 0
    for kind in config.kinds:
        if kind == "custom":
            total += 1
        elif kind in ("helpful", "harmful"):
            total += len(sizes)
        elif kind == "cluster":
            # groups_per_size of the clusters are used, or every cluster if there are fewer.
            total += sum(min(config.groups_per_size, _n_clusters(size, n)) for size in sizes)
        else:  # random, class
            total += len(sizes) * config.groups_per_size
    return total


def make_groups(
    config: GroupConfig,
    *,
    labels: Any,
    features: Any | None = None,
    scores: Any | None = None,
    class_names: Sequence[str] | None = None,
    progress: StageProgress | None = None,
) -> tuple[Group, ...]:
    """Form the groups a :class:`GroupConfig` describes.

    Args:
        config: kinds, sizes and seed.
        labels: (n,) training labels (for "class" groups).
        features: (n, D) points to cluster (needed for "cluster").
        scores: (n,) single-point influence scores on the test point (needed for the tails).
        class_names: names of the classes, for the descriptions.
        progress: ``progress(stage, done, total)`` while clustering.

    Returns:
        The groups, in the order kinds x sizes x repeats; :func:`count_groups` of them.
    """
    report = progress or _no_progress
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n < 3:
        raise InfluenceExplorerError("Groups need a training set of at least 3 points.")
    rng = np.random.default_rng(config.seed)
    counts = _sizes_in_points(config, n)
    classes = np.unique(labels)
    out: list[Group] = []
    for kind in config.kinds:
        if kind == "custom":
            out.append(_custom_group(config.custom or (), n))
        elif kind == "random":
            for size in counts:
                for _ in range(config.groups_per_size):
                    chosen = np.sort(rng.choice(n, size=size, replace=False))
                    out.append(Group(kind, chosen, size, f"random, {size} points"))
        elif kind == "class":
            turn = 0
            for size in counts:
                for _ in range(config.groups_per_size):
                    c = classes[turn % len(classes)]
                    turn += 1
                    members = np.flatnonzero(labels == c)
                    take = min(size, len(members))
                    chosen = np.sort(rng.choice(members, size=take, replace=False))
                    name = class_names[int(c)] if class_names is not None else f"class {int(c)}"
                    out.append(Group(kind, chosen, size, f"random in '{name}', {take} points"))
        elif kind == "cluster":
            if features is None:
                raise InfluenceExplorerError("Cluster groups need the training features.")
            points = np.asarray(features, dtype=np.float64)
            for position, size in enumerate(counts):
                report("Clustering the training set (k-means)", position, len(counts))
                n_clusters = _n_clusters(size, n)
                result = kmeans(points, n_clusters, seed=config.seed + position)
                picks = rng.permutation(n_clusters)[: config.groups_per_size]
                for c in picks:
                    chosen = np.flatnonzero(result.labels == c)
                    out.append(
                        Group(
                            kind,
                            chosen,
                            size,
                            f"cluster {int(c)} of {n_clusters} ({len(chosen)} points)",
                        )
                    )
            report("Clustering the training set (k-means)", len(counts), len(counts))
        else:  # helpful / harmful tails
            if scores is None:
                raise InfluenceExplorerError(f"'{kind}' groups need the test point's scores.")
            s = np.asarray(scores, dtype=np.float64).reshape(-1)
            order = np.argsort(-s if kind == "helpful" else s, kind="stable")
            for size in counts:
                chosen = np.sort(order[:size])
                out.append(Group(kind, chosen, size, f"top {size} most {kind}"))
    return tuple(out)


def _custom_group(indices: Sequence[int], n: int) -> Group:
    chosen = np.unique(np.asarray(indices, dtype=np.int64))
    if chosen.size == 0:
        raise InfluenceExplorerError("A custom group needs at least one training index.")
    if chosen.min() < 0 or chosen.max() >= n:
        raise InfluenceExplorerError(
            f"Custom group indices must be in [0, {n}); got {int(chosen.min())}..{int(chosen.max())}."
        )
    if chosen.size >= n:
        raise InfluenceExplorerError("A custom group cannot hold the whole training set.")
    return Group("custom", chosen, int(chosen.size), f"your selection ({chosen.size} points)")


# ---------------------------------------------------------------------------------- predictions
def predicted_params_change(
    engine: InfluenceEngine, group: Any, estimates: Sequence[str] = GROUP_ESTIMATES
) -> dict[str, torch.Tensor]:
    """Predicted θ̂_{-U} - θ̂ for removing one group, by each estimate (see the module docstring).

    Works with any solver of the engine (only ``inverse_hvp`` is used): one solve for the first
    order, and |U|·r more (r the rank of a per-example Hessian, 1 for binary models) for the
    second order and the Newton-corrected estimate, which share H⁻¹U.

    Args:
        engine: the fitted model's influence engine.
        group: training indices of the group.
        estimates: which of :data:`GROUP_ESTIMATES` to compute.
    Returns:
        estimate -> (p,) predicted parameter change.
    """
    unknown = [e for e in estimates if e not in GROUP_ESTIMATES]
    if unknown:
        raise InfluenceExplorerError(
            f"estimates must be among {', '.join(GROUP_ESTIMATES)}; got {unknown}."
        )
    model = engine.model
    n = model.n_train_
    idx = torch.as_tensor(np.unique(np.asarray(group, dtype=np.int64).reshape(-1)))
    if idx.numel() == 0:
        return {e: torch.zeros(model.n_params_, dtype=DTYPE) for e in estimates}
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise InfluenceExplorerError(f"Training indices must be in [0, {n}).")
    phi = model.features_[idx]
    labels = model.labels_[idx]
    weights = model.sample_weight_[idx]
    g_group = (model.per_example_gradients(phi, labels) * weights[:, None]).sum(0)
    first = engine.solver.inverse_hvp(g_group) / n
    out: dict[str, torch.Tensor] = {}
    if "first_order" in estimates:
        out["first_order"] = first
    if "second_order" in estimates or "corrected" in estimates:
        # Columns φ_j ⊗ (√w_j B_j[:, a]) of U, so that A_U = U Uᵀ. Layout θ[k·C + c] = W[k, c].
        factors = model.example_hessian_factors(phi, labels) * weights.sqrt()[:, None, None]
        k, _, r = factors.shape
        U = (phi[:, :, None, None] * factors[:, None, :, :]).reshape(k, -1, r)
        U = U.permute(1, 0, 2).reshape(-1, k * r)  # (p, k·r)
        V = engine.solver.inverse_hvp(U)  # H⁻¹U
        projected = U.T @ first  # Uᵀ Δθ₁
        if "second_order" in estimates:
            out["second_order"] = first + V @ projected / n
        if "corrected" in estimates:
            # (H - UUᵀ/n)⁻¹ = H⁻¹ + V (nI - UᵀV)⁻¹ Vᵀ (Woodbury); nI - UᵀV is positive definite
            # because H - A_U/n is the Hessian of the (strictly convex) objective without U.
            inner = n * torch.eye(k * r, dtype=DTYPE) - U.T @ V
            inner = 0.5 * (inner + inner.T)
            chol, info = torch.linalg.cholesky_ex(inner)
            if int(info) == 0:
                z = cholesky_solve(chol, projected)
            else:
                z = torch.linalg.lstsq(inner, projected[:, None]).solution[:, 0]
            out["corrected"] = first + V @ z
    return {e: out[e] for e in estimates}


def _scores_at(model: LinearModel, features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return features @ theta.reshape(features.shape[1], model.n_outputs_)


def _predictions_from_scores(scores: torch.Tensor) -> np.ndarray:
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).to(torch.int64).numpy()
    return scores.argmax(1).numpy()


# ---------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class SizeTrend:
    """How predicted and actual effects compare at one group size (across groups of that size).

    Attributes:
        target_size: the size asked for; mean_size: the groups' mean actual size.
        n_groups: groups of this size.
        ratio: estimate -> median of actual / predicted change in the test point's loss
            (above 1: the estimate under-estimates the effect).
        slope: estimate -> least-squares slope through the origin of actual against predicted.
    """

    target_size: int
    mean_size: float
    n_groups: int
    ratio: dict[str, float]
    slope: dict[str, float]


@dataclass(frozen=True)
class GroupExperiment:
    """Predicted against actual effects of removing each of many groups.

    Changes are "after removal minus before", so a positive change in the test point's loss means
    the group helped its prediction. Each estimate's Δθ is turned into a loss change two ways:

    - linearised, g_testᵀΔθ (``predicted``, ``predicted_test_loss``): the papers' quantity; the first
      order one is exactly the sum of the members' first-order scores;
    - at the predicted parameters, ℓ_test(θ̂ + Δθ) - ℓ_test(θ̂) (``*_at_params``): exact for the test
      loss given Δθ (the models are linear in θ), so it isolates how well Δθ is predicted from the
      curvature of the test loss, which dominates once a large group moves a margin a lot.

    Attributes:
        groups: the groups, in order.
        test_position, test_label: the test point (row of the test inputs) and the label whose
            loss is explained.
        base_loss: that loss at θ̂; base_test_loss, base_test_accuracy: mean test loss and
            accuracy over the whole test set (true labels) at θ̂.
        predicted, predicted_at_params: estimate -> (G,) predicted change in the test point's loss.
        actual: (G,) actual change from retraining.
        predicted_test_loss, predicted_test_loss_at_params, actual_test_loss: the same for the mean
            test-set loss.
        predicted_test_accuracy: estimate -> (G,) test accuracy of θ̂ + predicted Δθ;
        actual_test_accuracy: (G,) test accuracy of the retrained models.
        agreement, agreement_at_params: estimate -> Pearson/Spearman/slope over all groups (test
            point's loss).
        agreement_test_loss, agreement_test_loss_at_params: the same for the mean test-set loss.
        agreement_by_kind: kind -> estimate -> agreement within that kind (test point, linearised).
        size_trend: one :class:`SizeTrend` per group size, smallest first (test point, linearised).
        iterations, converged: Newton iterations per retrain, and whether all reached tolerance.
        predict_seconds, retrain_seconds: wall time of the predictions and of the retraining.
    """

    groups: tuple[Group, ...]
    test_position: int
    test_label: int
    base_loss: float
    base_test_loss: float
    base_test_accuracy: float
    predicted: dict[str, np.ndarray]
    predicted_at_params: dict[str, np.ndarray]
    actual: np.ndarray
    predicted_test_loss: dict[str, np.ndarray]
    predicted_test_loss_at_params: dict[str, np.ndarray]
    actual_test_loss: np.ndarray
    predicted_test_accuracy: dict[str, np.ndarray]
    actual_test_accuracy: np.ndarray
    agreement: dict[str, Agreement]
    agreement_at_params: dict[str, Agreement]
    agreement_test_loss: dict[str, Agreement]
    agreement_test_loss_at_params: dict[str, Agreement]
    agreement_by_kind: dict[str, dict[str, Agreement]]
    size_trend: tuple[SizeTrend, ...]
    iterations: np.ndarray
    converged: bool
    predict_seconds: float
    retrain_seconds: float

    @property
    def sizes(self) -> np.ndarray:
        """(G,) number of points in each group."""
        return np.array([g.size for g in self.groups], dtype=np.int64)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(g.kind for g in self.groups)

    def mean_absolute_error(self, *, at_params: bool = False) -> dict[str, float]:
        """estimate -> mean |predicted - actual| over the groups (test point's loss)."""
        predicted = self.predicted_at_params if at_params else self.predicted
        return {e: float(np.mean(np.abs(p - self.actual))) for e, p in predicted.items()}


def _ratio_and_slope(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    usable = np.abs(predicted) > 1e-12
    ratio = float(np.median(actual[usable] / predicted[usable])) if usable.any() else math.nan
    denominator = float(predicted @ predicted)
    slope = float(predicted @ actual) / denominator if denominator > 0 else math.nan
    return ratio, slope


def group_experiment(
    engine: InfluenceEngine,
    groups: Sequence[Group],
    X_test: Any,
    y_test: Any,
    *,
    test_position: int,
    test_label: int | None = None,
    progress: StageProgress | None = None,
) -> GroupExperiment:
    """Predict (three estimates) and measure (retraining) the effect of removing each group.

    Args:
        engine: influence engine of the fitted model.
        groups: from :func:`make_groups`.
        X_test: (m, D) test inputs in the model's input space; y_test: (m,) true labels.
        test_position: the row of ``X_test`` whose loss is explained.
        test_label: the label whose loss is explained (default: its true label).
        progress: ``progress(stage, done, total)``.
    """
    report = progress or _no_progress
    if not groups:
        raise InfluenceExplorerError("No groups to evaluate.")
    model = engine.model
    X_test = as_float64(X_test)
    y_test = as_labels(y_test)
    m = X_test.shape[0]
    if not 0 <= int(test_position) < m:
        raise InfluenceExplorerError(f"test_position must be in [0, {m}); got {test_position}.")
    position = int(test_position)
    label = int(y_test[position]) if test_label is None else int(test_label)
    n_classes = model.n_classes_
    if not 0 <= label < n_classes:
        raise InfluenceExplorerError(f"test_label must be in [0, {n_classes}); got {label}.")
    focus_label = torch.tensor([label])

    start = time.perf_counter()
    features = model.transform(X_test)
    focus = features[position : position + 1]
    focus_gradient = model.per_example_gradients(focus, focus_label)[0]
    test_gradients = model.per_example_gradients(features, y_test)  # (m, p)
    base_loss = float(model.per_example_losses(focus, focus_label)[0])
    base_losses = model.per_example_losses(features, y_test)
    base_predictions = _predictions_from_scores(_scores_at(model, features, model.theta_))
    truth = y_test.numpy()
    G = len(groups)

    def empty() -> dict[str, np.ndarray]:
        return {e: np.empty(G) for e in GROUP_ESTIMATES}

    predicted, at_params = empty(), empty()
    test_loss, test_loss_at_params, test_accuracy = empty(), empty(), empty()
    # The first-order group effect is the (weighted) sum of the points' own first-order scores.
    individual = (
        engine.influence_scores(
            X_test[position : position + 1], focus_label, estimate="first_order"
        )[0]
        * model.sample_weight_.numpy()
    )
    for i, group in enumerate(groups):
        report("Predicting group effects", i, G)
        for estimate, delta in predicted_params_change(engine, group.indices).items():
            theta = model.theta_ + delta
            scores = _scores_at(model, features, theta)
            losses = model.loss_.value(scores, y_test)
            focus_loss = model.loss_.value(_scores_at(model, focus, theta), focus_label)[0]
            predicted[estimate][i] = (
                float(individual[group.indices].sum())
                if estimate == "first_order"
                else float(focus_gradient @ delta)
            )
            at_params[estimate][i] = float(focus_loss) - base_loss
            test_loss[estimate][i] = float((test_gradients @ delta).mean())
            test_loss_at_params[estimate][i] = float((losses - base_losses).mean())
            test_accuracy[estimate][i] = float(np.mean(_predictions_from_scores(scores) == truth))
    report("Predicting group effects", G, G)
    predict_seconds = time.perf_counter() - start

    # One retrain per group gives the test point's loss and, through the loss of every class for
    # every test point, the retrained predictions: each loss here is strictly decreasing in the
    # score margin of the labelled class, so the predicted class is the one of least loss.
    eval_inputs = torch.cat([X_test[position : position + 1], X_test.repeat(n_classes, 1)])
    eval_labels = torch.cat([focus_label, torch.arange(n_classes).repeat_interleave(m)])
    stage = f"Retraining without each of {G} groups"
    preconditioner = engine.preconditioner
    retrained = retrain_without(
        model,
        [g.indices for g in groups],
        eval_inputs,
        eval_labels,
        tol=RETRAIN_TOL,
        preconditioner=preconditioner,
        progress=lambda done, total: report(stage, done, total),
    )
    actual = retrained.actual[:, 0]
    per_class = (retrained.base_loss[1:] + retrained.actual[:, 1:]).reshape(G, n_classes, m)
    true_losses = np.take_along_axis(per_class, truth[None, None, :], axis=1)[:, 0, :]
    actual_test_loss = (true_losses - base_losses.numpy()[None, :]).mean(1)
    actual_accuracy = (per_class.argmin(1) == truth[None, :]).mean(1)

    def agree(pred: dict[str, np.ndarray], truth_: np.ndarray) -> dict[str, Agreement]:
        return {e: agreement(pred[e], truth_) for e in GROUP_ESTIMATES}

    kinds = sorted({g.kind for g in groups}, key=GROUP_KINDS.index)
    by_kind = {}
    for kind in kinds:
        rows = np.array([g.kind == kind for g in groups])
        by_kind[kind] = agree({e: v[rows] for e, v in predicted.items()}, actual[rows])
    trend = []
    target_sizes = np.array([g.target_size for g in groups])
    sizes = np.array([g.size for g in groups])
    for size in np.unique(target_sizes):
        rows = target_sizes == size
        ratios, slopes = {}, {}
        for e in GROUP_ESTIMATES:
            ratios[e], slopes[e] = _ratio_and_slope(predicted[e][rows], actual[rows])
        trend.append(
            SizeTrend(
                target_size=int(size),
                mean_size=float(sizes[rows].mean()),
                n_groups=int(rows.sum()),
                ratio=ratios,
                slope=slopes,
            )
        )
    return GroupExperiment(
        groups=tuple(groups),
        test_position=position,
        test_label=label,
        base_loss=base_loss,
        base_test_loss=float(base_losses.mean()),
        base_test_accuracy=float(np.mean(base_predictions == truth)),
        predicted=predicted,
        predicted_at_params=at_params,
        actual=actual,
        predicted_test_loss=test_loss,
        predicted_test_loss_at_params=test_loss_at_params,
        actual_test_loss=actual_test_loss,
        predicted_test_accuracy=test_accuracy,
        actual_test_accuracy=actual_accuracy,
        agreement=agree(predicted, actual),
        agreement_at_params=agree(at_params, actual),
        agreement_test_loss=agree(test_loss, actual_test_loss),
        agreement_test_loss_at_params=agree(test_loss_at_params, actual_test_loss),
        agreement_by_kind=by_kind,
        size_trend=tuple(trend),
        iterations=retrained.iterations,
        converged=retrained.converged,
        predict_seconds=predict_seconds,
        retrain_seconds=retrained.seconds,
    )


def first_misclassified(models: Iterable[FittedModel], test_labels: Any) -> int:
    """The first test image every model gets wrong (else the first any model gets wrong, else 0).

    The default test point of the group experiment: on a mistake the explained loss is large and
    the losses are in their steep part (a confidently right SVM prediction sits on the flat side
    of the smooth hinge, where every predicted group effect is close to zero).
    """
    truth = np.asarray(test_labels)
    wrong = [f.model.predict(f.test_inputs) != truth for f in models]
    if not wrong:
        return 0
    for rows in (np.logical_and.reduce(wrong), np.logical_or.reduce(wrong)):
        if rows.any():
            return int(np.flatnonzero(rows)[0])
    return 0


def model_group_experiment(
    fitted: FittedModel,
    dataset: Dataset,
    config: GroupConfig | None = None,
    *,
    test_index: int = 0,
    target: str = "true",
    progress: StageProgress | None = None,
) -> GroupExperiment:
    """:func:`group_experiment` for one fitted model of an explainer's collection.

    Args:
        fitted: the model (not modified).
        dataset: the data it was fitted on (the explainer's ``dataset``).
        config: the groups to form (default :class:`GroupConfig`).
        test_index: the test image whose loss is explained; the test-set figures use all.
        target: "true" (its true label) or "predicted" (the model's prediction).
        progress: ``progress(stage, done, total)``.
    """
    if target not in ("true", "predicted"):
        raise InfluenceExplorerError(f"target must be 'true' or 'predicted'; got {target!r}.")
    config = config if config is not None else GroupConfig()
    n_test = dataset.n_test
    if not 0 <= int(test_index) < n_test:
        raise InfluenceExplorerError(f"test_index must be in [0, {n_test}); got {test_index}.")
    inputs = fitted.test_inputs[int(test_index) : int(test_index) + 1]
    label = (
        int(dataset.test_labels[int(test_index)])
        if target == "true"
        else int(fitted.model.predict(inputs)[0])
    )
    scores = None
    if "helpful" in config.kinds or "harmful" in config.kinds:
        scores = fitted.engine.influence_scores(inputs, [label], estimate=config.tail_estimate)[0]
    groups = make_groups(
        config,
        labels=fitted.model.labels_.numpy(),
        features=fitted.model.training_inputs_.numpy() if "cluster" in config.kinds else None,
        scores=scores,
        class_names=list(dataset.class_names),
        progress=progress,
    )
    return group_experiment(
        fitted.engine,
        groups,
        fitted.test_inputs,
        dataset.test_labels,
        test_position=int(test_index),
        test_label=label,
        progress=progress,
    )


__all__ = [
    "DEFAULT_SIZES",
    "GROUP_ESTIMATES",
    "GROUP_KINDS",
    "Group",
    "GroupConfig",
    "GroupExperiment",
    "KMeansResult",
    "SizeTrend",
    "count_groups",
    "first_misclassified",
    "group_experiment",
    "kmeans",
    "make_groups",
    "model_group_experiment",
    "predicted_params_change",
    "size_count",
]
