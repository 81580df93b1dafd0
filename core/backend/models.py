"""The convex models fitted on shards by map-reduce.

:class:`ShardedLogisticRegression` and :class:`ShardedNystroemSVM` are the in-process
:class:`~core.models.LogisticRegression` and :class:`~core.models.NystroemSVM` with their data
access replaced: the training features stay in shards on the workers, and every quantity that
sums over training points (objective, gradient, Hessian, Hessian-vector products) is a sum of
per-shard partials (:mod:`core.backend.kernels`) reduced in a tree. Everything else is the
in-process code, inherited: the same loss formulas (:mod:`core.losses`), the same damped Newton
with line search and stopping rule ‖∇R‖ <= tol (:meth:`~core.models.LinearModel._newton`), the
same Newton step — a dense Cholesky solve on the driver up to
:data:`~core.models.DENSE_NEWTON_MAX_PARAMS` parameters, beyond it conjugate gradients
(:func:`core.linalg.conjugate_gradient`) on distributed Hessian-vector products — and the same
warm-started, preconditioned refit for leave-one-out retraining.

They implement the engine's :class:`~core.influence.TwiceDifferentiable` protocol, so
:class:`~core.influence.InfluenceEngine`'s solvers run on them unchanged; the per-training-point
quantities are in :class:`~core.backend.engine.ShardedInfluenceEngine`.

The exact kernel SVM (:class:`~core.models.KernelSVM`) is not here: its n x n kernel and
Cholesky factor are one machine's work, and :func:`core.models.make_rbf_svm` uses it only while
it fits in memory (beyond that the Nyström SVM).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from core.backend import kernels
from core.backend.runner import Runner
from core.backend.shards import ShardedData
from core.errors import InfluenceExplorerError, NonFiniteFeaturesError
from core.losses import LossDerivatives
from core.models import (
    DTYPE,
    MEDIAN_SAMPLE,
    ClassBasisHessian,
    FitInfo,
    LinearModel,
    LogisticRegression,
    NystroemSVM,
    _jittered_cholesky,
    as_float64,
    class_rotation,
    has_class_basis,
    output_scale,
    rbf_gamma,
    rbf_kernel,
)


class ShardedTerms:
    """Per-shard loss derivatives at one θ, as runner handles (they stay on the workers)."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles


