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
  features row i of L; the loss is the smooth hinge.

Parameters are laid out as ``θ[k·C + c] = W[k, c]``. Derivatives use closed forms from
:mod:`core.losses`; the tests check them against ``torch.func``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import ConvergenceError, InfluenceExplorerError, NotFittedError
from core.linalg import cholesky_solve, conjugate_gradient
from core.losses import LogisticLoss, Loss, LossDerivatives, SmoothHingeLoss, SoftmaxCrossEntropy

DTYPE = torch.float64

#: Above this many parameters the Newton step is solved by conjugate gradients on
#: Hessian-vector products instead of a dense Cholesky factorisation.
DENSE_NEWTON_MAX_PARAMS = 4096


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
    """How a fit ended: Newton iterations, final gradient norm and objective, wall time."""

    iterations: int
    gradient_norm: float
    objective: float
    converged: bool
    seconds: float


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
    ) -> LinearModel:
        """Fit to convergence (gradient norm <= ``tol``) by Newton's method with line search.

        Args:
            X: (n, D) training inputs.
            y: (n,) integer class labels in [0, n_classes).
            sample_weight: (n,) optional weights w_i of the loss terms; the objective still
                divides by n (a zero weight removes a point as influence functions assume).
            theta0: optional starting parameters (p,).
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
        if not torch.isfinite(X).all():
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
        self._fit_parameters(theta0)
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
        while True:
            gnorm = float(grad.norm())
            if gnorm <= self.tol or iterations >= self.max_iter:
                break
            iterations += 1
            step = self._newton_step(derivs, grad)
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
        )
        if not info.converged and gnorm > max(1e3 * self.tol, 1e-6):
            raise ConvergenceError(
                f"{type(self).__name__} did not converge: gradient norm {gnorm:.3g} after "
                f"{iterations} Newton iterations (tolerance {self.tol:g}). Increase l2 or max_iter."
            )
        return theta, info

    def _newton_step(self, derivs: LossDerivatives, grad: torch.Tensor) -> torch.Tensor:
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
                return run.solution
            # The Hessian has moved too far from θ̂'s (e.g. a sharp smooth hinge whose active
            # set changed): stop trying for the rest of this fit.
            self._preconditioner = None
        if p <= DENSE_NEWTON_MAX_PARAMS:
            hessian = self._hessian_from(derivs)
            chol, info = torch.linalg.cholesky_ex(hessian)
            if int(info) == 0:
                return cholesky_solve(chol, grad)
            return torch.linalg.lstsq(hessian, grad[:, None]).solution[:, 0]
        # Large models: an inexact Newton step by conjugate gradients on exact HVPs, with the
        # forcing term shrinking with the gradient (superlinear convergence near the optimum).
        return conjugate_gradient(
            lambda v: self._hvp_from(derivs, v),
            grad,
            rtol=min(0.1, float(grad.norm()) ** 0.5),
            max_iter=500,
        ).solution

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
        grad = (self.features_.T @ (w[:, None] * derivs.d1)).reshape(-1) / n + self.l2 * theta
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
        features, w = self.features_, self.sample_weight_
        n, d = features.shape
        c = self.n_outputs_
        scaled = w / n
        if c == 1:
            hessian = features.T @ (features * (scaled * derivs.d2[:, 0, 0])[:, None])
        else:
            blocks = torch.empty(d, c, d, c, dtype=DTYPE)
            for a in range(c):
                for b in range(a, c):
                    block = features.T @ (features * (scaled * derivs.d2[:, a, b])[:, None])
                    blocks[:, a, :, b] = block
                    blocks[:, b, :, a] = block
            hessian = blocks.reshape(d * c, d * c)
        hessian.diagonal().add_(self.l2)
        return hessian

    def hessian(self) -> torch.Tensor:
        """Exact Hessian of the training objective at θ̂. Returns: (p, p)."""
        self._require_fitted()
        return self._hessian_from(self._train_derivs)

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
        v3 = v.reshape(d, c, k)
        s = torch.einsum("nd,dck->nck", features, v3)
        t = torch.einsum("nce,nek->nck", d2, s) * (w / denominator)[:, None, None]
        out = torch.einsum("nd,nck->dck", features, t).reshape(d * c, k) + self.l2 * v
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
        return self._probabilities(self.scores(self.transform(X))).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class indices. Returns: (m,)."""
        s = self.scores(self.transform(X))
        if self.n_outputs_ == 1:
            return (s[:, 0] > 0).to(torch.int64).numpy()
        return s.argmax(dim=1).numpy()

    def loss(self, X: Any, y: Any) -> np.ndarray:
        """Per-example loss on inputs X. Returns: (m,)."""
        return self.per_example_losses(self.transform(X), y).numpy()

    def accuracy(self, X: Any, y: Any) -> float:
        """Fraction of X classified as y."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


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


def rbf_kernel(A: torch.Tensor, B: torch.Tensor, gamma: float) -> torch.Tensor:
    """exp(-γ‖a - b‖²) for all pairs. Returns: (len(A), len(B))."""
    sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    return torch.exp(-gamma * sq.clamp_min(0.0))


class KernelSVM(LinearModel):
    """The paper's RBF-kernel SVM on pixels with the smooth hinge loss (binary labels 0/1).

    The training kernel is factorised once, K + εI = L Lᵀ (ε a tiny jitter, recorded in
    ``jitter_``, that keeps the factorisation stable), and a linear model with n parameters and
    no bias is trained on the rows of L; a new image x gets features L⁻¹ k(X_train, x). Then
    θᵀφ(x) = αᵀ k(X_train, x) with α = L⁻ᵀθ and ‖θ‖² = αᵀ(K + εI)α, an ordinary kernel SVM.

    ``predict_proba`` is Platt scaling without an offset, σ(a·s), fitted once on the training
    scores (so p = 0.5 on the decision boundary); it is a calibrated-looking score for display,
    not part of the objective.

    Args:
        gamma: RBF width γ on inputs scaled to [-1, 1]; ``None`` uses the paper's 0.05 / n_train.
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
        gamma: float | None = None,
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
        if self.gamma is not None and not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise InfluenceExplorerError(f"gamma must be > 0 or None, got {self.gamma!r}.")

    def _infer_n_classes(self, labels: torch.Tensor) -> int:
        n_classes = super()._infer_n_classes(labels)
        if n_classes != 2:
            raise InfluenceExplorerError(
                "KernelSVM is binary: labels must be 0 or 1. Pick two classes of the dataset."
            )
        return n_classes

    def _make_loss(self, n_classes: int) -> Loss:
        return SmoothHingeLoss(self.temperature)

    def _fit_feature_map(self, X: torch.Tensor) -> torch.Tensor:
        n = X.shape[0]
        self.gamma_ = float(self.gamma) if self.gamma is not None else 0.05 / n
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
                self.loss_ = SmoothHingeLoss(t)
                super()._fit_parameters(theta)
                theta = self.theta_
                t /= 10.0
            self.loss_ = SmoothHingeLoss(target)
            super()._fit_parameters(theta)
        self._fit_platt()

    def _fit_platt(self) -> None:
        self.platt_ = platt_slope(self.scores(self.features_)[:, 0], self.labels_)

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        p1 = torch.sigmoid(self.platt_ * scores[:, 0])
        return torch.stack([1 - p1, p1], dim=1)


def platt_slope(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Platt scaling's slope a of σ(a·s) on training scores s (n,) and 0/1 labels (n,).

    One slope, no offset: probability 0.5 stays exactly on the decision boundary, so the most
    probable class is always the predicted one. (A function so the sharded SVM of
    :mod:`core.backend` fits the same slope from its gathered training scores.)
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
        gamma: RBF width; ``None`` uses the paper's 0.05 / n_train (of the full training set).
        l2, temperature, tol, max_iter: as :class:`KernelSVM`.
        seed: landmark sampling seed.
        chunk_size: training points whose kernel columns are formed at once (bounds memory).
    """

    def __init__(
        self,
        n_components: int = 1000,
        gamma: float | None = None,
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
        self.gamma_ = float(self.gamma) if self.gamma is not None else 0.05 / n
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
