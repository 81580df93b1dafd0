"""Convex models with exact derivatives, in float64.

Both models are linear in a fixed feature map φ and trained on the paper's objective

    R(θ) = (1/n) Σ_i w_i ℓ(Wᵀφ(x_i), y_i) + (λ/2)‖θ‖²,   θ = vec(W), W of shape (d, C),

with sample weights ``w`` equal to one for an ordinary fit. Leave-one-out and leave-group-out
retraining set some weights to zero and keep the 1/n and λ (the definition influence functions
approximate), so retraining is ``model.refit(sample_weight=w)``: a copy fitted on the same features,
warm-started from θ̂.

- :class:`LogisticRegression`: φ is the input (frozen deep features), binary or softmax.
- :class:`KernelSVM`: the paper's RBF-kernel SVM on raw pixels, parameterised through the Cholesky
  factor of the training kernel, K = L Lᵀ, so φ(x) = L⁻¹ k(X_train, x) and training point i has
  features row i of L; the loss is the smooth hinge (for C >= 3 classes its Crammer-Singer form).
  :class:`NystroemSVM` is the same model on a Nyström approximation of the kernel, and
  :func:`make_rbf_svm` chooses between them by memory.

Parameters are laid out as ``θ[k·C + c] = W[k, c]``. Derivatives use closed forms from
:mod:`core.losses`; the tests check them against ``torch.func``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from core.errors import ConvergenceError, InfluenceExplorerError, NotFittedError
from core.linalg import (
    STRIP,
    CGResult,
    cholesky_solve,
    conjugate_gradient,
    t_times,
    through_rows,
    times_thin,
    weighted_gram,
)
from core.losses import (
    LogisticLoss,
    Loss,
    LossDerivatives,
    MulticlassSmoothHinge,
    SmoothHingeLoss,
    SoftmaxCrossEntropy,
    curvature_rows,
)

DTYPE = torch.float64

#: Above this many parameters the Newton step is solved by conjugate gradients on
#: Hessian-vector products instead of a dense Cholesky factorisation.
DENSE_NEWTON_MAX_PARAMS = 4096

#: Newton-CG fits of large models (p > DENSE_NEWTON_MAX_PARAMS) on at least this many training
#: rows precondition conjugate gradients with :class:`SampledCurvature`; below it plain CG is
#: cheaper than building the preconditioner.
SAMPLED_CURVATURE_MIN_ROWS = 20_000
#: ... and at most this many parameters (its float64 sample Hessian and float32 factor take
#: 12·p² bytes: 2 GiB at 13,380).
SAMPLED_CURVATURE_MAX_PARAMS = 13_380


def as_float64(x: Any) -> torch.Tensor:
    """A float64 CPU tensor view or copy of an array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=DTYPE)
    return torch.as_tensor(_writable(np.asarray(x)), dtype=DTYPE)


def as_labels(y: Any) -> torch.Tensor:
    """An int64 tensor of class indices."""
    if isinstance(y, torch.Tensor):
        return y.detach().to(device="cpu", dtype=torch.int64)
    return torch.as_tensor(_writable(np.asarray(y)), dtype=torch.int64)


def _writable(array: np.ndarray) -> np.ndarray:
    # Datasets hand out read-only views; torch would share their memory and warn.
    return array if array.flags.writeable else array.copy()


@dataclass(frozen=True)
class FitInfo:
    """How a fit ended: Newton iterations, final gradient norm and objective, wall time, and the
    conjugate-gradient iterations of the Newton steps (0 when every step was a dense solve)."""

    iterations: int
    gradient_norm: float
    objective: float
    converged: bool
    seconds: float
    cg_iterations: int = 0


#: Most columns (points removed x rank of a point's loss Hessian) of the exact removal
#: correction in :meth:`LinearModel.refit_without`'s preconditioner; a larger group is
#: preconditioned by the full-data Hessian alone.
REMOVAL_CORRECTION_MAX_RANK = 64

#: Memory :meth:`LinearModel.refit_without` may use for its per-refit temporaries at once; the
#: refits are solved in blocks of columns that fit.
BATCH_REFIT_MEMORY = 256 * 2**20


@dataclass(frozen=True)
class BatchRefit:
    """Refits of one model without each of several groups of training points, solved together
    (:meth:`LinearModel.refit_without`).

    Attributes:
        parameters: (G, p) each refit's θ (its last iterate where it did not converge).
        iterations: (G,) steps (quasi-Newton, then Newton) each took.
        gradient_norms: (G,) each one's final ‖∇R‖.
        converged: (G,) which reached the tolerance.
        cg_iterations: conjugate-gradient iterations of the Newton steps (taken only by refits
            the quasi-Newton steps did not finish); each is one Hessian-vector product for every
            such refit of a block at once.
        seconds: wall time.
        setup_seconds: of which setting up the preconditioners (the Hessian without each
            group at θ̂, :class:`_RemovalCorrection`).
    """

    parameters: torch.Tensor
    iterations: np.ndarray
    gradient_norms: np.ndarray
    converged: np.ndarray
    cg_iterations: int
    seconds: float
    setup_seconds: float = 0.0


