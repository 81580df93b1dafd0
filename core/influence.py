"""Influence of training points on test predictions: one engine over a small protocol.

One convention everywhere (docs/architecture.md):

    score(z_j, z_test)  ≈  ℓ(z_test, θ̂_{-j}) - ℓ(z_test, θ̂)

in units of test loss. Positive: removing z_j would raise the test loss, so z_j **helped** the
prediction. Negative: z_j **hurt** it.

:class:`InfluenceEngine` works for anything that implements :class:`TwiceDifferentiable` (the
training objective's Hessian-vector products, per-example loss gradients and their products with
vectors): the convex models of :mod:`core.models` and a network's objective
(:class:`core.networks.NetworkObjective`) alike. Three estimates of the same leave-one-out change:

- ``"margin"`` (default) — exact in the margin. For the convex models the test loss depends on θ
  only through the test point's outputs s = Wᵀφ_test (the margin, or the C logits). The
  Newton-corrected parameter change predicts their change Δs_j; this estimate evaluates the loss
  there, ℓ(s + Δs_j) - ℓ(s), instead of linearising it. It matters where the loss is curved on
  the scale of Δs_j: a confidently classified test point under the smooth hinge, whose loss is
  nearly exponential in the margin. Costs C inverse-Hessian solves per test point (one for
  binary models, as the linear estimates).
- ``"corrected"`` — the same Newton-corrected parameter change, with the test loss linearised:
  (1/n) ∇ℓ(z_test)ᵀ H_{-j}⁻¹ ∇ℓ(z_j), H_{-j} = H - (1/n)∇²ℓ(z_j), through a Woodbury update. For
  binary models (rank-one per-example Hessians) it is the first-order score divided by
  (1 - h_j), h_j = (1/n) c_j φ_jᵀH⁻¹φ_j the leverage.
- ``"first_order"`` — the paper's, (1/n) ∇ℓ(z_test)ᵀ H⁻¹ ∇ℓ(z_j) with the Hessian H of the full
  training objective (Koh & Liang's -I_up,loss/n). Every model.

The first two are capabilities of models whose per-example Hessians factor through fixed features
(:class:`ExampleCurvature`: the convex models); a network's objective gets the first order only.

The inverse-Hessian solver is the only thing that varies (``ExactSolver``, ``CGSolver``,
``LiSSASolver``, chosen by one :class:`SolverConfig`); everything else is built on
``inverse_hvp``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from core.errors import (
    ConvergenceError,
    InfluenceExplorerError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from core.linalg import (
    DTYPE,
    Spectrum,
    cholesky_solve,
    conjugate_gradient,
    lanczos_spectrum,
    quadratic_forms,
    spectrum_from_hessian,
)
from core.losses import Loss, LossDerivatives
from core.models import LinearModel, as_float64, as_labels

Estimate = Literal["margin", "corrected", "first_order"]
#: Every estimate, the default first.
ESTIMATES: tuple[str, ...] = ("margin", "corrected", "first_order")
#: Estimates that linearise the test loss: score = ∇ℓ(z_test)ᵀ (predicted parameter change).
LINEAR_ESTIMATES: tuple[str, ...] = ("corrected", "first_order")

SOLVERS: tuple[str, ...] = ("exact", "cg", "lissa")


class LiSSAWarning(UserWarning):
    """LiSSA's recursion is too short to have converged for the given scale."""


class DampingWarning(UserWarning):
    """The damping is so large that it, not the model's curvature, sets the scores."""


#: Damping above this multiple of the Hessian's trace is reported (``DampingWarning``).
DAMPING_SWAMPS = 1e6


@dataclass(frozen=True)
class SolverConfig:
    """How to apply (H + δI)⁻¹, for the convex models and networks alike. Frozen, so it can key
    a cache.

    Attributes:
        method: "exact" (Cholesky, factorised once), "cg" (conjugate gradients) or "lissa".
        damping: δ added to the Hessian's diagonal by every method.
        damping_margin: for Hessians that may be indefinite (a network's at the end of
            training): when set, the damping is raised by max(0, -λ_min) + damping_margin, with
            λ_min the Hessian's smallest eigenvalue (exact from the dense Hessian for "exact",
            else Lanczos), so H + δI has smallest eigenvalue about ``damping_margin`` or more.
            ``None`` (the convex models) adds nothing.
        lanczos_iterations: Krylov steps for λ_min when ``damping_margin`` is set and the dense
            Hessian is not formed.
        cg_tol: CG stops when every residual is below cg_tol times its right-hand side's norm.
        cg_max_iter: CG iterations before it gives up with an error.
        lissa_depth: LiSSA recursion length.
        lissa_scale: LiSSA divides the Hessian by this; it must exceed the largest eigenvalue.
            ``None`` estimates it (2x the largest eigenvalue of H + damping, by power iteration).
        lissa_repeats: independent LiSSA runs averaged.
        lissa_batch_size: training points per stochastic Hessian-vector product.
        seed: LiSSA's minibatch sampling and Lanczos' start vector seed.
    """

    method: str = "exact"
    damping: float = 0.0
    damping_margin: float | None = None
    lanczos_iterations: int = 80
    cg_tol: float = 1e-10
    cg_max_iter: int = 2000
    lissa_depth: int = 2000
    lissa_scale: float | None = None
    lissa_repeats: int = 1
    lissa_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise InfluenceExplorerError(
                f"method must be one of {', '.join(SOLVERS)}; got {self.method!r}."
            )
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise InfluenceExplorerError(
                f"damping must be a finite number >= 0; got {self.damping!r}."
            )
        if self.damping_margin is not None and not (
            math.isfinite(self.damping_margin) and self.damping_margin > 0
        ):
            raise InfluenceExplorerError(
                f"damping_margin must be a finite number > 0 or None; got {self.damping_margin!r}."
            )
        if not (0 < self.cg_tol < 1):
            raise InfluenceExplorerError(f"cg_tol must be in (0, 1); got {self.cg_tol!r}.")
        for name in (
            "cg_max_iter",
            "lissa_depth",
            "lissa_repeats",
            "lissa_batch_size",
            "lanczos_iterations",
        ):
            if int(getattr(self, name)) < 1:
                raise InfluenceExplorerError(f"{name} must be >= 1; got {getattr(self, name)!r}.")
        if self.lissa_scale is not None and not (self.lissa_scale > 0):
            raise InfluenceExplorerError(
                f"lissa_scale must be > 0 or None; got {self.lissa_scale!r}."
            )