class ShardedLinearModel(LinearModel):
    """The data-touching half of :class:`~core.models.LinearModel` as map-reduce over shards.

    A mixin placed just above ``LinearModel`` in a model's bases (see
    :class:`ShardedLogisticRegression`), so the model's own loss, feature map for new inputs
    (``transform``), Newton loop and predictions are inherited unchanged.

    Fitted attributes: ``data_`` (the feature shards the linear model sees), ``inputs_`` (the
    training inputs), ``theta_``, ``fit_info_``, ``loss_``, ``n_classes_``, ``n_outputs_``.
    Unlike the in-process models there is no ``features_``: no (n, d) array exists on the driver.
    """

    data_: ShardedData
    inputs_: ShardedData

    # The batched refit (LinearModel.refit_without) works on the features in this process; on
    # shards each retrain is its own fit (ShardedInfluenceEngine.loo_retrain maps them to tasks).
    supports_batched_refit = False

    # ------------------------------------------------------------------ subclass hook
    def _sharded_feature_map(self, data: ShardedData) -> ShardedData:
        """Set up the feature map from the training inputs; return the feature shards."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fitting
    def fit(  # type: ignore[override]
        self,
        X: ShardedData,
        y: Any | None = None,
        sample_weight: Any | None = None,
        theta0: Any | None = None,
    ) -> ShardedLinearModel:
        """Fit to ‖∇R‖ <= tol by Newton's method, every data pass a map-reduce over shards.

        Args:
            X: the training inputs in shards (:class:`~core.backend.shards.ShardedData`).
            y: optional (n,) labels; when given they must equal the shards' labels (a check
                that the shards are the data the caller thinks they are).
            sample_weight: optional (n,) weights w_i (the objective still divides by n).
            theta0: optional starting parameters (p,).
        """
        if not isinstance(X, ShardedData):
            raise InfluenceExplorerError(
                f"{type(self).__name__} fits sharded data (core.backend.ShardedData); got "
                f"{type(X).__name__}. Use the in-process model for arrays."
            )
        self._check_hyperparameters()
        if X.n < 2:
            raise InfluenceExplorerError("At least two training points are needed to fit.")
        if y is not None and not np.array_equal(np.asarray(y).reshape(-1), X.labels()):
            raise InfluenceExplorerError(
                "y does not match the labels held in the shards; build the shards from the same "
                "rows (or pass y=None)."
            )
        runner = X.runner
        if X.nonfinite:
            raise NonFiniteFeaturesError(
                f"The training inputs contain NaN or infinite values in {X.nonfinite} rows; check "
                "the features (a damaged cache file or a broken image) and recompute them."
            )
        low, _ = X.label_range
        if low < 0:
            raise InfluenceExplorerError("Labels must be class indices >= 0.")
        self.n_classes_ = self._infer_n_classes(torch.tensor(X.label_range))
        self.loss_ = self._make_loss(self.n_classes_)
        self.n_outputs_ = self.loss_.n_outputs(self.n_classes_)
        self.inputs_ = X
        with runner.stage(f"{type(self).__name__}: feature map"):
            self.data_ = self._sharded_feature_map(X)
        self._shard_sizes = X.sizes
        self._shard_weights = self._split_weights(sample_weight)
        self._fit_parameters(None if theta0 is None else as_float64(theta0))
        return self

    def _split_weights(self, sample_weight: Any | None) -> list[np.ndarray | None]:
        """(n,) weights -> one array per shard (None where all are one)."""
        sizes = self.inputs_.sizes
        if sample_weight is None:
            return [None] * len(sizes)
        w = self._weights(sample_weight, sum(sizes)).numpy()
        out: list[np.ndarray | None] = []
        for offset, size in zip(self.inputs_.offsets, sizes, strict=True):
            part = np.ascontiguousarray(w[offset : offset + size])
            out.append(None if np.all(part == 1.0) else part)
        return out

    @property
    def runner(self) -> Runner:
        return self.data_.runner

    @property
    def sample_weight_(self) -> torch.Tensor:
        """(n,) the fit's sample weights (built on demand; the shards keep their own parts)."""
        parts = [
            np.ones(size) if w is None else w
            for w, size in zip(self._shard_weights, self.inputs_.sizes, strict=True)
        ]
        return torch.from_numpy(np.concatenate(parts))

    def _fit_parameters(self, theta0: torch.Tensor | None) -> None:
        start = time.perf_counter()
        p = self.data_.dim * self.n_outputs_
        theta = torch.zeros(p, dtype=DTYPE) if theta0 is None else as_float64(theta0).clone()
        if theta.shape != (p,):
            raise InfluenceExplorerError(
                f"theta0 must have shape ({p},), got {tuple(theta.shape)}."
            )
        with self.runner.stage(f"Fitting {type(self).__name__} (Newton)"):
            theta, info = self._newton(theta, start)
        self.theta_ = theta
        self.fit_info_: FitInfo = info
        with self.runner.stage(f"{type(self).__name__}: derivatives at the optimum"):
            self._train_terms = self._terms(theta)

    def _terms(self, theta: torch.Tensor) -> ShardedTerms:
        handles = self.runner.map(
            kernels.objective_terms,
            [self.data_.shards, self._shard_weights],
            theta.numpy(),
            self.loss_,
            self.n_outputs_,
        )
        return ShardedTerms(handles)

    # ------------------------------------------------------------------ the sums
    def _objective_terms(self, theta: torch.Tensor) -> tuple[float, torch.Tensor, Any]:
        n = self.data_.n
        terms = self._terms(theta)
        value_sum, gradient_sum = self.runner.map_sum(
            kernels.terms_partial, [terms.handles], where=self.data_.shards
        )
        value = float(value_sum) / n + 0.5 * self.l2 * float(theta @ theta)
        grad = gradient_sum / n + self.l2 * theta
        return value, grad, terms

    def _dual_newton_applies(self, derivs: Any, p: int) -> bool:
        # The dual (Woodbury) Newton step needs the n x n Gram matrix of the features on the
        # driver; a sharded fit has far more rows than parameters and takes the primal step.
        return False

    def _hessian_from(self, derivs: Any) -> torch.Tensor:
        hessian = self.runner.map_sum(
            kernels.hessian_part,
            [self.data_.shards, derivs.handles, self._shard_weights],
            self.data_.n,
            self.n_outputs_,
        )
        hessian.diagonal().add_(self.l2)
        return hessian

    def feature_shape(self) -> tuple[int, int] | None:
        """(n, d) of the feature shards, or None before fitting."""
        data = getattr(self, "data_", None)
        return None if data is None else (int(data.n), int(data.dim))

    def class_basis_hessian(self) -> ClassBasisHessian | None:
        """The Hessian at θ̂ in the class basis, its blocks summed over shards (see
        :meth:`core.models.LinearModel.class_basis_hessian`)."""
        self._require_fitted()
        with self.runner.stage("Hessian at the optimum in the class basis"):
            return self._class_basis_from(self._train_terms)

    def _class_basis_from(self, derivs: Any) -> ClassBasisHessian | None:
        if not has_class_basis(self):
            return None
        rotation = class_rotation(self.n_outputs_)
        checks = self.runner.gather(
            self.runner.map(kernels.class_basis_check, [derivs.handles], rotation)
        )
        along_q = max(check[0] for check in checks)
        scale = max(check[1] for check in checks)
        # As in-process: the rows along q are zero to rounding for a shift-invariant loss.
        if along_q > 1e-10 * max(scale, 1e-300):
            return None
        matrix = self.runner.map_sum(
            kernels.class_basis_part,
            [self.data_.shards, derivs.handles, self._shard_weights],
            self.data_.n,
            rotation,
        )
        matrix.diagonal().add_(self.l2)
        return ClassBasisHessian(matrix, rotation, float(self.l2))

    def _hvp_from(
        self, derivs: Any, vectors: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        squeeze = vectors.ndim == 1
        v = vectors[:, None] if squeeze else vectors
        array = v.numpy()
        if indices is None:
            out = self.runner.map_sum(
                kernels.hvp_part,
                [self.data_.shards, derivs.handles, self._shard_weights],
                self.data_.n,
                self.n_outputs_,
                array,
            )
        else:
            # A minibatch (LiSSA): only the shards holding its rows, divided by its size.
            located = self.data_.locate(np.asarray(indices))
            out = self.runner.map_sum(
                _minibatch_hvp,
                [
                    [self.data_.shards[s] for s, _, _ in located],
                    [derivs.handles[s] for s, _, _ in located],
                    [self._shard_weights[s] for s, _, _ in located],
                    [local for _, local, _ in located],
                ],
                len(indices),
                self.n_outputs_,
                array,
            )
        out = out + self.l2 * v
        return out[:, 0] if squeeze else out

    # ------------------------------------------------------------------ protocol
    @property
    def n_train_(self) -> int:
        self._require_fitted()
        return self.data_.n

    @property
    def n_params_(self) -> int:
        self._require_fitted()
        return int(self.theta_.shape[0])

    def _weight_matrix(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.reshape(self.data_.dim, self.n_outputs_)

    def hessian(self) -> torch.Tensor:
        """Exact Hessian of the training objective at θ̂, summed over shards. Returns: (p, p)."""
        self._require_fitted()
        with self.runner.stage("Hessian at the optimum"):
            return self._hessian_from(self._train_terms)

    def hvp(self, vectors: Any, indices: Any | None = None) -> torch.Tensor:
        """Hessian-vector products at θ̂ (see :meth:`core.models.LinearModel.hvp`), each a pass
        over the shards."""
        self._require_fitted()
        idx = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        with self.runner.stage("Hessian-vector products"):
            return self._hvp_from(self._train_terms, as_float64(vectors), idx)

    def training_gradient_products(self, vectors: torch.Tensor) -> torch.Tensor:
        """∇ℓ(z_j, θ̂)ᵀ v for (p, k) vectors and every training point: (k, n) on the driver.

        For a few vectors only; scores go through the engine, which keeps the top k per shard.
        """
        self._require_fitted()
        v = as_float64(vectors)
        v = v[:, None] if v.ndim == 1 else v
        with self.runner.stage("Gradient products"):
            parts = self.runner.gather(
                self.runner.map(
                    kernels.gradient_products,
                    [self.data_.shards, self._train_terms.handles],
                    v.numpy(),
                )
            )
        return torch.from_numpy(np.concatenate(parts, axis=1))

    def training_derivatives(self) -> LossDerivatives:
        """Every training point's loss derivatives at θ̂, gathered to the driver: n·C² numbers,
        for checks on small problems. The engine works on them shard by shard instead."""
        self._require_fitted()
        with self.runner.stage("Gathering derivatives"):
            parts = self.runner.gather(
                self.runner.map(_derivatives_of, [self._train_terms.handles])
            )
        return LossDerivatives(*(torch.cat(field) for field in zip(*parts, strict=True)))

    @property
    def training_inputs_(self) -> torch.Tensor:
        raise InfluenceExplorerError(
            f"{type(self).__name__} keeps its training inputs in shards on the workers; "
            "they are not gathered to the driver."
        )

    # ------------------------------------------------------------------ training-set summaries
    def training_accuracy(self) -> float:
        """Fraction of training points classified as labelled (a pass over the shards)."""
        self._require_fitted()
        with self.runner.stage("Training accuracy"):
            correct = self.runner.map_sum(
                kernels.correct_count, [self.data_.shards], self.theta_.numpy(), self.n_outputs_
            )
        return float(correct) / self.data_.n

    def training_feature_distances(self, features: Any) -> np.ndarray:
        """Distance from one point's features (``transform`` of an input, (1, d)) to every
        training point's, in the model's feature space (as ‖features_ - features‖ in-process).
        Returns: (n,)."""
        self._require_fitted()
        point = as_float64(features).reshape(-1).numpy()
        with self.runner.stage("Feature distances"):
            parts = self.runner.gather(
                self.runner.map(kernels.distances, [self.data_.shards], point)
            )
        return np.concatenate(parts)

    def training_scores(self) -> torch.Tensor:
        """Raw scores Wᵀφ_j of every training point, gathered (n·C numbers). Returns: (n, C)."""
        self._require_fitted()
        parts = self.runner.gather(
            self.runner.map(
                kernels.training_scores, [self.data_.shards], self.theta_.numpy(), self.n_outputs_
            )
        )
        return torch.from_numpy(np.concatenate(parts, axis=0))

    # ------------------------------------------------------------------ retraining
    def refit(  # type: ignore[override]
        self,
        *,
        sample_weight: Any | None = None,
        labels: Any | None = None,
        theta0: Any | None = None,
        tol: float | None = None,
        preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ShardedLinearModel:
        """A copy fitted on the same feature shards with new weights (see
        :meth:`core.models.LinearModel.refit`); warm-started from θ̂."""
        self._require_fitted()
        if labels is not None:
            raise InfluenceExplorerError(
                f"{type(self).__name__}.refit does not change labels; relabel the shards."
            )
        weights = (
            self._split_weights(sample_weight)
            if sample_weight is not None
            else list(self._shard_weights)
        )
        return self._refit_with(weights, theta0=theta0, tol=tol, preconditioner=preconditioner)

    def _refit_with(
        self,
        weights: list[np.ndarray | None],
        *,
        theta0: Any | None = None,
        tol: float | None = None,
        preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ShardedLinearModel:
        other = copy.copy(self)
        other._shard_weights = weights
        if tol is not None:
            other.tol = tol
        other._preconditioner = preconditioner
        try:
            other._fit_parameters(self.theta_ if theta0 is None else as_float64(theta0))
        finally:
            other._preconditioner = None
        return other

    def without_rows(self, indices: Any) -> list[np.ndarray | None]:
        """This fit's per-shard weights with the listed training rows set to zero."""
        weights = list(self._shard_weights)
        for s, local, _ in self.data_.locate(indices):
            w = np.ones(self.data_.sizes[s]) if weights[s] is None else weights[s].copy()
            w[local] = 0.0
            weights[s] = w
        return weights

    # ------------------------------------------------------------------ shipping to a task
    def blueprint(self) -> ShardedLinearModel:
        """A picklable copy without its shards (they belong to the cluster), to be given local
        shards in a task with :meth:`attach` (one leave-one-out retraining per task)."""
        other = copy.copy(self)
        for name in ("data_", "inputs_", "_train_terms"):
            other.__dict__.pop(name, None)
        return other

    def attach(self, data: ShardedData) -> ShardedLinearModel:
        """This blueprint with ``data`` as its feature shards (the rows it was fitted on)."""
        if data.sizes != self._shard_sizes:
            raise InfluenceExplorerError(
                f"attach: shards of {data.sizes} rows do not match the fitted {self._shard_sizes}."
            )
        other = copy.copy(self)
        other.data_ = data
        other.inputs_ = data
        return other


def _minibatch_hvp(
    shard: Any,
    terms: Any,
    weights: np.ndarray | None,
    local: np.ndarray,
    denominator: int,
    n_outputs: int,
    vectors: np.ndarray,
) -> torch.Tensor:
    return kernels.hvp_part(shard, terms, weights, denominator, n_outputs, vectors, local)


def _derivatives_of(terms: kernels.ShardTerms) -> LossDerivatives:
    return terms.derivs


class ShardedLogisticRegression(LogisticRegression, ShardedLinearModel):
    """:class:`~core.models.LogisticRegression` (binary or softmax, L2, optional intercept) on
    sharded features. Same arguments; ``fit`` takes a
    :class:`~core.backend.shards.ShardedData`."""

    def _sharded_feature_map(self, data: ShardedData) -> ShardedData:
        self.n_features_in_ = data.dim
        if not self.fit_intercept:
            return data
        return ShardedData.from_handles(
            data.runner, data.runner.map(kernels.with_intercept, [data.shards])
        )

    @property
    def training_inputs_(self) -> torch.Tensor:
        return ShardedLinearModel.training_inputs_.fget(self)  # type: ignore[attr-defined]


class ShardedNystroemSVM(NystroemSVM, ShardedLinearModel):
    """:class:`~core.models.NystroemSVM` on sharded inputs: the landmarks (a seeded sample of the
    training inputs, the same as in-process) and their kernel's Cholesky factor are computed on
    the driver and broadcast; each worker maps its shard to Nyström features and keeps them.

    Same arguments; ``fit`` takes a :class:`~core.backend.shards.ShardedData` of inputs (e.g.
    pixels scaled to [-1, 1], float64).
    """

    def _sharded_feature_map(self, data: ShardedData) -> ShardedData:
        n = data.n
        if self.gamma == "median":
            # The median heuristic reads only a seeded sample of rows, the same ones as in-process
            # (the median over the sample's pairs does not depend on their order).
            sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:MEDIAN_SAMPLE]
            self.gamma_ = rbf_gamma("median", torch.from_numpy(data.rows(sample.numpy())[0]))
        else:
            self.gamma_ = rbf_gamma(self.gamma, torch.empty(n, 0))
        self.n_inputs_ = data.dim
        m = min(int(self.n_components), n)
        if m == n:
            indices = torch.arange(n)
        else:
            generator = torch.Generator().manual_seed(int(self.seed))
            indices = torch.randperm(n, generator=generator)[:m].sort().values
        self.landmark_indices_ = indices
        self.landmarks_ = torch.from_numpy(data.rows(indices.numpy())[0])
        self.cholesky_, self.jitter_ = _jittered_cholesky(
            rbf_kernel(self.landmarks_, self.landmarks_, self.gamma_)
        )
        runner = data.runner
        landmarks = runner.broadcast(self.landmarks_)
        cholesky = runner.broadcast(self.cholesky_)
        handles = runner.map(
            kernels.nystroem_features,
            [data.shards],
            landmarks,
            cholesky,
            self.gamma_,
            int(self.chunk_size),
        )
        return ShardedData.from_handles(runner, handles)

    def transform(self, X: Any) -> torch.Tensor:
        self._require_fitted()
        X = as_float64(X)
        if X.ndim != 2 or X.shape[1] != self.n_inputs_:
            raise InfluenceExplorerError(
                f"Expected inputs of shape (m, {self.n_inputs_}), got {tuple(X.shape)}."
            )
        return self.torch_transform(X)

    def _fit_platt(self) -> None:
        self.platt_ = output_scale(self.training_scores(), torch.from_numpy(self.data_.labels()))

    @property
    def training_inputs_(self) -> torch.Tensor:
        return ShardedLinearModel.training_inputs_.fget(self)  # type: ignore[attr-defined]


__all__ = [
    "ShardedLinearModel",
    "ShardedLogisticRegression",
    "ShardedNystroemSVM",
]