class LinearModel:
    """Shared machinery of the convex models: objective, derivatives, Newton fit, refit.

    Subclasses choose the loss and the feature map (``_fit_feature_map`` and ``transform``).
    """

    def __init__(self, l2: float = 1e-3, tol: float = 1e-10, max_iter: int = 200) -> None:
        self.l2 = l2
        self.tol = tol
        self.max_iter = max_iter

    # ------------------------------------------------------------------ subclass hooks
    def _make_loss(self, n_classes: int) -> Loss:
        raise NotImplementedError

    def _fit_feature_map(self, X: torch.Tensor) -> torch.Tensor:
        """Set up the feature map from training inputs and return training features (n, d)."""
        raise NotImplementedError

    def transform(self, X: Any) -> torch.Tensor:
        """Features the linear part of the model sees. Returns: (m, d) float64."""
        raise NotImplementedError

    def torch_transform(self, X: torch.Tensor) -> torch.Tensor:
        """Differentiable version of :meth:`transform` for float64 inputs (m, D) -> (m, d)."""
        raise NotImplementedError

    def torch_feature_maps(
        self, train_inputs: torch.Tensor, test_inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training and test features as a fit on ``train_inputs`` would build them, differentiably.

        For a per-example feature map (the logistic regression) each input's features depend on
        that input only; the kernel SVM overrides this because its features depend on every
        training input. Returns: (n, d) and (m, d).
        """
        return self.torch_transform(train_inputs), self.torch_transform(test_inputs)

    def _check_hyperparameters(self) -> None:
        if not (isinstance(self.l2, (int, float)) and self.l2 >= 0 and math.isfinite(self.l2)):
            raise InfluenceExplorerError(f"l2 must be a finite number >= 0, got {self.l2!r}.")
        if not (self.tol > 0):
            raise InfluenceExplorerError(f"tol must be > 0, got {self.tol!r}.")
        if int(self.max_iter) < 1:
            raise InfluenceExplorerError(f"max_iter must be >= 1, got {self.max_iter!r}.")

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X: Any,
        y: Any,
        sample_weight: Any | None = None,
        theta0: Any | None = None,
        *,
        row_gram: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        curvature: SampledCurvature | None = None,
    ) -> LinearModel:
        """Fit to convergence (gradient norm <= ``tol``) by Newton's method with line search.

        Args:
            X: (n, D) training inputs.
            y: (n,) integer class labels in [0, n_classes).
            sample_weight: (n,) optional weights w_i of the loss terms; the objective still
                divides by n (a zero weight removes a point as influence functions assume).
            theta0: optional starting parameters (p,).
            row_gram: the (n, n) Gram matrix ΦΦᵀ of the training features (as the feature map
                gives them), or a function returning it, when the caller already has it: the
                dual Newton step uses it instead of forming its own (cross-validation folds take
                theirs from one Gram matrix of all the data). A function is called only if a
                dual step is taken. Only the time depends on it.
            curvature: a :class:`SampledCurvature` shared by several fits on the same rows
                (cross-validation along the λ grid); large fits otherwise build their own.
                Only the time depends on it.
        """
        self._check_hyperparameters()
        X = as_float64(X)
        labels = as_labels(y)
        if X.ndim != 2 or labels.ndim != 1 or X.shape[0] != labels.shape[0]:
            raise InfluenceExplorerError(
                f"X must be (n, D) and y (n,) with the same n; got {tuple(X.shape)} and "
                f"{tuple(labels.shape)}."
            )
        if X.shape[0] < 2:
            raise InfluenceExplorerError("At least two training points are needed to fit.")
        # A finite sum has no NaN or inf in it (both propagate); only when the sum is not finite
        # (that, or overflow) is every entry checked: 0.3 ms instead of 6.6 for 1000 x 1280.
        if not (torch.isfinite(X.sum()) or torch.isfinite(X).all()):
            raise InfluenceExplorerError(
                "The training inputs contain NaN or infinite values; check the features "
                "(a damaged cache file or a broken image) and recompute them."
            )
        self.n_classes_ = self._infer_n_classes(labels)
        self.loss_ = self._make_loss(self.n_classes_)
        self.n_outputs_ = self.loss_.n_outputs(self.n_classes_)
        self.features_ = self._fit_feature_map(X)
        self.labels_ = labels
        self.sample_weight_ = self._weights(sample_weight, labels.shape[0])
        if row_gram is not None:
            self._dual_gram = (self.features_, row_gram)
        self._curvature = curvature
        try:
            self._fit_parameters(theta0)
        finally:
            self._curvature = None  # a factor of up to (d·C)² floats is not kept with the model
        return self

    def refit(
        self,
        *,
        sample_weight: Any | None = None,
        labels: Any | None = None,
        theta0: Any | None = None,
        tol: float | None = None,
        preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> LinearModel:
        """A copy fitted on the same training features with new weights or labels.

        The feature map stays as fitted (for the kernel SVM: the same Cholesky factor), which
        is the model influence functions describe. Warm-started from θ̂ unless ``theta0``.

        Args:
            preconditioner: optional v -> M⁻¹v with M ≈ the Hessian (e.g. the exact influence
                solver's (H + damping)⁻¹ at θ̂). Newton steps are then solved by preconditioned
                CG on Hessian-vector products, which for a retrain near θ̂ takes a handful of
                O(n·p) iterations instead of forming and factorising a new p x p Hessian.

        Returns:
            A new fitted model; ``self`` is not modified.
        """
        self._require_fitted()
        other = copy.copy(self)
        if labels is not None:
            other.labels_ = as_labels(labels)
            if other.labels_.shape != self.labels_.shape:
                raise InfluenceExplorerError("refit labels must have one entry per training point.")
        other.sample_weight_ = (
            self._weights(sample_weight, self.n_train_)
            if sample_weight is not None
            else self.sample_weight_
        )
        if tol is not None:
            other.tol = tol
        other._preconditioner = preconditioner
        try:
            other._fit_parameters(self.theta_ if theta0 is None else as_float64(theta0))
        finally:
            other._preconditioner = None
        return other

    # ------------------------------------------------------------------ batched refits
    #: Whether :meth:`refit_without` can solve refits together (it needs the training features
    #: in this process; the sharded models of :mod:`core.backend` refit one at a time).
    supports_batched_refit = True

    def refit_without(
        self,
        groups: Sequence[Any],
        *,
        tol: float | None = None,
        preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_iter: int = 30,
        progress: Callable[[int], None] | None = None,
    ) -> BatchRefit:
        """Refit without each group of training points, all groups solved together.

        Each refit solves exactly the problem of ``refit(sample_weight=w)`` with ``w`` this
        fit's weights and the group's rows set to zero, from θ̂ with the same backtracking line
        search and stopping rule (‖∇R‖ <= ``tol``, each refit its own). What is shared is the
        work: the G parameter vectors form a G x p block, so objectives, gradients and the
        preconditioner are matrix products over all refits at once instead of G passes over the
        data.

        The steps are quasi-Newton (L-BFGS) on top of the Hessian at θ̂ *without the group*,
        H_{-g}(θ̂) = H(θ̂) - U_g U_gᵀ (U_g = [√(w_j/n) φ_j ⊗ B_j], one column per removed point
        and rank of its loss Hessian), applied through Woodbury from ``preconditioner`` ≈
        H(θ̂)⁻¹: M_g⁻¹v = Pv + Z (I - U_gᵀZ)⁻¹ Zᵀv with Z = P U_g. At θ̂ that is the exact
        Hessian, so the first step is the Newton step, θ̂ + (1/n) H_{-g}⁻¹ Σ_{j∈g} w_j ∇ℓ_j up
        to θ̂'s own gradient (the Newton-corrected influence estimate's parameter change); the
        curvature pairs of the steps taken then correct for the curvature that moves with θ. A refit not converged
        after :data:`QUASI_NEWTON_STEPS` steps continues with Newton steps by conjugate
        gradients on exact Hessian-vector products, preconditioned with M_g⁻¹.

        Args:
            groups: index arrays of training rows, one refit each (an empty one refits with
                every point).
            tol: gradient-norm tolerance (default: the model's).
            preconditioner: v (p, k) -> P v with P ≈ H(θ̂)⁻¹ (e.g. the exact influence solver's
                ``inverse_hvp``); it changes the steps, not the answer. Without one it is the
                Cholesky factor of H(θ̂) when p <= :data:`DENSE_NEWTON_MAX_PARAMS`, else every
                step is a Newton step by plain conjugate gradients.
            max_iter: steps before a refit is given up as not converged.
            progress: called with the number of refits converged so far, as they converge.

        Returns:
            A :class:`BatchRefit`; refits that did not reach ``tol`` are marked there (the
            caller decides what to do with them: :func:`core.validation.retrain_without`
            refits them one at a time).

        Raises:
            InfluenceExplorerError: an index outside [0, n), or a model that keeps its training
                features elsewhere (the sharded models: ``supports_batched_refit`` is False).
        """
        self._require_fitted()
        if not self.supports_batched_refit:
            raise InfluenceExplorerError(
                f"{type(self).__name__} refits one group at a time: use refit(sample_weight=...)."
            )
        start = time.perf_counter()
        n = self.n_train_
        tol = self.tol if tol is None else float(tol)
        removed = []
        for group in groups:
            rows = torch.as_tensor(np.unique(np.asarray(group, dtype=np.int64).reshape(-1)))
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
                raise InfluenceExplorerError(
                    f"Training indices must be in [0, {n}); got {rows.numpy()}."
                )
            removed.append(rows)
        if preconditioner is None:
            preconditioner = self._dense_preconditioner()
        p = self.n_params_
        count = len(removed)
        parameters = torch.empty(count, p, dtype=DTYPE)
        iterations = np.zeros(count, dtype=np.int64)
        norms = np.zeros(count)
        converged = np.zeros(count, dtype=bool)
        cg_total = 0
        finished = 0
        setup = 0.0
        width = self._batch_width()
        for first in range(0, count, width):
            block = removed[first : first + width]

            def report(done: int, base: int = finished) -> None:
                if progress is not None:
                    progress(base + done)

            began = time.perf_counter()
            solver = _BatchNewton(self, block, tol, preconditioner, max_iter)
            setup += time.perf_counter() - began
            solved = solver.run(report)
            cols = slice(first, first + len(block))
            parameters[cols] = solved.theta
            iterations[cols] = solved.iterations
            norms[cols] = solved.gradient_norms
            converged[cols] = solved.gradient_norms <= tol
            cg_total += solved.cg_iterations
            finished += int(converged[cols].sum())
        return BatchRefit(
            parameters=parameters,
            iterations=iterations,
            gradient_norms=norms,
            converged=converged,
            cg_iterations=cg_total,
            seconds=time.perf_counter() - start,
            setup_seconds=setup,
        )

    def _dense_preconditioner(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """v -> H(θ̂)⁻¹v from a Cholesky factor of the Hessian, when it is small enough to form."""
        if self.n_params_ > DENSE_NEWTON_MAX_PARAMS:
            return None
        chol, info = torch.linalg.cholesky_ex(self.hessian())
        if int(info) != 0:
            return None
        return lambda v: cholesky_solve(chol, v)

    def _batch_width(self) -> int:
        """Refits per block, so that one block's temporaries fit :data:`BATCH_REFIT_MEMORY`."""
        n, d = self.features_.shape
        c = self.n_outputs_
        # Per refit: scores, derivatives and curvature over the training points (n·C² each for
        # the softmax), a few parameter vectors, the quasi-Newton pairs, the removal
        # correction's columns.
        vectors = 12 + 2 * QUASI_NEWTON_MEMORY + REMOVAL_CORRECTION_MAX_RANK
        per_refit = 8 * (n * (4 * c + 3 * c * c) + vectors * d * c)
        return max(1, min(256, BATCH_REFIT_MEMORY // per_refit))

    def _features_times(self, matrix: torch.Tensor) -> torch.Tensor:
        """Φ M for the training features Φ (n, d) and M (d, m). Returns: (n, m)."""
        return self.features_ @ matrix

    def _features_t_times(self, matrix: torch.Tensor) -> torch.Tensor:
        """Φᵀ M for M (n, m). Returns: (d, m)."""
        return t_times(self.features_, matrix)

    def _block_matrix(self, theta: torch.Tensor) -> torch.Tensor:
        """k parameter vectors (k, p) as the (d, k·C) matrix whose product with Φ gives their
        scores, (n, k·C) laid out as (n, k, C)."""
        k = theta.shape[0]
        d, c = self.features_.shape[1], self.n_outputs_
        if c == 1:
            return theta.T
        return theta.view(k, d, c).permute(1, 0, 2).reshape(d, k * c)

    def _from_block(self, matrix: torch.Tensor, k: int) -> torch.Tensor:
        """The inverse of :meth:`_block_matrix`: (d, k·C) -> (k, p)."""
        d, c = self.features_.shape[1], self.n_outputs_
        if c == 1:
            return matrix.T
        return matrix.view(d, k, c).permute(1, 0, 2).reshape(k, d * c)

    def _batch_terms(
        self, theta: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objective, gradient and weighted loss curvature of k refits at once.

        Args:
            theta: (k, p) parameters, one row per refit.
            weights: (n, k) sample weights of each refit.
        Returns:
            values (k,), gradients (k, p), and the curvature w_i A_i / n of every training point
            for each refit: (n, k) for one output column, else (n, k, C, C).
        """
        n = self.features_.shape[0]
        c, k = self.n_outputs_, theta.shape[0]
        scores = self._features_times(self._block_matrix(theta))
        derivs = self.loss_.derivatives(scores.reshape(n * k, c), self._interleaved_labels(k))
        scaled = weights / n
        values = (scaled * derivs.loss.view(n, k)).sum(0) + 0.5 * self.l2 * (theta * theta).sum(1)
        d1 = derivs.d1.view(n, k * c) * scaled.repeat_interleave(c, dim=1)
        grads = self._from_block(self._features_t_times(d1), k) + self.l2 * theta
        if c == 1:
            curvature = derivs.d2.view(n, k) * scaled
        else:
            curvature = derivs.d2.view(n, k, c, c) * scaled[:, :, None, None]
        return values, grads, curvature

    def _interleaved_labels(self, k: int) -> torch.Tensor:
        """Every training label repeated k times in a row, (n·k,), cached per k."""
        cached = getattr(self, "_label_block", None)
        if cached is None or cached[0] != k or cached[1] is not self.labels_:
            cached = (k, self.labels_, self.labels_.repeat_interleave(k))
            self._label_block = cached
        return cached[2]

    def _batch_terms_at_optimum(
        self, removed: list[torch.Tensor], weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_batch_terms` with θ̂ in every row, from the fit's own derivatives at θ̂: the
        full objective less each group's terms, touching only the removed rows.

        Args:
            removed: each refit's removed training rows.
            weights: (n, k) the refits' sample weights (the fit's, zero on the removed rows).
        """
        features = self.features_
        n, d = features.shape
        c, k = self.n_outputs_, len(removed)
        value, grad, derivs = self._objective_terms(self.theta_)
        values = torch.full((k,), value, dtype=DTYPE)
        grads = grad[None, :].repeat(k, 1)
        sizes = torch.tensor([len(rows) for rows in removed])
        if int(sizes.sum()):
            rows = torch.cat(removed)
            owner = torch.repeat_interleave(torch.arange(k), sizes)
            scale = self.sample_weight_[rows] / n
            values.index_add_(0, owner, -scale * derivs.loss[rows])
            terms = features[rows][:, :, None] * (scale[:, None] * derivs.d1[rows])[:, None, :]
            grads.index_add_(0, owner, -terms.reshape(len(rows), d * c))
        scaled = weights / n
        if c == 1:
            curvature = derivs.d2[:, 0, 0, None] * scaled
        else:
            curvature = derivs.d2[:, None] * scaled[:, :, None, None]
        return values, grads, curvature

    def _batch_hvp(self, curvature: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """H_i v_i for each refit i's Hessian (curvature from :meth:`_batch_terms`) and its own
        row v_i of ``vectors`` (k, p), as two products with Φ over the block."""
        n = self.features_.shape[0]
        c, k = self.n_outputs_, vectors.shape[0]
        s = self._features_times(self._block_matrix(vectors))
        if c == 1:
            t = curvature * s
        else:
            t = torch.einsum("nkce,nke->nkc", curvature, s.view(n, k, c)).reshape(n, k * c)
        return self._from_block(self._features_t_times(t), k) + self.l2 * vectors

    def _infer_n_classes(self, labels: torch.Tensor) -> int:
        if labels.numel() and int(labels.min()) < 0:
            raise InfluenceExplorerError("Labels must be class indices >= 0.")
        return max(int(labels.max()) + 1, 2)

    @staticmethod
    def _weights(sample_weight: Any | None, n: int) -> torch.Tensor:
        if sample_weight is None:
            return torch.ones(n, dtype=DTYPE)
        w = as_float64(sample_weight)
        if w.shape != (n,):
            raise InfluenceExplorerError(
                f"sample_weight must have shape ({n},), got {tuple(w.shape)}."
            )
        if not torch.isfinite(w).all() or bool((w < 0).any()):
            raise InfluenceExplorerError("sample_weight must be finite and >= 0.")
        return w

    def _fit_parameters(self, theta0: torch.Tensor | None) -> None:
        start = time.perf_counter()
        p = self.features_.shape[1] * self.n_outputs_
        theta = torch.zeros(p, dtype=DTYPE) if theta0 is None else as_float64(theta0).clone()
        if theta.shape != (p,):
            raise InfluenceExplorerError(
                f"theta0 must have shape ({p},), got {tuple(theta.shape)}."
            )
        theta, info = self._newton(theta, start)
        self.theta_ = theta
        self.fit_info_ = info
        self._train_derivs = self._derivatives(self.features_, self.labels_, theta)

    def _newton(self, theta: torch.Tensor, start: float) -> tuple[torch.Tensor, FitInfo]:
        """Damped Newton: exact steps, backtracking (Armijo) line search, stop at ‖∇R‖ <= tol."""
        value, grad, derivs = self._objective_terms(theta)
        iterations = 0
        cg_iterations = 0
        previous: tuple[float, float] | None = None  # last step's gradient norm and forcing
        while True:
            gnorm = float(grad.norm())
            if gnorm <= self.tol or iterations >= self.max_iter:
                break
            iterations += 1
            rtol = _newton_forcing(gnorm, previous, self.tol)
            previous = (gnorm, rtol)
            step, inner = self._newton_step(derivs, grad, rtol)
            cg_iterations += inner
            slope = float(grad @ step)
            t = 1.0
            while True:
                candidate = theta - t * step
                c_value, c_grad, c_derivs = self._objective_terms(candidate)
                decreased = c_value <= value - 1e-4 * t * slope
                # Near the optimum the objective changes below float64 resolution; a step that
                # shrinks the gradient is then the right one to take.
                flat = abs(c_value - value) <= 1e-12 * max(1.0, abs(value))
                if decreased or (flat and float(c_grad.norm()) < gnorm):
                    break
                t *= 0.5
                if t < 1e-12:
                    break
            if t < 1e-12:
                break
            theta, value, grad, derivs = candidate, c_value, c_grad, c_derivs
        gnorm = float(grad.norm())
        info = FitInfo(
            iterations=iterations,
            gradient_norm=gnorm,
            objective=value,
            converged=gnorm <= self.tol,
            seconds=time.perf_counter() - start,
            cg_iterations=cg_iterations,
        )
        if not info.converged and gnorm > max(1e3 * self.tol, 1e-6):
            raise ConvergenceError(
                f"{type(self).__name__} did not converge: gradient norm {gnorm:.3g} after "
                f"{iterations} Newton iterations (tolerance {self.tol:g}). Increase l2 or max_iter."
            )
        return theta, info

    def _newton_step(
        self, derivs: LossDerivatives, grad: torch.Tensor, rtol: float | None = None
    ) -> tuple[torch.Tensor, int]:
        """The Newton direction H⁻¹∇R and the conjugate-gradient iterations it took (0: dense);
        ``rtol`` is the relative residual at which conjugate gradients stop (the forcing term;
        default min(0.1, √‖∇R‖))."""
        p = grad.shape[0]
        preconditioner = getattr(self, "_preconditioner", None)
        if preconditioner is not None:
            run = conjugate_gradient(
                lambda v: self._hvp_from(derivs, v),
                grad,
                rtol=1e-12,
                max_iter=30,
                preconditioner=preconditioner,
            )
            if run.converged:
                return run.solution, run.iterations
            # The Hessian has moved too far from θ̂'s (e.g. a sharp smooth hinge whose active
            # set changed): stop trying for the rest of this fit.
            self._preconditioner = None
        if self._dual_newton_applies(derivs, p):
            step = self._dual_newton_step(derivs, grad)
            if step is not None:
                return step, 0
        if p <= DENSE_NEWTON_MAX_PARAMS:
            basis = self._class_basis_from(derivs)
            if basis is not None:
                chol, info = torch.linalg.cholesky_ex(basis.matrix)
                if int(info) == 0:
                    step = solve_in_class_basis(chol, basis.rotation, basis.l2, grad[:, None])
                    return step[:, 0], 0
            hessian = self._hessian_from(derivs)
            chol, info = torch.linalg.cholesky_ex(hessian)
            if int(info) == 0:
                return cholesky_solve(chol, grad), 0
            return torch.linalg.lstsq(hessian, grad[:, None]).solution[:, 0], 0

        # Large models: an inexact Newton step by conjugate gradients on exact Hessian-vector
        # products, with the forcing term shrinking with the gradient (superlinear convergence
        # near the optimum). Measured on the demo's ten classes (n = 5000, p = 12,800, λ = 1e-3,
        # 9 Newton steps each way): plain CG took 332 iterations over the fit, with a Kronecker
        # factorisation G ⊗ Ā of the Hessian as preconditioner 427, with its class blocks in
        # the features' eigenbasis 782, and with the products in float32 505. Large training
        # sets precondition with the Hessian of a sample of the rows (SampledCurvature).
        def hvp(v: torch.Tensor) -> torch.Tensor:
            return self._hvp_from(derivs, v)

        spent = 0
        if rtol is None:
            rtol = min(0.1, float(grad.norm()) ** 0.5)
        sampled = self._sampled_curvature()
        if sampled is not None and not sampled.formed_for(self):
            # Plain CG first: well-conditioned steps (large λ, early iterates) finish before
            # the sample's Hessian would have been formed.
            run = conjugate_gradient(hvp, grad, rtol=rtol, max_iter=sampled.refresh_after)
            if run.converged:
                return run.solution, run.iterations
            spent = run.iterations
        if sampled is not None:
            sampled.prepare(self, derivs)
        run = conjugate_gradient(
            hvp,
            grad,
            rtol=rtol,
            max_iter=500,
            preconditioner=sampled.apply if sampled is not None else None,
        )
        if sampled is not None:
            sampled.used(run.iterations)
        return run.solution, run.iterations + spent

    def _sampled_curvature(self) -> SampledCurvature | None:
        """The fit's :class:`SampledCurvature` (the caller's, or one of its own); None for
        small training sets and for models whose sample Hessian would not fit in memory."""
        features = getattr(self, "features_", None)
        if features is None:  # features held in shards (core.backend): plain CG
            return None
        # The same bounds for a caller's object: below them plain CG is cheaper, above them the
        # sample's Hessian would not fit in memory.
        n, d = features.shape
        if n < SAMPLED_CURVATURE_MIN_ROWS or d * self.n_outputs_ > SAMPLED_CURVATURE_MAX_PARAMS:
            return None
        curvature = getattr(self, "_curvature", None)
        if curvature is None:
            curvature = self._curvature = SampledCurvature()
        return curvature

    def _dual_newton_applies(self, derivs: LossDerivatives, p: int) -> bool:
        """Whether the data term's rank n·r is below p and small enough for the dual step."""
        n, rank = self.features_.shape[0], derivs.factor.shape[2]
        return self.l2 > 0 and n * rank < p and n * rank <= DENSE_NEWTON_MAX_PARAMS

    def _dual_newton_step(self, derivs: LossDerivatives, grad: torch.Tensor) -> torch.Tensor | None:
        """H⁻¹g through Woodbury when the data term has lower rank than the parameter count.

        H = λI + U Uᵀ with U = [√(w_j/n) φ_j ⊗ B_j]_j, p x (n·r): H⁻¹g = (g - U (λI + UᵀU)⁻¹ Uᵀg)/λ,
        an (n·r) x (n·r) system whose matrix comes from the Gram matrix ΦΦᵀ (formed once per set
        of features and kept). A few dozen images with 1280-d features and three classes solve a
        144 x 144 system instead of factorising a 3840 x 3840 Hessian; a cross-validation fold
        of the demo's pair (667 images, 1280-d) one of 667 instead of 1280. Exact, like the dense
        step, as long as λ is not negligible next to the data's curvature: the result divides by
        λ, so its rounding error grows like ε·‖UᵀU‖/λ; beyond 1e8 this returns None and the
        primal step is taken.
        """
        features, factor = self.features_, derivs.factor
        n, d = features.shape
        c, r = factor.shape[1], factor.shape[2]
        scale = (self.sample_weight_ / n).sqrt()
        cached = getattr(self, "_dual_gram", None)
        if cached is None or cached[0] is not features:
            cached = (features, weighted_gram(features.T, torch.ones(d, dtype=DTYPE)))
        gram = cached[1]() if callable(cached[1]) else cached[1]
        if gram.shape != (n, n):
            raise InfluenceExplorerError(
                f"row_gram must be the ({n}, {n}) Gram matrix of the training features; got "
                f"{tuple(gram.shape)}."
            )
        self._dual_gram = (features, gram)
        # (UᵀU)[(i, k), (j, l)] = G_ij Σ_c (s_i B_i)[c, k] (s_j B_j)[c, l]: one product and one
        # pass over the (n·r)² matrix (cross-validation takes several of these per fit).
        weighted = factor * scale[:, None, None]
        small = torch.einsum("ick,jcl->ikjl", weighted, weighted)
        small.mul_(gram[:, None, :, None])
        small = small.reshape(n * r, n * r)
        if float(small.diagonal().max()) > 1e8 * self.l2:
            return None
        small.diagonal().add_(self.l2)
        projected = features @ grad.reshape(d, c)  # (n, C): φ_jᵀ G
        rhs = (torch.einsum("jc,jck->jk", projected, factor) * scale[:, None]).reshape(n * r)
        solved = cholesky_solve(torch.linalg.cholesky(small), rhs).reshape(n, r)
        back = torch.einsum("jck,jk->jc", factor, solved) * scale[:, None]
        return (grad - t_times(features, back).reshape(-1)) / self.l2

    # ------------------------------------------------------------------ objective & derivatives
    def _require_fitted(self) -> None:
        if not hasattr(self, "theta_"):
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet; call fit(X, y) first."
            )

    @property
    def n_train_(self) -> int:
        self._require_fitted()
        return int(self.features_.shape[0])

    @property
    def n_params_(self) -> int:
        self._require_fitted()
        return int(self.theta_.shape[0])

    def _weight_matrix(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.reshape(self.features_.shape[1], self.n_outputs_)

    def _derivatives(
        self, features: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor
    ) -> LossDerivatives:
        return self.loss_.derivatives(features @ self._weight_matrix(theta), labels)

    def _objective_terms(self, theta: torch.Tensor) -> tuple[float, torch.Tensor, LossDerivatives]:
        n = self.features_.shape[0]
        derivs = self._derivatives(self.features_, self.labels_, theta)
        w = self.sample_weight_
        value = float(w @ derivs.loss) / n + 0.5 * self.l2 * float(theta @ theta)
        grad = t_times(self.features_, w[:, None] * derivs.d1).reshape(-1) / n + self.l2 * theta
        return value, grad, derivs

    def objective(self, theta: Any | None = None) -> float:
        """Training objective R(θ) (at θ̂ by default)."""
        self._require_fitted()
        return self._objective_terms(self.theta_ if theta is None else as_float64(theta))[0]

    def objective_gradient(self, theta: Any | None = None) -> torch.Tensor:
        """∇R(θ) (at θ̂ by default). Returns: (p,)."""
        self._require_fitted()
        return self._objective_terms(self.theta_ if theta is None else as_float64(theta))[1]

    def scores(self, features: Any) -> torch.Tensor:
        """Raw scores Wᵀφ for features from :meth:`transform`. Returns: (m, C)."""
        self._require_fitted()
        return as_float64(features) @ self._weight_matrix(self.theta_)

    def per_example_losses(self, features: Any, labels: Any) -> torch.Tensor:
        """ℓ(z, θ̂) for each example given its features. Returns: (m,)."""
        return self.loss_.value(self.scores(features), as_labels(labels))

    def per_example_gradients(self, features: Any, labels: Any) -> torch.Tensor:
        """∇_θ ℓ(z, θ̂) for each example, φ ⊗ ∂ℓ/∂s. Returns: (m, p)."""
        self._require_fitted()
        features = as_float64(features)
        derivs = self._derivatives(features, as_labels(labels), self.theta_)
        return (features[:, :, None] * derivs.d1[:, None, :]).reshape(features.shape[0], -1)

    def loss_gradients(self, inputs: Any, labels: Any) -> torch.Tensor:
        """∇_θ ℓ(z, θ̂) for inputs in the model's input space (pixels, features). Returns: (m, p)."""
        return self.per_example_gradients(self.transform(inputs), labels)

    def training_derivatives(self) -> LossDerivatives:
        """Loss derivatives with respect to the scores at θ̂ for every training point (unweighted:
        influence asks about each point's own term)."""
        self._require_fitted()
        return self._train_derivs

    def training_gradient_products(self, vectors: torch.Tensor) -> torch.Tensor:
        """∇ℓ(z_j, θ̂)ᵀ v = (φ_jᵀ V)·r_j for (p, k) vectors, without the (n, p) gradients.

        Returns: (k, n_train).
        """
        self._require_fitted()
        v = as_float64(vectors)
        v = v[:, None] if v.ndim == 1 else v
        d, c = self.features_.shape[1], self.n_outputs_
        projected = torch.einsum("jd,dck->kjc", self.features_, v.reshape(d, c, -1))
        return (projected * self._train_derivs.d1[None]).sum(-1)

    def example_hessian_factors(self, features: Any, labels: Any) -> torch.Tensor:
        """Factors B with ∇²_θ ℓ(z) = (φ ⊗ B)(φ ⊗ B)ᵀ. Returns: (m, C, r)."""
        self._require_fitted()
        return self._derivatives(as_float64(features), as_labels(labels), self.theta_).factor

    def _hessian_from(self, derivs: LossDerivatives) -> torch.Tensor:
        n = self.features_.shape[0]
        hessian = _data_hessian(self.features_, self.sample_weight_ / n, derivs.d2)
        hessian.diagonal().add_(self.l2)
        return hessian

    def hessian(self) -> torch.Tensor:
        """Exact Hessian of the training objective at θ̂. Returns: (p, p)."""
        self._require_fitted()
        return self._hessian_from(self._train_derivs)

    def feature_shape(self) -> tuple[int, int] | None:
        """(n, d) of the training features the linear part sees, or None before fitting."""
        features = getattr(self, "features_", None)
        if not isinstance(features, torch.Tensor):
            return None
        n, d = features.shape
        return int(n), int(d)

    def class_basis_hessian(self) -> ClassBasisHessian | None:
        """The Hessian at θ̂ in the class basis (:class:`ClassBasisHessian`), or None when the
        model has no such form (:func:`has_class_basis`) or its curvature is not
        shift-invariant to rounding (then the caller forms :meth:`hessian`)."""
        self._require_fitted()
        return self._class_basis_from(self._train_derivs)

    def _class_basis_from(self, derivs: LossDerivatives) -> ClassBasisHessian | None:
        if not has_class_basis(self):
            return None
        d2 = derivs.d2
        rotation = class_rotation(self.n_outputs_)
        rotated = rotation.T @ d2 @ rotation
        # The rows along q are zero to rounding for a shift-invariant loss; check, not assume.
        scale = float(d2.abs().amax()) if d2.numel() else 0.0
        if float(rotated[:, -1, :].abs().amax()) > 1e-10 * max(scale, 1e-300):
            return None
        n = self.features_.shape[0]
        matrix = _data_hessian(self.features_, self.sample_weight_ / n, rotated[:, :-1, :-1])
        matrix.diagonal().add_(self.l2)
        return ClassBasisHessian(matrix, rotation, float(self.l2))

    def _hvp_from(
        self,
        derivs: LossDerivatives,
        vectors: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features, w, d2 = self.features_, self.sample_weight_, derivs.d2
        denominator = features.shape[0]
        if indices is not None:
            features, w, d2 = features[indices], w[indices], d2[indices]
            denominator = len(indices)
        squeeze = vectors.ndim == 1
        v = vectors[:, None] if squeeze else vectors
        d, c, k = features.shape[1], self.n_outputs_, v.shape[1]
        # Both products with Φ one block of rows at a time (the block stays in the cache).
        curvature = curvature_rows(d2, w / denominator, k)
        out = through_rows(features, v.reshape(d, c * k), curvature).reshape(d * c, k)
        out = out + self.l2 * v
        return out[:, 0] if squeeze else out

    def hvp(self, vectors: Any, indices: Any | None = None) -> torch.Tensor:
        """Hessian-vector products of the training objective at θ̂.

        Args:
            vectors: (p,) or (p, k).
            indices: optional minibatch of training indices; then the data term is the
                minibatch mean (1/b) Σ_{i∈batch} w_i ∇²ℓ_i, an unbiased estimate under uniform
                sampling (what LiSSA uses); λ is always added exactly.
        Returns:
            Same shape as ``vectors``.
        """
        self._require_fitted()
        idx = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        return self._hvp_from(self._train_derivs, as_float64(vectors), idx)

    # ------------------------------------------------------------------ predictions
    def decision_function(self, X: Any) -> np.ndarray:
        """Scores for inputs X: (m,) for binary models (positive means class 1), else (m, C)."""
        s = self.scores(self.transform(X))
        return (s[:, 0] if self.n_outputs_ == 1 else s).numpy()

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        if self.n_outputs_ == 1:
            p1 = torch.sigmoid(scores[:, 0])
            return torch.stack([1 - p1, p1], dim=1)
        return torch.softmax(scores, dim=1)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities. Returns: (m, n_classes)."""
        return self.predict_proba_from_scores(self.scores(self.transform(X)))

    def predict_proba_from_scores(self, scores: torch.Tensor) -> np.ndarray:
        """:meth:`predict_proba` of the inputs whose raw scores (m, C) :meth:`scores` gave, for a
        caller that has them already. Returns: (m, n_classes)."""
        return self._probabilities(scores).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class indices. Returns: (m,)."""
        return self.predict_from_scores(self.scores(self.transform(X)))

    def predict_from_scores(self, scores: torch.Tensor) -> np.ndarray:
        """:meth:`predict` of the inputs whose raw scores (m, C) :meth:`scores` gave.
        Returns: (m,)."""
        if self.n_outputs_ == 1:
            return (scores[:, 0] > 0).to(torch.int64).numpy()
        return scores.argmax(dim=1).numpy()

    def loss(self, X: Any, y: Any) -> np.ndarray:
        """Per-example loss on inputs X. Returns: (m,)."""
        return self.per_example_losses(self.transform(X), y).numpy()

    def accuracy(self, X: Any, y: Any) -> float:
        """Fraction of X classified as y."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


class _BlockSolution(NamedTuple):
    theta: torch.Tensor
    iterations: np.ndarray
    gradient_norms: np.ndarray
    cg_iterations: int


#: Quasi-Newton steps a batched refit takes before it switches to Newton steps by conjugate
#: gradients (see :class:`_BatchNewton`). Measured on the demo (k = 50, test images 0, 5 and
#: 49, both models, before :data:`POLISH`): every refit converged to 1e-11 within 7 quasi-Newton steps, each one
#: gradient and one preconditioner application for the block, 230-290 ms of CPU per model;
#: Newton steps by preconditioned conjugate gradients took 3-4 steps with 5-14 Hessian-vector
#: products and 9-19 preconditioner applications, 390-550 ms; fixed-matrix (chord) steps
#: contract the gradient only 0.1-0.3 per step. Hard cases (a removed point of leverage 0.98 on
#: the margin of a smooth hinge with temperature 0.01) took up to 21.
QUASI_NEWTON_STEPS = 20

#: Curvature pairs (s, y) the batched refit's quasi-Newton steps remember.
QUASI_NEWTON_MEMORY = 8

#: A batched refit that reaches ‖∇R‖ <= tol with a gradient above POLISH·tol takes one more
#: step. Quasi-Newton steps converge superlinearly, so they stop just below the tolerance, where
#: Newton steps (quadratic) usually overshoot far below it: without this step the batched and the
#: one-at-a-time refits agreed only to 1e-8 of a test point's largest change at tol = 1e-11
#: (both exact to what the tolerance allows, ‖θ - θ*‖ <= ‖∇R‖/λ); the extra step costs about
#: one step in six on the demo.
POLISH = 1e-2


def _newton_forcing(
    gradient_norm: float, previous: tuple[float, float] | None, tol: float
) -> float:
    """The forcing term of a fit's inexact Newton-CG step (Eisenstat and Walker's second choice).

    η = 0.9·(‖∇R_k‖/‖∇R_k-1‖)², kept at least 0.9·η_k-1² when that exceeds 0.1 and at most 0.1:
    while Newton steps are damped and the gradient falls slowly, CG stops early (solving a
    model that the line search will cut short precisely is wasted); once steps are full and the
    gradient falls fast, η shrinks with it, for quadratic convergence. As in :func:`_forcing`, it
    is never below what the tolerance needs. The first step takes min(0.1, √‖∇R‖), the rule
    every step used before. ``python -m bench.newton_forcing`` sets the two side by side on a
    λ path and the final fit of ten-class features.
    """
    if previous is None:
        eta = min(0.1, gradient_norm**0.5)
    else:
        last_norm, last_eta = previous
        eta = 0.9 * (gradient_norm / last_norm) ** 2
        if 0.9 * last_eta**2 > 0.1:
            eta = max(eta, 0.9 * last_eta**2)
        eta = min(eta, 0.1)
    return max(eta, 1e-3 * tol / gradient_norm)


def _forcing(gradient_norm: float, tol: float) -> float:
    """Relative residual at which conjugate gradients stop in a batched refit's Newton step.

    min(0.1, ‖∇R‖) keeps Newton's quadratic convergence; past what the tolerance needs it is
    wasted work, since the next gradient is about the step's residual plus the quadratic term:
    a residual of 1e-3·tol suffices (so the forcing is never below 1e-3·tol/‖∇R‖). The stopping
    rule is the exact gradient, so this changes the iterations, not what a converged refit is.
    """
    return max(min(0.1, gradient_norm), 1e-3 * tol / gradient_norm)


class _BatchNewton:
    """k refits of one model at once (see :meth:`LinearModel.refit_without`).

    Each refit minimises its own objective R_g from θ̂ with the line search and stopping rule of
    :meth:`LinearModel._newton` (Armijo backtracking, a flat step accepted when it shrinks the
    gradient, stop at ‖∇R_g‖ <= tol), with its own step lengths and iteration count; only the
    arithmetic is shared, as products over the k x p block of parameters (one row per refit).

    The steps are quasi-Newton (L-BFGS) on top of M_g = H_{-g}(θ̂), the exact Hessian at θ̂
    without the group (:class:`_RemovalCorrection`): the first is the Newton step, and the
    curvature pairs of the steps taken correct M_g for the curvature that moves with θ. Each
    costs one gradient and one application of M_g⁻¹ for the whole block and no Hessian-vector
    products (see :data:`QUASI_NEWTON_STEPS` for what was measured against Newton steps). A
    refit that has not converged after :data:`QUASI_NEWTON_STEPS` continues with Newton steps by
    conjugate gradients preconditioned with M_g⁻¹ (also what runs without a preconditioner).
    """

    def __init__(
        self,
        model: LinearModel,
        removed: list[torch.Tensor],
        tol: float,
        preconditioner: Callable[[torch.Tensor], torch.Tensor] | None,
        max_iter: int,
    ) -> None:
        self.model = model
        self.removed = removed
        self.tol = tol
        self.max_iter = max_iter
        k = len(removed)
        self.weights = model.sample_weight_[:, None].repeat(1, k)
        for i, rows in enumerate(removed):
            self.weights[rows, i] = 0.0
        self.correction = (
            None if preconditioner is None else _RemovalCorrection(model, removed, preconditioner)
        )
        # Curvature pairs, newest last: s and y (k, p) and ρ = 1/(yᵀs) (k,), ρ = 0 where a
        # refit has no pair from that step.
        self.history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def run(self, report: Callable[[int], None]) -> _BlockSolution:
        model, tol = self.model, self.tol
        k = self.weights.shape[1]
        theta = model.theta_[None, :].repeat(k, 1)
        values, grads, curvature = model._batch_terms_at_optimum(self.removed, self.weights)
        gnorm = grads.norm(dim=1)
        iterations = torch.zeros(k, dtype=torch.int64)
        failed = torch.zeros(k, dtype=torch.bool)
        newton = torch.full((k,), self.correction is None, dtype=torch.bool)
        polished = torch.zeros(k, dtype=torch.bool)
        cg_iterations = 0
        reported = 0
        while True:
            converged = gnorm <= tol
            done = int(converged.sum())
            if done > reported:
                report(done)
                reported = done
            # Converged, a refit takes one more step unless already far below the tolerance
            # (see POLISH); a failure there keeps the converged iterate.
            polish = converged & ~polished & (gnorm > POLISH * tol)
            active = (~converged | polish) & ~failed & (iterations < self.max_iter)
            if not bool(active.any()):
                break
            polished |= polish
            idx = active.nonzero()[:, 0]
            newton[idx] |= iterations[idx] >= QUASI_NEWTON_STEPS
            iterations[idx] += 1
            g = grads[idx]
            quasi = ~newton[idx]
            if bool(quasi.all()):
                step = self._quasi_newton_direction(idx, g)
            else:
                step = torch.empty_like(g)
                if bool(quasi.any()):
                    step[quasi] = self._quasi_newton_direction(idx[quasi], g[quasi])
                rows = idx[~quasi]
                step[~quasi], run = self._newton_direction(rows, g[~quasi], curvature[:, rows])
                cg_iterations += run.iterations
                if run.nonpositive_curvature:
                    failed[rows] = True
            slope = (g * step).sum(1)
            # A direction that is not a descent direction (rounding in a near-singular
            # quasi-Newton pair) hands the refit to Newton steps.
            uphill = ~(slope > 0)
            newton[idx[uphill]] = True
            pending = (~uphill & ~failed[idx]).nonzero()[:, 0]
            t = torch.ones(len(idx), dtype=DTYPE)
            old_theta = theta[idx]
            while pending.numel():
                rows = idx[pending]
                candidate = old_theta[pending] - t[pending, None] * step[pending]
                c_values, c_grads, c_curvature = model._batch_terms(
                    candidate, self.weights[:, rows]
                )
                c_gnorm = c_grads.norm(dim=1)
                value = values[rows]
                decreased = c_values <= value - 1e-4 * t[pending] * slope[pending]
                # As in _newton: near the optimum the objective changes below float64
                # resolution, and a step that shrinks the gradient is then the right one.
                flat = (c_values - value).abs() <= 1e-12 * value.abs().clamp_min(1.0)
                accepted = decreased | (flat & (c_gnorm < gnorm[rows]))
                taken = rows[accepted]
                theta[taken] = candidate[accepted]
                values[taken] = c_values[accepted]
                grads[taken] = c_grads[accepted]
                gnorm[taken] = c_gnorm[accepted]
                curvature[:, taken] = c_curvature[:, accepted]
                pending = pending[~accepted]
                t[pending] *= 0.5
                gave_up = t[pending] < 1e-12
                failed[idx[pending[gave_up]]] = True
                pending = pending[~gave_up]
            if self.correction is not None:
                self._remember(idx, theta[idx] - old_theta, grads[idx] - g)
        return _BlockSolution(
            theta=theta,
            iterations=iterations.numpy(),
            gradient_norms=gnorm.numpy().copy(),
            cg_iterations=cg_iterations,
        )

    def _quasi_newton_direction(self, rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """H̃⁻¹g for the refits ``rows`` by L-BFGS's two-loop recursion with M_g⁻¹ as the
        initial inverse Hessian (a refit without pairs gets M_g⁻¹g, the Newton step at θ̂)."""
        assert self.correction is not None
        q = g.clone()
        alphas = []
        pairs = [(s[rows], y[rows], rho[rows]) for s, y, rho in self.history]
        for s, y, rho in reversed(pairs):
            a = rho * (s * q).sum(1)
            q -= a[:, None] * y
            alphas.append(a)
        r = self.correction.restricted(rows)(q)
        for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
            b = rho * (y * r).sum(1)
            r += (a - b)[:, None] * s
        return r

    def _newton_direction(
        self, rows: torch.Tensor, g: torch.Tensor, curvature: torch.Tensor
    ) -> tuple[torch.Tensor, CGResult]:
        """The Newton step H_g(θ)⁻¹g of the refits ``rows`` by conjugate gradients (columns in
        :func:`core.linalg.conjugate_gradient`'s layout), preconditioned with M_g⁻¹."""
        model = self.model
        precondition = None if self.correction is None else self.correction.restricted(rows)
        run = conjugate_gradient(
            lambda v: model._batch_hvp(curvature, v.T).T,
            g.T,
            rtol=_forcing(float(g.norm(dim=1).max()), self.tol),
            max_iter=50 if precondition is not None else 500,
            preconditioner=None if precondition is None else (lambda r: precondition(r.T).T),
        )
        return run.solution.T, run

    def _remember(self, idx: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the pairs (s, y) of the refits ``idx`` that moved with yᵀs > 0 (always, for a
        strictly convex objective; a pair without it would make H̃ indefinite)."""
        k = self.weights.shape[1]
        curvature = (s * y).sum(1)
        usable = curvature > 0
        if not bool(usable.any()):
            return
        full_s = torch.zeros(k, s.shape[1], dtype=DTYPE)
        full_y = torch.zeros(k, s.shape[1], dtype=DTYPE)
        rho = torch.zeros(k, dtype=DTYPE)
        rows = idx[usable]
        full_s[rows] = s[usable]
        full_y[rows] = y[usable]
        rho[rows] = 1.0 / curvature[usable]
        self.history.append((full_s, full_y, rho))
        del self.history[:-QUASI_NEWTON_MEMORY]


class _RemovalCorrection:
    """The preconditioner M_g⁻¹ = H_{-g}(θ̂)⁻¹ for each refit g, from P ≈ H(θ̂)⁻¹ by Woodbury.

    H_{-g} = H - U_g U_gᵀ with U_g = [√(w_j/n) φ_j ⊗ B_j]_{j∈g} (p x |g|·r), so
    M_g⁻¹ v = P v + Z_g S_g⁻¹ Z_gᵀ v with Z_g = P U_g and S_g = I - U_gᵀ Z_g: one application of P
    to every removed point's columns up front, then per application a product with P and
    |g|·r-dimensional corrections. A group over :data:`REMOVAL_CORRECTION_MAX_RANK` columns, or
    one whose S_g is not positive definite (P far from H⁻¹), is preconditioned by P alone.
    """

    def __init__(
        self,
        model: LinearModel,
        removed: list[torch.Tensor],
        preconditioner: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.preconditioner = preconditioner
        features = model.features_
        n, d = features.shape
        c = model.n_outputs_
        factor = model.training_derivatives().factor
        r = factor.shape[2]
        weights = model.sample_weight_
        kept = [rows[weights[rows] > 0] for rows in removed]
        ranks = [
            len(rows) * r if len(rows) * r <= REMOVAL_CORRECTION_MAX_RANK else 0 for rows in kept
        ]
        width = max(ranks, default=0)
        self.z: torch.Tensor | None = None
        if width == 0:
            return
        rows = torch.cat([rows for rows, rank in zip(kept, ranks, strict=True) if rank])
        scaled = factor[rows] * (weights[rows] / n).sqrt()[:, None, None]
        U = torch.einsum("md,mcr->dcmr", features[rows], scaled).reshape(d * c, -1)
        Z = preconditioner(U)
        k = len(removed)
        self.z = torch.zeros(k, width, d * c, dtype=DTYPE)
        self.inner = torch.zeros(k, width, width, dtype=DTYPE)
        offset = 0
        for g, rank in enumerate(ranks):
            if not rank:
                continue
            u, z = U[:, offset : offset + rank], Z[:, offset : offset + rank]
            offset += rank
            small = torch.eye(rank, dtype=DTYPE) - u.T @ z
            chol, info = torch.linalg.cholesky_ex(0.5 * (small + small.T))
            if int(info) != 0:
                continue
            self.z[g, :rank] = z.T
            self.inner[g, :rank, :rank] = torch.cholesky_inverse(chol)

    def restricted(self, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """v (len(rows), p) -> M_g⁻¹ v row by row, for the refits ``rows`` in order."""
        preconditioner = self.preconditioner
        if self.z is None:
            return lambda v: preconditioner(v.T).T
        z, inner = self.z[rows], self.inner[rows]

        def apply(v: torch.Tensor) -> torch.Tensor:
            coefficients = torch.bmm(z, v[:, :, None])
            coefficients = torch.bmm(inner, coefficients)
            return preconditioner(v.T).T + torch.bmm(z.transpose(1, 2), coefficients)[:, :, 0]

        return apply


class LogisticRegression(LinearModel):
    """L2-regularised logistic regression on fixed features (binary or softmax).

    Args:
        l2: weight decay λ in (λ/2)‖θ‖² (the paper: 0.001).
        fit_intercept: append a constant feature; its weight is regularised like the others
            (keeps the Hessian positive definite even for separable data).
        tol: stop when ‖∇R‖₂ <= tol.
        max_iter: Newton iterations.
    """

    def __init__(
        self,
        l2: float = 1e-3,
        fit_intercept: bool = False,
        tol: float = 1e-10,
        max_iter: int = 200,
    ) -> None:
        super().__init__(l2=l2, tol=tol, max_iter=max_iter)
        self.fit_intercept = fit_intercept

    def _make_loss(self, n_classes: int) -> Loss:
        return LogisticLoss() if n_classes == 2 else SoftmaxCrossEntropy()

    def _fit_feature_map(self, X: torch.Tensor) -> torch.Tensor:
        self.n_features_in_ = X.shape[1]
        return self.torch_transform(X)

    def torch_transform(self, X: torch.Tensor) -> torch.Tensor:
        if self.fit_intercept:
            return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
        return X

    @property
    def training_inputs_(self) -> torch.Tensor:
        """The training inputs (n, D) the model was fitted on."""
        self._require_fitted()
        return self.features_[:, : self.n_features_in_]

    def transform(self, X: Any) -> torch.Tensor:
        self._require_fitted()
        X = as_float64(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise InfluenceExplorerError(
                f"Expected inputs of shape (m, {self.n_features_in_}), got {tuple(X.shape)}."
            )
        return self.torch_transform(X)


def _sparse_weighted_gram(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`core.linalg.weighted_gram` over the rows whose weight is not exactly zero (the
    others add nothing; a sharp smooth hinge gives many such rows, and so do removed points)."""
    nonzero = weights != 0
    count = int(nonzero.sum())
    if count == 0:
        return torch.zeros(features.shape[1], features.shape[1], dtype=features.dtype)
    if count < 0.75 * len(weights):
        return weighted_gram(features[nonzero], weights[nonzero])
    return weighted_gram(features, weights)


def _data_hessian(features: torch.Tensor, scaled: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """Σ_j s_j (φ_jφ_jᵀ) ⊗ A_j for features Φ (n, d), row scales s (n,) and the loss curvature
    A (n, C, C): the data term of the Hessian, (d·C, d·C) in the parameters' layout.

    Its (a, b) block in the class index, Φᵀ diag(s A[:, a, b]) Φ, is symmetric and equals the
    (b, a) block, so only the C(C+1)/2 blocks a <= b are formed, each from its lower triangle
    (:func:`core.linalg.weighted_gram`): n·d²·C(C+1)/2 flops, about a quarter of forming every
    block by a general product. ``python -m bench.full_fashion_mnist`` times it.
    """
    d, c = features.shape[1], d2.shape[1]
    if c == 1:
        return _sparse_weighted_gram(features, scaled * d2[:, 0, 0])
    hessian = torch.empty(d * c, d * c, dtype=features.dtype)
    blocks = hessian.view(d, c, d, c)
    for a in range(c):
        for b in range(a, c):
            block = _sparse_weighted_gram(features, scaled * d2[:, a, b])
            blocks[:, a, :, b] = block
            if b != a:
                blocks[:, b, :, a] = block
    return hessian


def class_rotation(classes: int) -> torch.Tensor:
    """The class basis Q (C, C): the Householder reflection that swaps e_C and q = 1/√C·(1, …, 1).

    Q is symmetric and orthogonal, its last column is q and its first C - 1 columns are an
    orthonormal basis of the zero-sum vectors. With v = q - e_C, vᵀv = 2 - 2/√C > 0 for C >= 2,
    so the reflection is stable for any number of classes.
    """
    if classes < 2:
        raise InfluenceExplorerError(f"A class basis needs at least 2 classes, got {classes}.")
    q = torch.full((classes,), classes**-0.5, dtype=DTYPE)
    v = q.clone()
    v[-1] -= 1.0
    return torch.eye(classes, dtype=DTYPE) - (2.0 / float(v @ v)) * torch.outer(v, v)


@dataclass(frozen=True)
class ClassBasisHessian:
    """∇²R(θ̂) of a shift-invariant multi-class model in the class basis of :func:`class_rotation`.

    A loss that depends only on the differences of the scores (softmax cross-entropy, the
    Crammer-Singer hinge) has per-example curvature A_j with A_j·1 = 0. With T = I_d ⊗ Q
    (θ = T θ', i.e. W = W' Qᵀ), TᵀHT = Σ_j s_j (φ_jφ_jᵀ) ⊗ (QᵀA_jQ) + λI, and the last row and
    column of every QᵀA_jQ are zero. So in the new coordinates H is block diagonal: the
    d·(C - 1) coordinates of the first C - 1 columns carry the data term plus λI (``matrix``), the
    d coordinates along q carry λI alone. Forming ``matrix`` takes C(C - 1)/2 symmetric blocks
    instead of C(C + 1)/2 (45 instead of 55 for ten classes) and factorising it (d·(C - 1))³/3
    instead of (d·C)³/3 flops: 18% and 27% less for ten classes, exactly the same operator.

    Attributes:
        matrix: (d·(C - 1), d·(C - 1)), laid out like θ' without its last column
            (θ'[k·(C - 1) + e] = W'[k, e]); a new tensor the caller may modify.
        rotation: (C, C) Q.
        l2: λ, the curvature along q.
    """

    matrix: torch.Tensor
    rotation: torch.Tensor
    l2: float


def solve_in_class_basis(
    factor: torch.Tensor | None,
    rotation: torch.Tensor,
    lam: float,
    columns: torch.Tensor,
    *,
    inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """H⁻¹v for (p, k) columns from H's class-basis form (:class:`ClassBasisHessian`): rotate
    the class index by Q, two triangular solves with ``factor`` (the lower Cholesky factor of
    its d·(C - 1) matrix) for the first C - 1 columns, or a product with ``inverse`` (that
    matrix's inverse) when given, and a division by ``lam`` for the last, rotate back.
    Returns: (p, k)."""
    c, k = rotation.shape[0], columns.shape[1]
    rotated = torch.einsum("dck,ce->dek", columns.reshape(-1, c, k), rotation)
    d = rotated.shape[0]
    solved = torch.empty_like(rotated)
    head = rotated[:, :-1, :].reshape(d * (c - 1), k)
    if inverse is not None:
        # S'v as (vᵀS')ᵀ (S' is symmetric), which the BLAS runs faster for few columns.
        head = times_thin(inverse, head)
    else:
        assert factor is not None
        head = cholesky_solve(factor, head)
    solved[:, :-1, :] = head.reshape(d, c - 1, k)
    solved[:, -1, :] = rotated[:, -1, :] / lam
    return torch.einsum("dek,ce->dck", solved, rotation).reshape(d * c, k)


def has_class_basis(model: Any) -> bool:
    """Whether ``model``'s Hessian can be formed in the class basis (:class:`ClassBasisHessian`):
    a fitted multi-class linear model with a shift-invariant loss (its features in memory, or
    in shards on a cluster, which form the basis's blocks by map-reduce)."""
    return (
        isinstance(model, LinearModel)
        and model.feature_shape() is not None
        and getattr(model, "n_outputs_", 1) >= 2
        and bool(getattr(getattr(model, "loss_", None), "shift_invariant", False))
    )


class SampledCurvature:
    """A preconditioner for Newton-CG fits on many rows: the exact Hessian of a random sample.

    For m rows S drawn without replacement, H_S = (1/m) Σ_{j∈S} w_j (φ_jφ_jᵀ) ⊗ A_j + λI is an
    unbiased estimate of the Hessian whose top eigendirections (what makes plain CG slow at small
    λ) it captures once m exceeds the effective dimension; conjugate gradients then need a few
    dozen iterations per Newton step instead of hundreds. It is formed when a Newton step's
    plain CG has not converged in :attr:`refresh_after` iterations, at that iterate, and kept
    while it works: its factor is refactorised for a new λ (a fit further along a λ path), and
    the sample's curvature is re-formed at the current iterate once a preconditioned step needs
    more than :attr:`refresh_after` iterations. It is formed and factorised in float32 (half the
    memory and time of float64); the preconditioner only steers CG, whose residuals stay in
    float64, so the fit's optimum and stopping rule are unchanged.

    Measured on 40,000 rows of 1280-d features, ten classes (p = 12,800), at θ̂(λ = 1e-2),
    one Newton system to 1e-6: λ = 1e-3, plain CG 287 iterations (29.5 s), with m = 5000 27
    (3.6 s, after 19 s to form and factorise); λ = 1e-4, 815 iterations (90.6 s) against 54
    (7.5 s). ``python -m bench.full_fashion_mnist`` times whole fits with it.

    One object may be passed to several fits on the same rows (cross-validation along the λ
    grid: ``fit(..., curvature=...)``); it remembers which features it was formed from.
    """

    #: Rows sampled; their Hessian costs m·d²·C(C+1)/2 flops and the factor (d·C)³/3 (in the
    #: class basis C(C - 1)/2 blocks and (d·(C - 1))³/3).
    rows: int = 5000
    #: CG iterations per Newton step above which the sample is re-formed at the next step.
    refresh_after: int = 60

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._key: tuple[Any, ...] | None = None
        self._data: torch.Tensor | None = None
        self._l2: float | None = None
        self._factor: torch.Tensor | None = None
        self._stale = True
        self._rotation: torch.Tensor | None = None
        self.builds = 0
        self.factorisations = 0

    @staticmethod
    def _rows_key(model: LinearModel) -> tuple[Any, ...]:
        features = model.features_
        return (tuple(features.shape), float(features[0].sum()), float(features[-1].sum()))

    def formed_for(self, model: LinearModel) -> bool:
        """Whether a sample's curvature has been formed on ``model``'s rows."""
        return self._data is not None and self._key == self._rows_key(model)

    def prepare(self, model: LinearModel, derivs: LossDerivatives) -> None:
        """Make the factor match ``model``'s rows and λ, forming the sample's curvature at the
        current iterate (``derivs``) when there is none for these rows or it is stale."""
        key = self._rows_key(model)
        if key != self._key or self._stale or self._data is None:
            features = model.features_
            n = features.shape[0]
            m = min(self.rows, n)
            generator = torch.Generator().manual_seed(self.seed)
            sample = torch.randperm(n, generator=generator)[:m]
            single = torch.float32
            self._factor = self._data = None  # free the old ones before forming the new
            d2 = derivs.d2[sample]
            # In the class basis when the loss allows (ClassBasisHessian): the all-ones class
            # direction's curvature is λ alone, so only the other C - 1 columns are formed.
            self._rotation = class_rotation(model.n_outputs_) if has_class_basis(model) else None
            if self._rotation is not None:
                d2 = (self._rotation.T @ d2 @ self._rotation)[:, :-1, :-1]
            self._data = _data_hessian(
                features[sample].to(single),
                (model.sample_weight_[sample] / m).to(single),
                d2.to(single),
            )
            self._key, self._stale, self._l2 = key, False, None
            self.builds += 1
        if self._l2 != model.l2:
            assert self._data is not None
            self._factor = None  # free the old factor before forming the new one
            matrix = self._data.clone()
            matrix.diagonal().add_(model.l2)
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) != 0:  # a float32 rounding of a nearly singular matrix: shift it
                matrix.diagonal().add_(1e-6 * float(matrix.diagonal().mean()))
                factor, info = torch.linalg.cholesky_ex(matrix)
            self._factor = factor if int(info) == 0 else None
            self._l2 = model.l2
            self.factorisations += 1

    def apply(self, residual: torch.Tensor) -> torch.Tensor:
        """H_S⁻¹ r (the identity if the factor could not be formed)."""
        if self._factor is None:
            return residual
        rotation = self._rotation
        if rotation is None:
            solved = cholesky_solve(self._factor, residual.to(torch.float32))
            return solved.to(residual.dtype)
        assert self._l2 is not None
        single = torch.float32
        columns = residual.reshape(residual.shape[0], -1).to(single)
        solved = solve_in_class_basis(self._factor, rotation.to(single), self._l2, columns)
        return solved.to(residual.dtype).reshape(residual.shape)

    def used(self, iterations: int) -> None:
        """Record a Newton step's CG iterations; too many mark the sample's curvature stale."""
        if iterations > self.refresh_after:
            self._stale = True


#: Named rules for the RBF width γ (see :func:`rbf_gamma`).
GAMMA_RULES: tuple[str, ...] = ("median", "paper")

#: The RBF SVM's default γ rule.
DEFAULT_GAMMA = "median"

#: Training points sampled (seeded) for the median heuristic.
MEDIAN_SAMPLE = 1000


def rbf_gamma(gamma: float | str | None, X: torch.Tensor, seed: int = 0) -> float:
    """The RBF width for training inputs X under a rule or a fixed value.

    - ``"paper"``: Koh & Liang's 0.05 / n_train. It shrinks as n grows, so on large training sets
      the kernel becomes nearly constant (γ·‖x - x'‖² of order 1e-3 at n = 20,000 on [-1, 1]
      pixels) and the SVM degrades (bench/RESULTS.md, scale notes).
    - ``"median"``: the median heuristic, 1 / median ‖x_i - x_j‖² over the pairs of a seeded sample
      of at most :data:`MEDIAN_SAMPLE` training inputs. It does not depend on n, so the kernel
      stays informative at every size: a typical pair has k(x, x') = e⁻¹.
    - a number: that γ. ``None``: the paper's (the estimator's historical default).

    Args:
        gamma: a rule name, a positive number, or None.
        X: (n, D) training inputs.
        seed: sampling seed of the median heuristic.
    """
    n = X.shape[0]
    if gamma is None or gamma == "paper":
        return 0.05 / n
    if gamma == "median":
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        sample = X[rows[: min(n, MEDIAN_SAMPLE)]]
        squared = torch.cdist(sample, sample).square()
        upper = torch.triu_indices(len(sample), len(sample), offset=1)
        median = float(torch.quantile(squared[upper[0], upper[1]], 0.5))
        if not median > 0:
            raise InfluenceExplorerError(
                "The median heuristic for the RBF width failed: the sampled training images are "
                "all identical. Give a fixed gamma instead."
            )
        return 1.0 / median
    return float(gamma)


def _check_gamma(gamma: Any) -> None:
    if gamma is None or gamma in GAMMA_RULES:
        return
    if isinstance(gamma, str) or not (gamma > 0 and math.isfinite(gamma)):
        raise InfluenceExplorerError(
            f"gamma must be > 0, one of {', '.join(GAMMA_RULES)}, or None; got {gamma!r}."
        )


def rbf_kernel(A: torch.Tensor, B: torch.Tensor, gamma: float) -> torch.Tensor:
    """exp(-γ‖a - b‖²) for all pairs. Returns: (len(A), len(B))."""
    sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    return torch.exp(-gamma * sq.clamp_min(0.0))


class KernelSVM(LinearModel):
    """The paper's RBF-kernel SVM on pixels with the smooth hinge loss, for any number of classes.

    The training kernel is factorised once, K + εI = L Lᵀ (ε a tiny jitter, recorded in
    ``jitter_``, that keeps the factorisation stable), and a linear model with no bias is trained
    on the rows of L; a new image x gets features L⁻¹ k(X_train, x). Then
    θᵀφ(x) = αᵀ k(X_train, x) with α = L⁻ᵀθ and ‖θ‖² = αᵀ(K + εI)α, an ordinary kernel SVM.

    **Two classes** (labels 0/1): the paper's model, one score column s (positive means class 1)
    and the smooth hinge t·log(1 + exp((1 - y·s)/t)), n parameters.

    **C >= 3 classes**: one score column per class (n·C parameters) and the Crammer-Singer hinge
    smoothed with the same temperature, t·log(1 + Σ_{c≠y} exp((1 + s_c - s_y)/t))
    (:class:`core.losses.MulticlassSmoothHinge`). It is the multiclass hinge whose two-class case,
    written in the difference of the two scores, is exactly the paper's smooth hinge, so the
    binary model above is its C = 2 member; one-vs-rest hinges would not reduce to it, and they
    couple the classes only through the argmax. Like the binary loss its curvature lives near the
    margin, and its per-example Hessian has rank C - 1.

    ``predict_proba`` is a display score, not part of the objective, labelled "Platt-scaled":
    for two classes Platt scaling without an offset, σ(a·s); for C classes its multiclass form,
    softmax(a·s) with one scale a > 0 (temperature scaling). a is fitted once on the training
    scores against Platt's regularised targets ((n_y + 1)/(n_y + 2) on the label, the rest spread
    over the other classes), so the most probable class is always the predicted one.

    Args:
        gamma: RBF width γ on inputs scaled to [-1, 1], or a rule of :func:`rbf_gamma`:
            ``"median"`` (the median heuristic, informative at every n) or ``"paper"`` (the
            paper's 0.05 / n_train); ``None`` is the paper's.
        l2: weight decay λ (the paper: 0.001).
        temperature: smooth-hinge temperature t. The default 0.01 is chosen by measurement
            (``python -m bench.svm_temperature``): on the demo's T-shirt/top vs Shirt pixels it
            has the same test accuracy as the paper's 0.001, while influence stays accurate
            (leave-one-out Pearson >= 0.99 on every test point tried); at 0.001 the smooth hinge
            is nearly a kink and one test point's Pearson fell to 0.40 with a slope over 200.
        tol, max_iter: Newton stopping rule.
    """

    def __init__(
        self,
        gamma: float | str | None = None,
        l2: float = 1e-3,
        temperature: float = 1e-2,
        tol: float = 1e-10,
        max_iter: int = 200,
    ) -> None:
        super().__init__(l2=l2, tol=tol, max_iter=max_iter)
        self.gamma = gamma
        self.temperature = temperature

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InfluenceExplorerError(f"temperature must be > 0, got {self.temperature!r}.")
        _check_gamma(self.gamma)

    def _hinge(self, temperature: float) -> Loss:
        if self.n_classes_ == 2:
            return SmoothHingeLoss(temperature)
        return MulticlassSmoothHinge(temperature)

    def _make_loss(self, n_classes: int) -> Loss:
        return self._hinge(self.temperature)

    def _fit_feature_map(self, X: torch.Tensor) -> torch.Tensor:
        self.gamma_ = rbf_gamma(self.gamma, X)
        self.X_train_ = X
        self.cholesky_, self.jitter_ = _jittered_cholesky(rbf_kernel(X, X, self.gamma_))
        return self.cholesky_

    def torch_transform(self, X: torch.Tensor) -> torch.Tensor:
        k = rbf_kernel(self.X_train_, X, self.gamma_)
        return torch.linalg.solve_triangular(self.cholesky_, k, upper=False).T

    def torch_feature_maps(
        self, train_inputs: torch.Tensor, test_inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A training image enters the whole kernel matrix, hence its Cholesky factor (every
        # training point's features) and the test images' features: rebuild them all.
        n = train_inputs.shape[0]
        kernel = rbf_kernel(train_inputs, train_inputs, self.gamma_)
        chol = torch.linalg.cholesky(kernel + self.jitter_ * torch.eye(n, dtype=kernel.dtype))
        test_kernel = rbf_kernel(train_inputs, test_inputs, self.gamma_)
        return chol, torch.linalg.solve_triangular(chol, test_kernel, upper=False).T

    def _features_times(self, matrix: torch.Tensor) -> torch.Tensor:
        # The exact model's training features are its lower-triangular Cholesky factor: a strip
        # of rows multiplies only the columns up to its diagonal, 5/8 of a full product's flops
        # at four strips (the batched refits' products, bench/results/latency_verify.md).
        L = self.features_
        if L is not self.cholesky_:
            return super()._features_times(matrix)
        n = L.shape[0]
        out = torch.empty(n, matrix.shape[1], dtype=DTYPE)
        for i0 in range(0, n, STRIP):
            i1 = min(i0 + STRIP, n)
            out[i0:i1] = L[i0:i1, :i1] @ matrix[:i1]
        return out

    def _features_t_times(self, matrix: torch.Tensor) -> torch.Tensor:
        L = self.features_
        if L is not self.cholesky_:
            return super()._features_t_times(matrix)
        n = L.shape[0]
        out = torch.empty(n, matrix.shape[1], dtype=DTYPE)
        for j0 in range(0, n, STRIP):
            j1 = min(j0 + STRIP, n)
            out[j0:j1] = L[j0:, j0:j1].T @ matrix[j0:]
        return out

    @property
    def training_inputs_(self) -> torch.Tensor:
        """The training inputs (n, D) the model was fitted on."""
        self._require_fitted()
        return self.X_train_

    def transform(self, X: Any) -> torch.Tensor:
        self._require_fitted()
        X = as_float64(X)
        if X.ndim != 2 or X.shape[1] != self.X_train_.shape[1]:
            raise InfluenceExplorerError(
                f"Expected inputs of shape (m, {self.X_train_.shape[1]}), got {tuple(X.shape)}."
            )
        return self.torch_transform(X)

    def _fit_parameters(self, theta0: torch.Tensor | None) -> None:
        if theta0 is not None or self.temperature >= 0.1:
            super()._fit_parameters(theta0)
        else:
            # A cold start at a small temperature sees an almost piecewise-linear loss with
            # curvature only at the margin, where Newton crawls; following the solution down
            # from t = 0.1 (continuation) reaches the same optimum in a few steps each.
            target = self.temperature
            theta = None
            t = 0.1
            while t > target:
                self.loss_ = self._hinge(t)
                super()._fit_parameters(theta)
                theta = self.theta_
                t /= 10.0
            self.loss_ = self._hinge(target)
            super()._fit_parameters(theta)
        self._fit_platt()

    def _fit_platt(self) -> None:
        self.platt_ = output_scale(self.scores(self.features_), self.labels_)

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        if self.n_outputs_ > 1:
            return torch.softmax(self.platt_ * scores, dim=1)
        p1 = torch.sigmoid(self.platt_ * scores[:, 0])
        return torch.stack([1 - p1, p1], dim=1)


def output_scale(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The display scale a of ``predict_proba`` from training scores (n, C) and labels (n,):
    Platt's slope (:func:`platt_slope`) for one score column, temperature scaling
    (:func:`temperature_scale`) for C. (A function so the sharded SVM of :mod:`core.backend`
    fits the same scale from its gathered training scores.)"""
    if scores.shape[1] == 1:
        return platt_slope(scores[:, 0], labels)
    return temperature_scale(scores, labels)


def platt_slope(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Platt scaling's slope a of σ(a·s) on training scores s (n,) and 0/1 labels (n,).

    One slope, no offset: probability 0.5 stays exactly on the decision boundary, so the most
    probable class is always the predicted one.
    """
    s = scores
    y = labels.to(DTYPE)
    n_pos, n_neg = float(y.sum()), float((1 - y).sum())
    # Platt's regularised targets keep the fit finite when the training set is separable.
    target = torch.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a = 1.0
    for _ in range(100):
        p = torch.sigmoid(a * s)
        gradient = float(((p - target) * s).sum())
        curvature = float((p * (1 - p) * s * s).sum()) + 1e-9
        step = gradient / curvature
        a = max(a - step, 1e-3)
        if abs(step) < 1e-10:
            break
    return a


def temperature_scale(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The scale a > 0 of softmax(a·s) fitted by Newton on the cross-entropy against Platt's
    regularised targets: (n_y + 1)/(n_y + 2) on the label, the rest spread evenly over the other
    classes (for two classes exactly Platt's targets), which keeps a finite when the training set
    is separable. The objective is convex in a."""
    n, c = scores.shape
    counts = torch.bincount(labels, minlength=c).to(DTYPE)
    own = (counts[labels] + 1) / (counts[labels] + 2)
    targets = ((1 - own) / (c - 1))[:, None].expand(n, c).clone()
    targets[torch.arange(n), labels] = own
    a = 1.0
    for _ in range(100):
        p = torch.softmax(a * scores, dim=1)
        gradient = float(((p - targets) * scores).sum())
        mean = (p * scores).sum(1)
        curvature = float(((p * scores * scores).sum(1) - mean * mean).sum()) + 1e-9
        step = gradient / curvature
        a = max(a - step, 1e-3)
        if abs(step) < 1e-10:
            break
    return a


def _jittered_cholesky(kernel: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of kernel + εI with the smallest ε in 1e-12..1e-2 that works.

    The kernel is modified in place (the jitter is added to its diagonal) to avoid a second
    n x n copy; pass a matrix you no longer need.
    """
    added = 0.0
    for jitter in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        kernel.diagonal().add_(jitter - added)
        added = jitter
        chol, info = torch.linalg.cholesky_ex(kernel)
        if int(info) == 0:
            return chol, jitter
    raise InfluenceExplorerError(
        "The RBF kernel matrix could not be factorised even with jitter 1e-2; "
        "are there many duplicate training images? Try a larger gamma."
    )


class NystroemSVM(KernelSVM):
    """The RBF SVM of :class:`KernelSVM` with a Nyström approximation of the kernel.

    For training sets too large for the n x n kernel (O(n²) memory, O(n³) time), the kernel is
    approximated through m landmarks Z, a seeded uniform sample of the training inputs:
    K ≈ K_nm K_mm⁻¹ K_mn. With K_mm + εI = L_m L_mᵀ the feature map is
    φ(x) = L_m⁻¹ k(Z, x) (m-dimensional), so φ(x_i)ᵀφ(x_j) is the Nyström kernel, and the model is
    the same smooth-hinge linear model with m parameters: O(n·m) memory, O(n·m²) time.

    With every training point as a landmark (m >= n) the features are the rows of the exact
    model's Cholesky factor (up to the jitter ε), so the fit and the influence scores equal
    :class:`KernelSVM`'s;
    for m < n it is an approximation whose quality the benchmark reports (``bench.scale``).
    Landmarks are held fixed when a training point is removed (leave-one-out keeps the feature
    map, as the exact model keeps its factor).

    Args:
        n_components: number of landmarks m.
        gamma: RBF width or rule, as :class:`KernelSVM` (rules use the full training set).
        l2, temperature, tol, max_iter: as :class:`KernelSVM`.
        seed: landmark sampling seed.
        chunk_size: training points whose kernel columns are formed at once (bounds memory).
    """

    def __init__(
        self,
        n_components: int = 1000,
        gamma: float | str | None = None,
        l2: float = 1e-3,
        temperature: float = 1e-2,
        tol: float = 1e-10,
        max_iter: int = 200,
        seed: int = 0,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__(gamma=gamma, l2=l2, temperature=temperature, tol=tol, max_iter=max_iter)
        self.n_components = n_components
        self.seed = seed
        self.chunk_size = chunk_size

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        if int(self.n_components) < 1:
            raise InfluenceExplorerError(f"n_components must be >= 1, got {self.n_components!r}.")
        if int(self.chunk_size) < 1:
            raise InfluenceExplorerError(f"chunk_size must be >= 1, got {self.chunk_size!r}.")

    def _fit_feature_map(self, X: torch.Tensor) -> torch.Tensor:
        n = X.shape[0]
        self.gamma_ = rbf_gamma(self.gamma, X)
        self.X_train_ = X
        m = min(int(self.n_components), n)
        if m == n:
            indices = torch.arange(n)
        else:
            generator = torch.Generator().manual_seed(int(self.seed))
            indices = torch.randperm(n, generator=generator)[:m].sort().values
        self.landmark_indices_ = indices
        self.landmarks_ = X[indices]
        self.cholesky_, self.jitter_ = _jittered_cholesky(
            rbf_kernel(self.landmarks_, self.landmarks_, self.gamma_)
        )
        features = torch.empty(n, m, dtype=DTYPE)
        for start in range(0, n, int(self.chunk_size)):
            features[start : start + int(self.chunk_size)] = self.torch_transform(
                X[start : start + int(self.chunk_size)]
            )
        return features

    def torch_transform(self, X: torch.Tensor) -> torch.Tensor:
        k = rbf_kernel(self.landmarks_, X, self.gamma_)
        return torch.linalg.solve_triangular(self.cholesky_, k, upper=False).T

    def torch_feature_maps(
        self, train_inputs: torch.Tensor, test_inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A training image moves every point's features only if it is a landmark (through
        # K_mm's factor); otherwise only its own row. Both follow from rebuilding the map from
        # the landmarks' current inputs, at the same landmark indices, γ and jitter.
        landmarks = train_inputs[self.landmark_indices_]
        kernel = rbf_kernel(landmarks, landmarks, self.gamma_)
        eye = torch.eye(len(landmarks), dtype=kernel.dtype)
        chol = torch.linalg.cholesky(kernel + self.jitter_ * eye)

        def features(X: torch.Tensor) -> torch.Tensor:
            k = rbf_kernel(landmarks, X, self.gamma_)
            return torch.linalg.solve_triangular(chol, k, upper=False).T

        return features(train_inputs), features(test_inputs)


#: Memory the exact kernel SVM may take before :func:`make_rbf_svm` switches to Nyström.
SVM_MEMORY_BUDGET = 4 * 2**30

#: Most landmarks :func:`make_rbf_svm` gives a Nyström SVM.
MAX_LANDMARKS = 1000


def svm_memory_bytes(n_train: int, n_features: int, n_classes: int) -> int:
    """Peak memory of an RBF SVM with ``n_features`` features per point, with its influence engine.

    Counted in float64 n x n / n x m and p x p matrices (p = n_features·C, one column for two
    classes): the kernel, its temporaries and factor (3 n·m for the exact model, m = n; the
    Nyström model's n x m features plus the m x m kernel and factor), then the engine's dense
    Hessian with its Cholesky factor, and later the factor with the inverse the Newton-corrected
    estimate reads (2 p² either way). ``bench/results/scale.md`` measured about 34·n² bytes for
    the binary exact model (n x n and p x p both count), close to this 40·n².
    """
    outputs = 1 if n_classes == 2 else n_classes
    p = n_features * outputs
    return 8 * (3 * n_train * n_features + 2 * p * p)


def make_rbf_svm(
    n_train: int,
    n_classes: int,
    *,
    memory_budget: int = SVM_MEMORY_BUDGET,
    max_landmarks: int = MAX_LANDMARKS,
    **settings: Any,
) -> KernelSVM:
    """The exact :class:`KernelSVM` when it fits in ``memory_budget``, else a :class:`NystroemSVM`.

    The switch is by :func:`svm_memory_bytes`: exact while 8·(3n² + 2(n·C)²) bytes fit (with the
    default 4 GiB: n <= 10,360 for two classes, 5,050 for three, 1,620 for ten); otherwise the
    largest number of landmarks m <= ``max_landmarks`` whose Nyström model fits, so the model is
    the same smooth-hinge SVM on an m-dimensional approximation of the kernel.

    Args:
        n_train, n_classes: the training set's size and number of classes.
        settings: ``gamma``, ``l2``, ``temperature``, ``tol``, ``max_iter`` of both models.
    """
    if svm_memory_bytes(n_train, n_train, n_classes) <= memory_budget:
        return KernelSVM(**settings)
    m = min(int(max_landmarks), n_train)
    while m > 10 and svm_memory_bytes(n_train, m, n_classes) > memory_budget:
        m = int(m * 0.9)
    return NystroemSVM(n_components=m, **settings)


def cross_validated_accuracies(
    make_model: Callable[[float], LinearModel],
    X: Any,
    y: Any,
    folds: Any,
    l2_grid: Any,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Held-out accuracy of a model for every weight decay and fold, reusing work across both.

    For each fold the grid is fitted from the largest λ down, each fit warm-started from the
    previous λ's solution (the regularisation path: the most regularised problem converges from
    zero in a few steps, and each next solution is close to the last). Each fit still runs to
    the model's tolerance, so warm starts change the time, not the accuracies.

    This is the fitting half of choosing λ; the rule that turns the table into a choice (and how
    folds are drawn) is the caller's.

    Args:
        make_model: λ -> an unfitted model, e.g. ``lambda l2: LogisticRegression(l2=l2, tol=1e-8)``.
        X: (n, D) inputs; y: (n,) labels.
        folds: (n,) fold index of every row, 0..k-1; a row is held out in its fold.
        l2_grid: the λ values.
        progress: ``progress(done, total)`` over the len(grid)·k fits.
    Returns:
        (len(l2_grid), k) accuracy on each fold's held-out rows, rows in the order of ``l2_grid``.
    """
    X = as_float64(X)
    labels = as_labels(y)
    fold_of = np.asarray(folds, dtype=np.int64)
    grid = [float(v) for v in l2_grid]
    if fold_of.shape != (X.shape[0],) or fold_of.min(initial=0) < 0:
        raise InfluenceExplorerError("folds must give every row a fold index >= 0.")
    n_folds = int(fold_of.max()) + 1
    accuracy = np.zeros((len(grid), n_folds))
    order = sorted(range(len(grid)), key=lambda i: -grid[i])
    done, total = 0, len(grid) * n_folds
    for fold in range(n_folds):
        held = torch.as_tensor(fold_of == fold)
        train = ~held
        if not bool(held.any()) or not bool(train.any()):
            raise InfluenceExplorerError(f"fold {fold} must hold out some rows and keep others.")
        theta = None
        for i in order:
            model = make_model(grid[i]).fit(X[train], labels[train], theta0=theta)
            theta = model.theta_
            predictions = torch.as_tensor(model.predict(X[held]))
            accuracy[i, fold] = float((predictions == labels[held]).double().mean())
            done += 1
            if progress is not None:
                progress(done, total)
    return accuracy