class TwiceDifferentiable(Protocol):
    """What the engine and its solvers need from a fitted training objective.

    R(θ) = (1/n) Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖² at its (approximate) minimiser θ̂. Implemented by
    the convex models (:class:`core.models.LinearModel`) and by a network's objective
    (:class:`core.networks.NetworkObjective`).

    - ``hessian()``: the exact (p, p) ∇²R(θ̂), a copy the caller may modify (only the exact
      solver and the damping margin call it);
    - ``hvp(vectors, indices=None)``: ∇²R(θ̂) v for (p,) or (p, k) vectors, or with ``indices``
      the minibatch mean of the data term (what LiSSA uses); λ v is always added exactly;
    - ``loss_gradients(inputs, labels)``: (m, p) ∇_θ ℓ(z, θ̂) for inputs in the objective's
      input space (what :meth:`InfluenceEngine.influence_scores` is given);
    - ``training_gradient_products(vectors)``: (k, n) ∇ℓ(z_j, θ̂)ᵀ v for (p, k) vectors and every
      training point j (a model may do this without forming the (n, p) gradient matrix);
    - ``l2``: the weight decay λ included in the Hessian.
    """

    l2: float

    @property
    def n_train_(self) -> int: ...

    @property
    def n_params_(self) -> int: ...

    def hessian(self) -> torch.Tensor: ...

    def hvp(self, vectors: Any, indices: Any | None = None) -> torch.Tensor: ...

    def loss_gradients(self, inputs: Any, labels: Any) -> torch.Tensor: ...

    def training_gradient_products(self, vectors: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ExampleCurvature(Protocol):
    """Objectives whose per-example derivatives factor through fixed features φ (n, d):

        ∇ℓ(z_j) = φ_j ⊗ r_j,   ∇²ℓ(z_j) = (φ_j ⊗ B_j)(φ_j ⊗ B_j)ᵀ,

    with r_j = ``training_derivatives().d1[j]`` (C,) and B_j = ``factor[j]`` (C, r), parameters
    laid out θ[k·C + c] = W[k, c]. This is what the Newton-corrected estimate needs: H_{-j} is a
    rank-r update of H, inverted by Woodbury with a C x C form per point, never a p x p matrix.
    The exact-in-the-margin estimate also needs the test point's features (``transform``), its
    outputs s = Wᵀφ (``scores``) and the loss as a function of them (``loss_``).
    The convex models implement it; a whole network's objective does not.
    """

    features_: torch.Tensor
    labels_: torch.Tensor
    n_outputs_: int
    loss_: Loss

    def training_derivatives(self) -> LossDerivatives: ...

    def transform(self, X: Any) -> torch.Tensor: ...

    def scores(self, features: Any) -> torch.Tensor: ...


class InverseHVPSolver(ABC):
    """Applies (H + damping·I)⁻¹ to vectors, H the Hessian of the model's training objective."""

    def __init__(self, model: TwiceDifferentiable, damping: float = 0.0) -> None:
        _ = model.n_params_  # raises NotFittedError for an unfitted model
        self.model = model
        self.damping = float(damping)
        self._convergence_warnings: list[str] = []
        #: What make_solver measured to choose the damping (``damping_margin``), else None.
        self.spectrum: Spectrum | None = None

    @property
    def convergence_warnings(self) -> tuple[str, ...]:
        """Why results of this solver may be inaccurate even though it raised nothing (e.g. a
        LiSSA recursion too short to have converged), each with what to change; empty if none.

        Also issued as Python warnings; kept here so that a front end which builds the solver in
        another thread (the dashboard) can still show them to the user.
        """
        return tuple(self._convergence_warnings)

    @abstractmethod
    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """(H + damping·I)⁻¹ v for each column. Args: (p,) or (p, k). Returns: same shape."""

    def _check_damping(self, trace: float, n_params: int) -> None:
        """Warn when the damping swamps the curvature it is added to.

        For a positive semi-definite H the trace bounds the largest eigenvalue. A damping of a
        million times the trace makes (H + δI)⁻¹ equal to I/δ to six digits: the scores shrink
        with δ (1e300 gives scores near 1e-304) and describe the damping, not the model. Damping
        a few hundred times a nearly zero Hessian is how a singular one is fixed, so that is not
        warned about.
        """
        if self.damping <= 0 or not math.isfinite(trace) or trace <= 0:
            return
        if self.damping > DAMPING_SWAMPS * trace:
            message = (
                f"damping {self.damping:.3g} is more than {DAMPING_SWAMPS:.0e} times the "
                f"Hessian's trace ({trace:.3g}), which bounds its largest eigenvalue: every "
                "score is then shrunk by about the damping and says more about it than about "
                f"the model. Damping that makes sense is 0 to about the trace ({trace:.3g}); "
                "more only makes the scores smaller."
            )
            self._convergence_warnings.append(message)
            warnings.warn(message, DampingWarning, stacklevel=3)

    def _damped_hvp(
        self, vectors: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.hvp(vectors, indices) + self.damping * vectors


class ExactSolver(InverseHVPSolver):
    """Cholesky factorisation of H + damping·I, computed once and reused for every query.

    Args:
        hessian: the model's Hessian if the caller already has it (it is modified in place).
    """

    def __init__(
        self,
        model: TwiceDifferentiable,
        damping: float = 0.0,
        *,
        hessian: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, damping)
        hessian = model.hessian() if hessian is None else hessian
        self._check_damping(float(hessian.diagonal().sum()), int(hessian.shape[0]))
        hessian.diagonal().add_(self.damping)
        chol, info = torch.linalg.cholesky_ex(hessian)
        if int(info) != 0 or not torch.isfinite(chol).all():
            smallest = float(torch.linalg.eigvalsh(hessian)[0])
            suggestion = max(1e-6, 1.1 * abs(smallest) + 1e-6)
            raise NotPositiveDefiniteError(
                f"The Hessian plus damping {self.damping:g} is not positive definite (smallest "
                f"eigenvalue {smallest:.3g}). Add damping of at least {suggestion:.2g}, or increase "
                "the model's l2, and try again.",
                # Damping adds to every eigenvalue, so this total makes the smallest positive.
                suggested_damping=self.damping + suggestion,
            )
        self.cholesky = chol

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        return cholesky_solve(self.cholesky, as_float64(vectors))


class CGSolver(InverseHVPSolver):
    """Conjugate gradients on exact Hessian-vector products, all columns at once."""

    def __init__(
        self,
        model: TwiceDifferentiable,
        damping: float = 0.0,
        tol: float = 1e-10,
        max_iter: int = 2000,
    ) -> None:
        super().__init__(model, damping)
        self.tol = tol
        self.max_iter = max_iter
        self.last_iterations = 0

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        run = conjugate_gradient(
            self._damped_hvp, as_float64(vectors), rtol=self.tol, max_iter=self.max_iter
        )
        self.last_iterations = run.iterations
        if run.nonpositive_curvature:
            raise NotPositiveDefiniteError(
                "Conjugate gradients met a direction of (numerically) non-positive curvature: the "
                f"Hessian plus damping {self.damping:g} is not positive definite. Add damping or "
                "increase the model's l2."
            )
        if not run.converged:
            worst = float(run.relative_residuals.max())
            raise ConvergenceError(
                f"Conjugate gradients did not converge in {self.max_iter} iterations (worst "
                f"relative residual {worst:.2g}, tolerance {self.tol:g}). Increase cg_max_iter, "
                "add damping, or use the exact solver."
            )
        return run.solution


class LiSSASolver(InverseHVPSolver):
    """Stochastic Neumann-series estimate (Agarwal et al. 2017; Koh & Liang 2017).

    h_0 = v,  h_t = v + h_{t-1} - (H̃_t + damping·I) h_{t-1} / scale,  result h_T / scale,

    with H̃_t the Hessian of a random minibatch. Its fixed point is scale·(H + damping·I)⁻¹ v, so the
    damping means the same as for the other solvers. It converges only when ``scale`` exceeds the
    largest eigenvalue, and slowly: the error shrinks like (1 - λ_min/scale)^depth.
    """

    def __init__(
        self,
        model: TwiceDifferentiable,
        damping: float = 0.0,
        depth: int = 2000,
        scale: float | None = None,
        repeats: int = 1,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(model, damping)
        self.depth = depth
        self.repeats = repeats
        self.batch_size = min(batch_size, model.n_train_)
        self.seed = seed
        self.largest_eigenvalue = self._largest_eigenvalue()
        self.scale = float(scale) if scale is not None else 2.0 * self.largest_eigenvalue
        if self.scale <= self.largest_eigenvalue:
            raise SolverDivergedError(
                f"LiSSA cannot converge with scale {self.scale:.3g}: it must exceed the largest "
                f"eigenvalue of the damped Hessian, about {self.largest_eigenvalue:.3g}. Increase "
                "lissa_scale (or leave it empty to choose it automatically)."
            )
        # Per direction with eigenvalue μ the recursion contracts by |1 - μ/scale|; μ ranges
        # from at least l2 + damping up to the largest eigenvalue.
        smallest = model.l2 + self.damping
        rate = max(abs(1 - smallest / self.scale), abs(1 - self.largest_eigenvalue / self.scale))
        if rate >= 1:
            raise SolverDivergedError(
                f"LiSSA cannot converge with scale {self.scale:.3g} and damping {self.damping:g}: "
                "the scale must exceed the damped Hessian's eigenvalues (between "
                f"{smallest:.3g} and {self.largest_eigenvalue:.3g}). Increase lissa_scale."
            )
        if rate**depth > 1e-2:
            needed = math.ceil(math.log(1e-2) / math.log(rate))
            message = (
                f"LiSSA with scale {self.scale:.3g} and depth {depth} cannot have converged: the "
                f"slowest direction (eigenvalue >= {smallest:.3g}) needs a depth of about {needed}. "
                "Increase lissa_depth or damping, or use the exact or CG solver."
            )
            self._convergence_warnings.append(message)
            warnings.warn(message, LiSSAWarning, stacklevel=2)

    def _largest_eigenvalue(self, iterations: int = 50) -> float:
        generator = torch.Generator().manual_seed(self.seed + 7919)
        v = torch.randn(self.model.n_params_, generator=generator, dtype=DTYPE)
        v /= v.norm()
        value = 0.0
        for _ in range(iterations):
            w = self._damped_hvp(v)
            value = float(v @ w)
            v = w / w.norm()
        return value

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        v = as_float64(vectors)
        n = self.model.n_train_
        bound = (
            1e6
            * self.scale
            * max(float(v.norm()), 1e-300)
            / max(self.model.l2 + self.damping, 1e-12)
        )
        total = torch.zeros_like(v)
        for repeat in range(self.repeats):
            generator = torch.Generator().manual_seed(self.seed + repeat)
            h = v.clone()
            for step in range(self.depth):
                batch = torch.randint(0, n, (self.batch_size,), generator=generator)
                h = v + h - self._damped_hvp(h, batch) / self.scale
                if step % 50 == 0 and not (torch.isfinite(h).all() and float(h.norm()) < bound):
                    raise SolverDivergedError(
                        f"LiSSA diverged at step {step} (norm {float(h.norm()):.3g}). Its scale "
                        f"({self.scale:.3g}) must exceed the Hessian's largest eigenvalue "
                        f"(about {self.largest_eigenvalue:.3g} for the full Hessian; minibatches "
                        "can be larger): increase lissa_scale or lissa_batch_size, or add damping."
                    )
            # The check above runs every 50 steps; a blow-up in the last few must not slip out.
            if not torch.isfinite(h).all():
                raise SolverDivergedError(
                    f"LiSSA diverged in its last steps (non-finite values). Its scale "
                    f"({self.scale:.3g}) must exceed the Hessian's largest eigenvalue: increase "
                    "lissa_scale or lissa_batch_size, or add damping."
                )
            total += h / self.scale
        return total / self.repeats


def make_solver(model: TwiceDifferentiable, config: SolverConfig) -> InverseHVPSolver:
    """The solver a :class:`SolverConfig` describes, for a fitted model.

    With ``config.damping_margin`` the damping is first raised so that H + δI is positive
    definite (see :class:`SolverConfig`); the measured spectrum is kept on ``solver.spectrum``.
    """
    damping = config.damping
    hessian = None
    spectrum = None
    if config.damping_margin is not None:
        if config.method == "exact":
            hessian = model.hessian()
            spectrum = spectrum_from_hessian(hessian)
        else:
            spectrum = lanczos_spectrum(
                model.hvp, model.n_params_, config.lanczos_iterations, seed=config.seed
            )
        damping += max(0.0, -spectrum.smallest) + config.damping_margin
    if config.method == "exact":
        solver: InverseHVPSolver = ExactSolver(model, damping, hessian=hessian)
    elif config.method == "cg":
        solver = CGSolver(model, damping, config.cg_tol, config.cg_max_iter)
    else:
        solver = LiSSASolver(
            model,
            damping,
            depth=config.lissa_depth,
            scale=config.lissa_scale,
            repeats=config.lissa_repeats,
            batch_size=config.lissa_batch_size,
            seed=config.seed,
        )
    solver.spectrum = spectrum
    return solver


def with_damping(config: SolverConfig, damping: float) -> SolverConfig:
    """``config`` with a fixed damping (and no margin to add on top)."""
    return replace(config, damping=float(damping), damping_margin=None)


@dataclass(frozen=True)
class TopK:
    """The most helpful (largest positive scores) and most harmful (most negative) training points.

    Indices are into the training set; scores follow the one sign convention (positive helped).
    """

    helpful: np.ndarray
    helpful_scores: np.ndarray
    harmful: np.ndarray
    harmful_scores: np.ndarray


def _check_row(scores: Any, k: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise InfluenceExplorerError("top_k takes the scores of one test point, shape (n_train,).")
    if k < 1:
        raise InfluenceExplorerError(f"k must be >= 1; got {k}.")
    return scores


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    # Stable order: among equal values the lower training index comes first, so lists are
    # reproducible across runs and machines.
    return np.argsort(-values, kind="stable")[:k]


def top_k(scores: np.ndarray, k: int) -> TopK:
    """Top-k helpful and harmful points of one row of scores.

    Only points with a strictly positive (helpful) or strictly negative (harmful) score are
    listed, so fewer than k may come back.

    Args:
        scores: (n_train,) influence scores for one test point.
        k: how many of each.
    """
    scores = _check_row(scores, k)
    helpful = _largest(scores, k)
    helpful = helpful[scores[helpful] > 0]
    harmful = _largest(-scores, k)
    harmful = harmful[scores[harmful] < 0]
    return TopK(helpful, scores[helpful], harmful, scores[harmful])


def top_k_by_magnitude(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |scores| (helpful or harmful), largest first: the points a
    leave-one-out check retrains. Returns: (min(k, n_train),)."""
    scores = _check_row(scores, k)
    return _largest(np.abs(scores), k)


def _parameter_estimate(estimate: str) -> str:
    """The parameter change an estimate uses: the exact-in-the-margin one uses the corrected."""
    return "corrected" if estimate == "margin" else estimate


def loss_change(
    loss: Loss, scores: torch.Tensor, changes: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """ℓ(s + Δs) - ℓ(s) for k output changes of each of m points: the loss's own
    :meth:`~core.losses.Loss.value_change`, accurate also when the change is far below the loss.

    Args:
        loss: the model's loss of its outputs.
        scores: (m, C) outputs s at θ̂.
        changes: (m, k, C) output changes Δs.
        labels: (m,) labels whose loss is evaluated.
    Returns:
        (m, k) loss changes.
    """
    if changes.ndim != 3 or scores.shape != (changes.shape[0], changes.shape[2]):
        raise InfluenceExplorerError(
            f"changes must be (m, k, C) for (m, C) scores; got {tuple(changes.shape)} and "
            f"{tuple(scores.shape)}."
        )
    return loss.value_change(scores, changes, labels.reshape(-1))


class InfluenceEngine:
    """Influence of every training point of a fitted objective on test losses.

    Args:
        model: anything implementing :class:`TwiceDifferentiable` (a fitted convex model, a
            network's objective). Models that also implement :class:`ExampleCurvature` get the
            exact-in-the-margin and Newton-corrected estimates, self-influence, leverages,
            parameter and output changes.
        solver: a :class:`SolverConfig` (default: exact) or a ready solver.
    """

    def __init__(
        self,
        model: TwiceDifferentiable,
        solver: SolverConfig | InverseHVPSolver | None = None,
    ) -> None:
        _ = model.n_params_  # raises NotFittedError for an unfitted model
        self.model = model
        if isinstance(solver, InverseHVPSolver):
            self.solver = solver
        else:
            self.solver = make_solver(model, solver if solver is not None else SolverConfig())
        self.n_train = model.n_train_
        self.structured = isinstance(model, ExampleCurvature)
        self._train_derivs = model.training_derivatives() if self.structured else None
        self._effective_residuals: dict[str, torch.Tensor] = {}
        if self._train_derivs is not None:
            self._effective_residuals["first_order"] = self._train_derivs.d1
        self._self_influence: dict[str, np.ndarray] = {}

    @property
    def estimates(self) -> tuple[str, ...]:
        """The estimates this model supports, default first."""
        return ESTIMATES if self.structured else ("first_order",)

    @property
    def default_estimate(self) -> str:
        return self.estimates[0]

    @property
    def preconditioner(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The factorised (H + damping)⁻¹ at θ̂ when the solver has one (exact), to precondition
        retraining near θ̂ (see :meth:`core.models.LinearModel.refit`); else None."""
        return self.solver.inverse_hvp if isinstance(self.solver, ExactSolver) else None

    # ----------------------------------------------------------------- building blocks
    def test_gradients(self, X_test: Any, y_test: Any) -> torch.Tensor:
        """∇_θ ℓ(z_test, θ̂). Returns: (m, p)."""
        return self.model.loss_gradients(X_test, y_test)

    def inverse_hvp_test(self, X_test: Any, y_test: Any) -> torch.Tensor:
        """s_test = (H + damping)⁻¹ ∇ℓ(z_test), one batched solve. Returns: (m, p)."""
        gradients = self.test_gradients(X_test, y_test)
        return self.solver.inverse_hvp(gradients.T).T

    def _check_estimate(self, estimate: str) -> None:
        if estimate not in ESTIMATES:
            raise InfluenceExplorerError(
                f"estimate must be one of {', '.join(ESTIMATES)}; got {estimate!r}."
            )
        if estimate not in self.estimates:
            raise InfluenceExplorerError(
                f"The {estimate!r} estimate needs per-example Hessian factors through fixed "
                f"features, which {type(self.model).__name__} does not provide; use "
                "estimate='first_order'."
            )

    def _require_structured(self, what: str) -> LossDerivatives:
        if self._train_derivs is None:
            raise InfluenceExplorerError(
                f"{what} needs per-example Hessian factors through fixed features, which "
                f"{type(self.model).__name__} does not provide."
            )
        return self._train_derivs

    def _unit_quadratic_forms(self, chunk: int = 256) -> torch.Tensor:
        """Q_j = (φ_j ⊗ I_C)ᵀ H⁻¹ (φ_j ⊗ I_C) for every training point. Returns: (n, C, C).

        With S = (H + δI)⁻¹ and S_ab its (a, b) block of d x d (θ[k·C + c] = W[k, c]),
        Q_j[a, b] = φ_jᵀ S_ab φ_j: for each of the C(C+1)/2 pairs a <= b (Q_j is symmetric) one
        batch of quadratic forms over all training points from the lower triangle of S_ab's
        symmetric part (:func:`core.linalg.quadratic_forms`), about n·d²·C(C+1)/2 flops in GEMMs,
        after forming S once from the exact solver's Cholesky factor (2p³/3). Solving for the
        n·C columns φ_j ⊗ e_a instead costs 2p²·n·C, about 4n/d times more, and is kept only for
        solvers without a factor when p > n·C. No p x p matrix per point is ever formed.
        """
        features = self.model.features_
        n, d = features.shape
        c = self.model.n_outputs_
        if isinstance(self.solver, ExactSolver) or d <= n:
            inverse = self._inverse_hessian(chunk)
            blocks = inverse.view(d, c, d, c)
            out = torch.empty(n, c, c, dtype=DTYPE)
            for a in range(c):
                for b in range(a, c):
                    block = blocks[:, a, :, b]
                    forms = quadratic_forms(features, 0.5 * (block + block.T))
                    out[:, a, b] = forms
                    out[:, b, a] = forms
            return out
        eye = torch.eye(c, dtype=DTYPE)
        out = torch.empty(n, c, c, dtype=DTYPE)
        for start in range(0, n, chunk):
            phi = features[start : start + chunk]
            # Columns φ_j ⊗ e_a for the chunk, laid out (p, j, a).
            rhs = (phi[:, :, None, None] * eye[None, None, :, :]).reshape(len(phi), d * c, c)
            rhs = rhs.permute(1, 0, 2).reshape(d * c, len(phi) * c)
            solved = self.solver.inverse_hvp(rhs).reshape(d, c, len(phi), c)
            out[start : start + chunk] = torch.einsum("jd,dajb->jab", phi, solved)
        return out

    def _inverse_hessian(self, chunk: int) -> torch.Tensor:
        """S = (H + δI)⁻¹ (p, p): from the Cholesky factor, else one solve per unit vector."""
        if isinstance(self.solver, ExactSolver):
            return torch.cholesky_inverse(self.solver.cholesky)
        p = self.model.n_params_
        inverse = torch.empty(p, p, dtype=DTYPE)
        for start in range(0, p, chunk):
            stop = min(start + chunk, p)
            unit = torch.zeros(p, stop - start, dtype=DTYPE)
            unit[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
            inverse[:, start:stop] = self.solver.inverse_hvp(unit)
        return inverse

    def _residuals(self, estimate: str) -> torch.Tensor:
        """Per-example residuals e_j such that the score is (1/n) s_testᵀ (φ_j ⊗ e_j). (n, C)."""
        self._check_estimate(estimate)
        if estimate not in self._effective_residuals:
            n = self.n_train
            derivs = self._require_structured("The Newton-corrected estimate")
            d1, factor = derivs.d1, derivs.factor
            q = self._unit_quadratic_forms()
            # Woodbury with U_j = φ_j ⊗ B_j: (1/n) g_tᵀ H_{-j}⁻¹ g_j = (1/n) s_tᵀ (φ_j ⊗ e_j),
            # e_j = d1_j + B_j (nI - B_jᵀQ_jB_j)⁻¹ B_jᵀ Q_j d1_j.
            m = factor.transpose(1, 2) @ q @ factor
            rhs = factor.transpose(1, 2) @ q @ d1[:, :, None]
            eye = torch.eye(m.shape[-1], dtype=DTYPE)
            z = torch.linalg.solve(n * eye - m, rhs)
            self._effective_residuals[estimate] = d1 + (factor @ z)[:, :, 0]
            self._quadratic_forms = q
        return self._effective_residuals[estimate]

    # ----------------------------------------------------------------- quantities
    def influence_scores(
        self, X_test: Any, y_test: Any, *, estimate: Estimate | None = None
    ) -> np.ndarray:
        """Influence of every training point on each test point's loss.

        score[t, j] ≈ ℓ(z_test_t, θ̂_{-j}) - ℓ(z_test_t, θ̂): positive means z_j helped (removing
        it raises the test loss), negative means it hurt.

        Args:
            X_test: (m, D) test inputs in the model's input space.
            y_test: (m,) labels whose loss is explained (usually the predicted or true label).
            estimate: one of :attr:`estimates`; ``None`` is :attr:`default_estimate` ("margin"
                for models with :class:`ExampleCurvature`, else "first_order").
        Returns:
            (m, n_train) scores in units of test loss.
        """
        estimate = self.default_estimate if estimate is None else estimate
        return self.score_estimates(X_test, y_test, (estimate,))[estimate]

    def score_estimates(
        self, X_test: Any, y_test: Any, estimates: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Several estimates of the same scores at once, sharing the inverse-Hessian solves.

        Args:
            X_test: (m, D) test inputs; y_test: (m,) labels whose loss is explained.
            estimates: which (default: all of :attr:`estimates`).
        Returns:
            estimate -> (m, n_train) scores.
        """
        estimates = self.estimates if estimates is None else tuple(estimates)
        for estimate in estimates:
            self._check_estimate(estimate)
        if "margin" not in estimates:
            s_test = self.inverse_hvp_test(X_test, y_test)
            return {e: self.scores_from_stest(s_test, estimate=e) for e in estimates}
        model = self.model
        features = model.transform(X_test)
        labels = as_labels(y_test).reshape(-1)
        outputs = model.scores(features)
        solves = self._unit_output_solves(features)
        out = {}
        linear = [e for e in estimates if e != "margin"]
        if linear:
            # ∇ℓ(z_test) = φ_test ⊗ ∂ℓ/∂s, so s_test is the same combination of the unit solves.
            d1 = model.loss_.derivatives(outputs, labels).d1
            s_test = torch.einsum("tc,tcp->tp", d1, solves)
            out.update({e: self.scores_from_stest(s_test, estimate=e) for e in linear})
        changes = self._output_changes(solves, "corrected")
        out["margin"] = loss_change(model.loss_, outputs, changes, labels).numpy()
        return {e: out[e] for e in estimates}

    def scores_from_stest(
        self, s_test: torch.Tensor, *, estimate: Estimate = "corrected"
    ) -> np.ndarray:
        """Linearised scores from precomputed s_test = (H + damping)⁻¹ ∇ℓ(z_test) (m, p). The one
        place a "corrected" or "first_order" score is formed. Returns: (m, n_train)."""
        self._check_estimate(estimate)
        if estimate not in LINEAR_ESTIMATES:
            raise InfluenceExplorerError(
                f"The {estimate!r} estimate evaluates the test loss itself, so it needs the test "
                "inputs, not only s_test; use influence_scores or score_estimates."
            )
        if not self.structured:
            return (self.model.training_gradient_products(s_test.T) / self.n_train).numpy()
        residuals = self._residuals(estimate)
        features = self.model.features_
        d, c = features.shape[1], self.model.n_outputs_
        # (1/n) s_tᵀ (φ_j ⊗ e_j) = (1/n) Σ_c (φ_jᵀ S_t)[c] e_j[c], with S_t the (d, C) reshape.
        projected = torch.einsum("jd,tdc->tjc", features, s_test.reshape(-1, d, c))
        return ((projected * residuals[None]).sum(-1) / self.n_train).numpy()

    def _unit_output_solves(self, features: torch.Tensor) -> torch.Tensor:
        """(H + damping)⁻¹ (φ_t ⊗ e_c) for each test point's features and each output c, in one
        batched solve: how θ must move to change output c. Returns: (m, C, p)."""
        m, d = features.shape
        c = self.model.n_outputs_
        eye = torch.eye(c, dtype=DTYPE)
        # Column (t, c) is φ_t ⊗ e_c in the layout θ[k·C + a].
        rhs = (features[:, :, None, None] * eye[None, None, :, :]).reshape(m, d * c, c)
        solved = self.solver.inverse_hvp(rhs.permute(1, 0, 2).reshape(d * c, m * c))
        return solved.T.reshape(m, c, d * c)

    def _output_changes(self, solves: torch.Tensor, estimate: str) -> torch.Tensor:
        """Δs[t, j] = (φ_t ⊗ I_C)ᵀ Δθ_j, the predicted change of test point t's outputs when z_j
        is removed, from :meth:`_unit_output_solves`. Returns: (m, n_train, C)."""
        residuals = self._residuals(estimate)
        features = self.model.features_
        n, d = features.shape
        m, c = solves.shape[0], self.model.n_outputs_
        out = torch.empty(m, n, c, dtype=DTYPE)
        for t in range(m):
            # Δθ_j = (1/n) H⁻¹ (φ_j ⊗ e_j) (Woodbury folded into e_j), so output b changes by
            # (1/n) Σ_a (φ_jᵀ U_b)[a] e_j[a], U_b the (d, C) reshape of the solve for output b.
            units = solves[t].reshape(c, d, c).permute(1, 0, 2).reshape(d, c * c)
            projected = (features @ units).reshape(n, c, c)
            out[t] = (projected * residuals[:, None, :]).sum(-1) / n
        return out

    def predicted_output_changes(
        self, X_test: Any, *, estimate: Estimate = "corrected"
    ) -> np.ndarray:
        """Predicted change of each test point's outputs (its margin, or its C logits) when each
        training point is removed: (φ_test ⊗ I_C)ᵀ Δθ_j, with Δθ_j the first-order or the
        Newton-corrected parameter change ("margin" uses the corrected one).

        Every estimate is a function of these: the linear ones are ∇_s ℓ(z_test)ᵀ Δs_j, the
        exact-in-the-margin one ℓ(s + Δs_j) - ℓ(s). Returns: (m, n_train, C).
        """
        self._check_estimate(estimate)
        self._require_structured("Predicted output changes")
        features = self.model.transform(X_test)
        solves = self._unit_output_solves(features)
        return self._output_changes(solves, _parameter_estimate(estimate)).numpy()

    def self_influence(self, estimate: Estimate | None = None) -> np.ndarray:
        """Each training point's influence on its own loss (the diagonal of the score matrix):
        the predicted ℓ(z_j, θ̂_{-j}) - ℓ(z_j, θ̂).

        Large values flag points the model can only fit by bending towards them: candidates for
        mislabelled data. Returns: (n_train,).
        """
        estimate = self.default_estimate if estimate is None else estimate
        self._check_estimate(estimate)
        derivs = self._require_structured("Self-influence")
        if estimate not in self._self_influence:
            residuals = self._residuals("corrected")  # also computes the quadratic forms Q_j
            if estimate == "margin":
                # Point j's own outputs move by (1/n) Q_j e_j when it is removed.
                changes = torch.einsum("jab,jb->ja", self._quadratic_forms, residuals)
                model = self.model
                values = loss_change(
                    model.loss_,
                    model.scores(model.features_),
                    changes[:, None, :] / self.n_train,
                    model.labels_,
                )[:, 0]
                self._self_influence[estimate] = values.numpy()
            else:
                if estimate == "first_order":
                    residuals = derivs.d1
                values = torch.einsum("ja,jab,jb->j", derivs.d1, self._quadratic_forms, residuals)
                self._self_influence[estimate] = (values / self.n_train).numpy()
        return self._self_influence[estimate]

    def leverage(self) -> np.ndarray:
        """h_j = (1/n) tr(B_jᵀ Q_j B_j), the share of the curvature that point j carries.

        For binary models this is exactly the h_j of the correction score/(1 - h_j).
        Returns: (n_train,).
        """
        factor = self._require_structured("Leverage").factor
        self._residuals("corrected")
        m = factor.transpose(1, 2) @ self._quadratic_forms @ factor
        return (torch.diagonal(m, dim1=1, dim2=2).sum(-1) / self.n_train).numpy()

    def params_change(self, train_indices: Any, *, estimate: Estimate | None = None) -> np.ndarray:
        """I_up,params: predicted θ̂_{-j} - θ̂ for each listed training point.

        First order: (1/n) H⁻¹ ∇ℓ(z_j); corrected and margin: (1/n) H_{-j}⁻¹ ∇ℓ(z_j).
        Returns: (k, p).
        """
        estimate = self.default_estimate if estimate is None else estimate
        self._check_estimate(estimate)
        self._require_structured("Parameter changes")
        idx = torch.as_tensor(np.asarray(train_indices, dtype=np.int64))
        residuals = self._residuals(_parameter_estimate(estimate))[idx]
        phi = self.model.features_[idx]
        gradients = (phi[:, :, None] * residuals[:, None, :]).reshape(len(idx), -1)
        return (self.solver.inverse_hvp(gradients.T).T / self.n_train).numpy()

    def _linear_model(self, what: str) -> LinearModel:
        if not isinstance(self.model, LinearModel):
            raise InfluenceExplorerError(
                f"{what} is implemented for the convex models only; got {type(self.model).__name__}."
            )
        return self.model

    def training_inputs(self, train_indices: Any) -> torch.Tensor:
        """The model-space inputs x_j of training points (pixels for the SVM). Returns: (k, D)."""
        idx = torch.as_tensor(np.asarray(train_indices, dtype=np.int64))
        return self._linear_model("Training inputs").training_inputs_[idx]

    def perturbation_influence(
        self,
        X_test: Any,
        y_test: Any,
        train_indices: Any,
        *,
        train_inputs: Any | None = None,
    ) -> np.ndarray:
        """I_pert,loss: how each test loss of the *retrained* model changes as a training input moves.

        By the implicit function theorem, with s = H⁻¹ ∇_θ ℓ(z_test, θ̂) and R(θ; X) the training
        objective as a function of all training inputs X,

            d ℓ(z_test, θ̂(X)) / d x_j = ∂_{x_j} [ ℓ(z_test, θ̂; X) - sᵀ ∇_θ R(θ̂; X) ]   (s fixed).

        For the logistic regression only x_j's own features depend on x_j and this is the paper's
        -(1/n) sᵀ ∇_x ∇_θ ℓ(z_j, θ̂). For the kernel SVM x_j enters the whole kernel matrix, its
        Cholesky factor (every training point's features) and the test image's features; all of
        them are differentiated, so the result describes honestly refitting the SVM on the moved
        image. Moving x_j along the gradient raises the test loss. Per-pixel heatmaps for the
        feature model pull this back through the backbone.

        Args:
            X_test: (m, D_test) test inputs; y_test: (m,) labels.
            train_indices: (k,) training points.
            train_inputs: optional (k, D) current inputs of those points, if the model was
                refitted on moved versions of them (e.g. during an attack).
        Returns:
            (m, k, D) gradients in units of test loss per unit of the model's input.
        """
        model = self._linear_model("Perturbation influence")
        X_test = as_float64(X_test)
        labels = torch.as_tensor(np.asarray(y_test), dtype=torch.int64).reshape(-1)
        s_test = self.inverse_hvp_test(X_test, labels)
        idx = torch.as_tensor(np.asarray(train_indices, dtype=np.int64).reshape(-1))
        base = model.training_inputs_
        moved = base[idx] if train_inputs is None else as_float64(train_inputs)
        d, c, n = model.features_.shape[1], model.n_outputs_, model.n_train_
        out = torch.empty(X_test.shape[0], len(idx), base.shape[1], dtype=DTYPE)
        for t in range(X_test.shape[0]):
            x = moved.clone().requires_grad_(True)
            theta = model.theta_.clone().requires_grad_(True)
            with torch.enable_grad():
                inputs = base.index_put((idx,), x)
                train_features, test_features = model.torch_feature_maps(inputs, X_test[t : t + 1])
                losses = model.loss_.value(train_features @ theta.reshape(d, c), model.labels_)
                objective = (model.sample_weight_ @ losses) / n + 0.5 * model.l2 * (theta @ theta)
                (objective_gradient,) = torch.autograd.grad(objective, theta, create_graph=True)
                test_loss = model.loss_.value(
                    test_features @ theta.reshape(d, c), labels[t : t + 1]
                )
                target = test_loss[0] - s_test[t] @ objective_gradient
                (out[t],) = torch.autograd.grad(target, x)
        return out.numpy()
