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
    STRIP,
    Spectrum,
    StageLog,
    cholesky,
    cholesky_inverse,
    cholesky_solve,
    conjugate_gradient,
    lanczos_spectrum,
    quadratic_forms,
    row_gram,
    spectrum_from_hessian,
    t_times,
    times_thin,
)
from core.losses import Loss, LossDerivatives
from core.models import (
    LinearModel,
    as_float64,
    as_labels,
    has_class_basis,
    solve_in_class_basis,
)

Estimate = Literal["margin", "corrected", "first_order"]
#: Every estimate, the default first.
ESTIMATES: tuple[str, ...] = ("margin", "corrected", "first_order")
#: Estimates that linearise the test loss: score = ∇ℓ(z_test)ᵀ (predicted parameter change).
LINEAR_ESTIMATES: tuple[str, ...] = ("corrected", "first_order")

SOLVERS: tuple[str, ...] = ("exact", "cg", "lissa")
#: How the exact solver factorises (``SolverConfig.exact_form``): "auto" takes the dual form when
#: it applies and costs fewer flops, else the primal.
EXACT_FORMS: tuple[str, ...] = ("auto", "primal", "dual")


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
        exact_form: the exact solver's factorisation: "auto" (default: the dual, n·r x n·r, when
            the data term has lower rank than the parameters and that costs fewer flops, else
            the primal p x p), "primal" or "dual" (see :class:`ExactSolver`).
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
    exact_form: str = "auto"

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
        if self.exact_form not in EXACT_FORMS:
            raise InfluenceExplorerError(
                f"exact_form must be one of {', '.join(EXACT_FORMS)}; got {self.exact_form!r}."
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


def unit_columns(features: torch.Tensor, columns: int) -> torch.Tensor:
    """The vectors φ_t ⊗ e_c for each row φ_t of ``features`` (m, d) and each of ``columns``
    class columns, in the parameters' layout θ[k·columns + c]. Returns: (d·columns, m·columns),
    column t·columns + c (``features.T`` itself for one column)."""
    m, d = features.shape
    if columns == 1:
        return features.T
    eye = torch.eye(columns, dtype=DTYPE)
    rhs = (features[:, :, None, None] * eye[None, None, :, :]).reshape(m, d * columns, columns)
    return rhs.permute(1, 0, 2).reshape(d * columns, m * columns)


def inverse_times_units(
    inverse: torch.Tensor, features: torch.Tensor, columns: int
) -> torch.Tensor:
    """S (φ_t ⊗ e_c) for a symmetric S (d·columns square) and the vectors of
    :func:`unit_columns`, read from S instead of solved with a factor: entry (i, t·columns + c)
    is Σ_k S[i, k·columns + c] φ_t[k], so each row of S, viewed as a d x columns block, is
    multiplied by the test features; one pass over S in blocks of :data:`INVERSE_ROWS` rows.
    It does 1/columns of the solves' flops: for S of 11,520 square (ten classes of 1280-d
    features), one test point took 0.027 s against 0.178 s for the two triangular solves of
    the same columns, and 1 to 128 points at once 2.0-6.7x less (2 cores, load 1.2-1.7;
    ``python -m bench.unit_solves``), the same columns to 7e-15.
    Returns: (d·columns, m·columns), as the solve of :func:`unit_columns` would."""
    m, d = features.shape
    size = inverse.shape[0]
    rows = inverse.view(size, d, columns)
    out = torch.empty(size, m, columns, dtype=inverse.dtype)
    for start in range(0, size, INVERSE_ROWS):
        stop = min(start + INVERSE_ROWS, size)
        torch.matmul(features, rows[start:stop], out=out[start:stop])
    return out.reshape(size, m * columns)


def block_quadratic_forms(features: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Q_j[a, b] = φ_jᵀ S_ab φ_j for every training point, from S's d x d blocks.

    Args:
        features: (n, d) training features φ_j.
        blocks: (d, C, d, C) a symmetric p x p matrix S viewed as blocks (θ[k·C + c] = W[k, c]).

    Returns:
        (n, C, C) symmetric: one batch of quadratic forms per pair a <= b, each over the lower
        triangle of S_ab's symmetric part (:func:`core.linalg.quadratic_forms`).
    """
    n, c = features.shape[0], blocks.shape[1]
    out = torch.empty(n, c, c, dtype=DTYPE)
    for a in range(c):
        for b in range(a, c):
            block = blocks[:, a, :, b]
            forms = quadratic_forms(features, 0.5 * (block + block.T))
            out[:, a, b] = forms
            out[:, b, a] = forms
    return out


def forms_in_class_basis(
    inner: torch.Tensor, features: torch.Tensor, rotation: torch.Tensor, lam: float
) -> torch.Tensor:
    """Q_j = Q F_j Qᵀ from the forms in the class basis: with S' = (H' + δI)⁻¹ (the first C - 1
    class columns), F_j = blockdiag(φ_jᵀS'_efφ_j, ‖φ_j‖²/λ').

    Args:
        inner: (n, C - 1, C - 1) φ_jᵀS'_efφ_j (:func:`block_quadratic_forms` of S').
        features: (n, d) the same rows φ_j.
        rotation: (C, C) the class basis Q (:func:`core.models.class_rotation`).
        lam: λ' = λ + δ, the curvature along the all-ones class direction.
    Returns:
        (n, C, C).
    """
    c = rotation.shape[0]
    forms = torch.zeros(features.shape[0], c, c, dtype=DTYPE)
    forms[:, :-1, :-1] = inner
    forms[:, -1, -1] = (features * features).sum(1) / lam
    return rotation @ forms @ rotation.T


@dataclass(frozen=True)
class SolveOperator:
    """(H + δI)⁻¹ applied to (p,) or (p, k) vectors (:meth:`ExactSolver.operator`): two
    triangular solves with the lower Cholesky factor of H + δI, or (with a ``rotation``) the
    class basis's solve with its factor or its inverse S'
    (:func:`core.models.solve_in_class_basis`)."""

    factor: torch.Tensor | None
    rotation: torch.Tensor | None = None
    lam: float = 0.0
    inverse: torch.Tensor | None = None

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        columns = vectors[:, None] if vectors.ndim == 1 else vectors
        if self.rotation is None:
            assert self.factor is not None
            solved = cholesky_solve(self.factor, columns)
        else:
            solved = solve_in_class_basis(
                self.factor, self.rotation, self.lam, columns, inverse=self.inverse
            )
        return solved[:, 0] if vectors.ndim == 1 else solved


@dataclass(frozen=True)
class InverseForms:
    """An inverse Hessian to form per-point quadratic forms from
    (:meth:`ExactSolver.inverse_for_forms`): S' = (H' + δI)⁻¹ in the class basis with its
    rotation Q and λ', or (rotation None) the whole S = (H + δI)⁻¹."""

    inverse: torch.Tensor
    rotation: torch.Tensor | None
    lam: float

    def forms(self, features: torch.Tensor) -> torch.Tensor:
        """Q_j = (φ_j ⊗ I)ᵀ (H + δI)⁻¹ (φ_j ⊗ I) for rows (m, d). Returns: (m, C, C)."""
        d = features.shape[1]
        columns = self.inverse.shape[0] // d
        inner = block_quadratic_forms(features, self.inverse.view(d, columns, d, columns))
        if self.rotation is None:
            return inner
        return forms_in_class_basis(inner, features, self.rotation, self.lam)


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


#: The dual form is refused when the data term's largest diagonal entry exceeds this multiple of
#: λ + damping: Woodbury's result divides by λ + damping, so its rounding grows with that ratio.
DUAL_CONDITION_LIMIT = 1e8

#: Entries of the temporaries the exact solver and the engine form per chunk (128 MiB of float64).
CHUNK_ENTRIES = 2**24

#: Largest cost of forming the class basis's inverse on a warm start (:meth:`ExactSolver.keep_inverse`),
#: 2·(d(C - 1))³/3 flops, as a share of the Hessian's build and factorisation (:func:`_primal_cost`):
#: at the full 60k Fashion-MNIST with ten classes it is 0.21 (logistic regression, d = 1280) and
#: 0.17 (the SVM's 1000 landmarks), formed, and a restart's uploads read S' instead of solving
#: (0.82 s against 1.13-1.34 s per upload, bench/results/full_fashion_mnist_inverse_restart.md);
#: at n = 5,000 with ten classes it would be 1.16 and is not (a warm start would take twice as long).
KEEP_INVERSE_SHARE = 0.5

#: Rows of the inverse per product in :func:`inverse_times_units` (2.4 MB of float64 at 1280-d
#: and nine class columns): 256 and the whole at once took 25-27 ms, 64 took 31 ms.
INVERSE_ROWS = 256


class ExactSolver(InverseHVPSolver):
    """(H + damping·I)⁻¹ by a Cholesky factorisation computed once and reused for every query.

    Two forms, the same operator to rounding:

    - **primal**: H + δI = L Lᵀ, p x p. H is built from lower triangles
      (:func:`core.linalg.weighted_gram`, about n·d² flops per class block) and factorised
      (p³/3); a query costs two triangular solves, 2p² flops per vector. For a multi-class
      model whose loss depends only on score differences (softmax, the Crammer-Singer hinge) H
      is formed and factorised in the class basis (:class:`core.models.ClassBasisHessian`): a
      d·(C - 1) factor plus λ along the all-ones class direction, the same operator for 18%
      fewer build and 27% fewer factorisation flops at ten classes.
    - **dual**: for models with per-example curvature factors (:class:`ExampleCurvature`) whose
      data term has lower rank than the parameter count, n·r < p (the demo: 1000 images of
      1280-d features). Then H + δI = λ'I + UUᵀ with λ' = λ + δ and U = [√(w_j/n) φ_j ⊗ B_j]_j
      (p x n·r), and Woodbury gives (H + δI)⁻¹v = (v - U M⁻¹ Uᵀ v)/λ' with the n·r x n·r matrix
      M = λ'I + UᵀU = L_M L_Mᵀ, whose entries a_j a_k (φ_jᵀφ_k) (B_jᵀB_k) come from the row Gram
      matrix ΦΦᵀ (about n²·d flops, :func:`core.linalg.row_gram`) instead of the p x p Hessian
      (n·d²); factorising it costs (n·r)³/3 instead of p³/3. Projections onto the training
      features, which every score needs, come from the same Gram matrix (:meth:`project`), so
      no p-vector is formed.

    ``form="auto"`` (the default) takes the dual when it applies and its build and factorisation
    cost fewer flops; the primal factor is still available as :attr:`cholesky` (formed on first
    use). Every dense step is timed into :attr:`stages` with its flops and bytes.

    Args:
        hessian: the model's Hessian if the caller already has it (it is modified in place);
            implies the primal form.
        form: "auto", "primal" or "dual" (an error if the dual does not apply).
    """

    def __init__(
        self,
        model: TwiceDifferentiable,
        damping: float = 0.0,
        *,
        hessian: torch.Tensor | None = None,
        form: str = "auto",
    ) -> None:
        super().__init__(model, damping)
        if form not in EXACT_FORMS:
            raise InfluenceExplorerError(
                f"form must be one of {', '.join(EXACT_FORMS)}; got {form!r}."
            )
        #: The dense steps as they ran (factorisation here, queries as they come).
        self.stages = StageLog()
        self._cholesky: torch.Tensor | None = None
        self._dual: _DualFactor | None = None
        self._basis: _ClassBasisFactor | None = None
        #: S' = (H' + δI)⁻¹ in the class basis, kept in place of its factor once the
        #: Newton-corrected estimate's forms have formed it (:meth:`_class_basis_inverse`).
        self._basis_inverse: torch.Tensor | None = None
        if form != "primal" and hessian is None:
            self._dual = self._factor_dual(required=form == "dual")
        if self._dual is None and hessian is None:
            self._basis = self._factor_class_basis()
        if self._dual is None and self._basis is None:
            self._cholesky = self._factor_primal(hessian)
        self.form = "dual" if self._dual is not None else "primal"

    # ----------------------------------------------------------------- primal
    def _factor_class_basis(self) -> _ClassBasisFactor | None:
        """The primal factor in the class basis, or None when the model has none or it is not
        positive definite (the full Hessian's factorisation then says why)."""
        model = self.model
        if not has_class_basis(model):
            return None
        d, c = model.feature_shape()[1], model.n_outputs_
        with self.stages.stage(
            "Hessian H in the class basis, symmetric rank-k updates", *_hessian_cost(model)
        ):
            basis = model.class_basis_hessian()
        if basis is None:
            return None
        matrix = basis.matrix
        self._check_damping(float(matrix.diagonal().sum()) + d * basis.l2, model.n_params_)
        matrix.diagonal().add_(self.damping)
        size = matrix.shape[0]
        with self.stages.stage(
            "Cholesky factor of H in the class basis (d·(C-1) square)",
            size**3 / 3,
            2 * 8 * size * size,
        ):
            chol, info = cholesky(matrix, overwrite=True)
        if info != 0:
            return None
        return _ClassBasisFactor(basis.rotation, chol, basis.l2 + self.damping, d, c)

    def _class_basis_solve(self, columns: torch.Tensor) -> torch.Tensor:
        """(H + δI)⁻¹ v for (p, k) columns in the class basis: rotate the class index by Q,
        the first C - 1 columns through S' (kept, :meth:`_class_basis_inverse`) or else two
        triangular solves with the factor, a division by λ' for the last, rotate back.
        Returns: (p, k)."""
        # The basis before the inverse: a basis without its factor has its inverse kept.
        basis = self._basis
        assert basis is not None
        inverse = self._basis_inverse
        d, c, k = basis.d, basis.c, columns.shape[1]
        size = d * (c - 1)
        if inverse is not None:
            with self.stages.stage(
                "inverse Hessian times columns in the class basis",
                2 * size * size * k,
                8 * (size * size + 6 * d * c * k),
            ):
                return solve_in_class_basis(
                    None, basis.rotation, basis.lam, columns, inverse=inverse
                )
        with self.stages.stage(
            "triangular solves in the class basis",
            2 * size * size * k,
            8 * (size * size + 6 * d * c * k),
        ):
            return solve_in_class_basis(basis.factor, basis.rotation, basis.lam, columns)

    def keep_inverse(self, share: float | None = None) -> bool:
        """Form and keep the class basis's inverse S' now if it costs at most ``share``
        (default :data:`KEEP_INVERSE_SHARE`) of what building and factorising the Hessian cost:
        for an engine whose Newton-corrected forms came from a cache, which would otherwise
        never form it (:meth:`InfluenceEngine.provide_quadratic_forms`). True if S' is kept."""
        basis = self._basis
        if basis is None:
            return False
        if self._basis_inverse is None:
            size = basis.d * (basis.c - 1)
            limit = KEEP_INVERSE_SHARE if share is None else share
            if 2 * size**3 / 3 > limit * _primal_cost(self.model):
                return False
            self._class_basis_inverse()
        return True

    def _class_basis_inverse(self) -> torch.Tensor:
        """S' = (H' + δI)⁻¹, the inverse of the class basis's matrix (2·(d·(C - 1))³/3 flops
        once), kept from then on in place of its factor: the same memory, and every later
        solve (a test point's columns, s_test, a retrain's preconditioner) one read of S'
        instead of two triangular solves, which the BLAS runs several times slower for few
        right-hand sides. Formed for the Newton-corrected estimate's forms, or by
        :meth:`keep_inverse` when those came from a cache."""
        basis = self._basis
        assert basis is not None
        inverse = self._basis_inverse
        if inverse is None:
            inverse = self._inverse_of(basis.factor, "inverse Hessian in the class basis")
            # The inverse first: a reader that sees a basis without its factor finds it.
            self._basis_inverse = inverse
            self._basis = replace(basis, factor=None)
        return inverse

    def _factor_primal(self, hessian: torch.Tensor | None) -> torch.Tensor:
        model = self.model
        p = model.n_params_
        with self.stages.stage("Hessian H, symmetric rank-k updates", *_hessian_cost(model)):
            hessian = model.hessian() if hessian is None else hessian
        self._check_damping(float(hessian.diagonal().sum()), p)
        hessian.diagonal().add_(self.damping)
        with self.stages.stage("Cholesky factor of H (p x p)", p**3 / 3, 2 * 8 * p * p):
            chol, info = cholesky(hessian, overwrite=True)
        if info != 0:
            # The factorisation overwrote the Hessian; form it again for the message.
            hessian = model.hessian()
            hessian.diagonal().add_(self.damping)
            smallest = float(torch.linalg.eigvalsh(hessian)[0])
            suggestion = max(1e-6, 1.1 * abs(smallest) + 1e-6)
            raise NotPositiveDefiniteError(
                f"The Hessian plus damping {self.damping:g} is not positive definite (smallest "
                f"eigenvalue {smallest:.3g}). Add damping of at least {suggestion:.2g}, or increase "
                "the model's l2, and try again.",
                # Damping adds to every eigenvalue, so this total makes the smallest positive.
                suggested_damping=self.damping + suggestion,
            )
        return chol

    @property
    def cholesky(self) -> torch.Tensor:
        """The lower Cholesky factor L of H + δI (p x p), formed on first use in the dual form
        and the class basis (which answer every query without it)."""
        if self._cholesky is None:
            self._cholesky = self._factor_primal(None)
        return self._cholesky

    # ----------------------------------------------------------------- dual
    def _factor_dual(self, *, required: bool) -> _DualFactor | None:
        """The dual factorisation, or None (primal) when it does not apply or costs more."""
        model = self.model
        why = _dual_refusal(model, self.damping)
        if why is None and not required and _dual_cost(model) >= _primal_cost(model):
            why = "it would cost more flops than the primal form"
        if why is not None:
            if required:
                raise InfluenceExplorerError(f"The dual form of the exact solver needs {why}.")
            return None
        features = model.features_
        derivs = model.training_derivatives()
        n, d = features.shape
        c, r = derivs.factor.shape[1], derivs.factor.shape[2]
        lam = float(model.l2) + self.damping
        # a_j B_j (n, C, r): the columns of U are φ_j ⊗ (a_j B_j), a_j = √(w_j / n).
        coefficients = (model.sample_weight_ / n).sqrt()[:, None, None] * derivs.factor
        with self.stages.stage(
            "Gram matrix ΦΦᵀ (n x n), lower triangle", n * n * d, 8 * (n * d + n * n)
        ):
            gram = row_gram(features)
        size = n * r
        with self.stages.stage("dual matrix M = λ'I + UᵀU", 2 * size * size, 8 * 2 * size * size):
            if c == 1 and r == 1:
                small = torch.outer(coefficients[:, 0, 0], coefficients[:, 0, 0]).mul_(gram)
            else:
                cross = torch.einsum("jcr,kcs->jrks", coefficients, coefficients)
                small = (gram[:, None, :, None] * cross).reshape(size, size)
            trace = float(small.diagonal().sum())
            if float(small.diagonal().max()) > DUAL_CONDITION_LIMIT * lam:
                if required:
                    raise InfluenceExplorerError(
                        "The dual form of the exact solver needs λ + damping of at least "
                        f"1/{DUAL_CONDITION_LIMIT:g} of the data term's largest diagonal entry; "
                        "use the primal form."
                    )
                return None
            small.diagonal().add_(lam)
        self._check_damping(trace + float(model.l2) * model.n_params_, model.n_params_)
        with self.stages.stage(
            "Cholesky factor of M (n·r x n·r)", size**3 / 3, 2 * 8 * size * size
        ):
            factor, info = cholesky(small, overwrite=True)
        if info != 0:
            if required:
                raise InfluenceExplorerError(
                    "The dual form of the exact solver could not factorise λ'I + UᵀU (rounding); "
                    "use the primal form."
                )
            return None
        return _DualFactor(gram, factor, coefficients, lam)

    def _dual_solve(self, projected: torch.Tensor) -> torch.Tensor:
        """W = a_j B_j z_j with M z = Uᵀv, from P = (Φ ⊗ I)ᵀv (n, C, k): the training-point
        weights of U M⁻¹ Uᵀ v = Σ_j φ_j ⊗ W_j. Returns: (n, C, k)."""
        dual = self._dual
        assert dual is not None
        coefficients = dual.coefficients
        n, c, r = coefficients.shape
        k = projected.shape[2]
        size = n * r
        with self.stages.stage(
            "triangular solves with M", 2 * size * size * k, 8 * (size * size + 4 * size * k)
        ):
            if c == 1 and r == 1:
                a = coefficients[:, 0, :]  # (n, 1)
                z = cholesky_solve(dual.factor, a * projected[:, 0, :])
                return (a * z)[:, None, :]
            rhs = (coefficients.transpose(1, 2) @ projected).reshape(size, k)
            z = cholesky_solve(dual.factor, rhs).reshape(n, r, k)
            return coefficients @ z

    def _features_times(self, vectors: torch.Tensor) -> torch.Tensor:
        """(Φ ⊗ I_C)ᵀ v for (p, k) vectors: each training point's features against each of the
        C blocks of v. Returns: (n, C, k)."""
        features = self.model.features_
        n, d = features.shape
        k = vectors.shape[1]
        c = vectors.shape[0] // d
        with self.stages.stage(
            "training features times vectors", 2 * n * d * c * k, 8 * (n * d + (d + n) * c * k)
        ):
            return times_thin(features, vectors.reshape(d, c * k)).reshape(n, c, k)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(Φ ⊗ I_C)ᵀ (H + δI)⁻¹ v: each training point's features against each of the C blocks
        of the solution, what every score is made of.

        Primal: the solve, then one product with Φ (2·n·d·C·k flops). Dual: with P = (Φ ⊗ I)ᵀv,
        (Φ ⊗ I)ᵀ(H + δI)⁻¹v = (P - ΦΦᵀ W)/λ' (:meth:`_dual_solve`), products with the n x n Gram
        matrix instead of going back to p-vectors.

        Args:
            vectors: (p, k).
        Returns:
            (k, n, C).
        """
        v = as_float64(vectors)
        v = v[:, None] if v.ndim == 1 else v
        if self._dual is None:
            return self._features_times(self.inverse_hvp(v)).permute(2, 0, 1)
        dual = self._dual
        projected = self._features_times(v)
        weights = self._dual_solve(projected)
        n, c, k = weights.shape
        with self.stages.stage(
            "Gram matrix times weights", 2 * n * n * c * k, 8 * (n * n + 3 * n * c * k)
        ):
            back = (dual.gram @ weights.reshape(n, c * k)).reshape(n, c, k)
            return back.sub_(projected).mul_(-1.0 / dual.lam).permute(2, 0, 1)

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        v = as_float64(vectors)
        if self._basis is not None:
            return (
                self._class_basis_solve(v[:, None])[:, 0]
                if v.ndim == 1
                else self._class_basis_solve(v)
            )
        if self._dual is None:
            p = v.shape[0]
            k = 1 if v.ndim == 1 else v.shape[1]
            with self.stages.stage(
                "triangular solves with L", 2 * p * p * k, 8 * (p * p + 4 * p * k)
            ):
                return cholesky_solve(self.cholesky, v)
        squeeze = v.ndim == 1
        columns = v[:, None] if squeeze else v
        features = self.model.features_
        n, d = features.shape
        weights = self._dual_solve(self._features_times(columns))
        c, k = weights.shape[1], weights.shape[2]
        with self.stages.stage(
            "training features times weights", 2 * n * d * c * k, 8 * (n * d + (d + n) * c * k)
        ):
            back = t_times(features, weights.reshape(n, c * k)).reshape(d * c, k)
        out = (columns - back) / self._dual.lam
        return out[:, 0] if squeeze else out

    # ----------------------------------------------------------------- quadratic forms
    def unit_quadratic_forms(self) -> torch.Tensor:
        """Q_j = (φ_j ⊗ I_C)ᵀ (H + δI)⁻¹ (φ_j ⊗ I_C) for every training point. Returns: (n, C, C).

        - dual: Q_j[a, b] = (φ_jᵀφ_j δ_ab - R_jaᵀ M⁻¹ R_jb)/λ' with R_ja = Uᵀ(φ_j ⊗ e_a), whose
          entries a_l B_l[a, :] φ_lᵀφ_j come from the Gram matrix: one triangular solve with L_M
          for all of them, (n·r)²·n·C flops.
        - primal, one output: Q_j = ‖L⁻¹φ_j‖², one triangular solve for all points (d²·n flops,
          against 2d³/3 + n·d² for forming H⁻¹ and its quadratic forms).
        - primal, C outputs: from the blocks of S = (H + δI)⁻¹ (2p³/3), the C(C+1)/2 batches of
          quadratic forms of :func:`core.linalg.quadratic_forms` (n·d² each).
        """
        features = self.model.features_
        n, d = features.shape
        c = self.model.n_outputs_
        if self._dual is not None:
            return self._dual_quadratic_forms()
        if self._basis is not None:
            return self._class_basis_quadratic_forms()
        if c == 1:
            out = torch.empty(n, 1, 1, dtype=DTYPE)
            chunk = max(1, CHUNK_ENTRIES // d)
            with self.stages.stage("quadratic forms ‖L⁻¹φ_j‖²", d * d * n, 8 * (d * d + 2 * n * d)):
                for start in range(0, n, chunk):
                    block = features[start : start + chunk].T
                    solved = torch.linalg.solve_triangular(self.cholesky, block, upper=False)
                    out[start : start + chunk, 0, 0] = (solved * solved).sum(0)
            return out
        inverse = self._inverse_of(self.cholesky, "inverse Hessian from L")
        return self._forms_from_inverse(inverse, c)

    def _inverse_of(self, factor: torch.Tensor, stage: str) -> torch.Tensor:
        """S = (L Lᵀ)⁻¹ from a lower factor L (2p³/3 flops), timed as ``stage``."""
        size = factor.shape[0]
        with self.stages.stage(stage, 2 * size**3 / 3, 2 * 8 * size * size):
            return cholesky_inverse(factor)

    def _forms_from_inverse(self, inverse: torch.Tensor, columns: int) -> torch.Tensor:
        """φ_jᵀ S_ab φ_j for every training point and class columns a, b of a symmetric S of
        d·columns square: the columns(columns+1)/2 batches of quadratic forms of
        :func:`block_quadratic_forms`. Returns: (n, columns, columns)."""
        features = self.model.features_
        n, d = features.shape
        blocks = inverse.view(d, columns, d, columns)
        pairs = columns * (columns + 1) // 2
        with self.stages.stage(
            "quadratic forms from the inverse's blocks",
            pairs * n * d * d * (1 + min(STRIP, d) / d),
            8 * pairs * (d * d + n * d),
        ):
            return block_quadratic_forms(features, blocks)

    def project_units(self, features: torch.Tensor) -> torch.Tensor | None:
        """(φ_j ⊗ e_a)ᵀ (H + δI)⁻¹ (φ_t ⊗ e_b) for test features (m, d), laid out as
        :meth:`project` of the unit columns φ_t ⊗ e_b (column t·C + b): (m·C, n, C); None
        outside the class basis (the caller then solves for the unit columns).

        In the class basis a test point's C unit columns become φ_t ⊗ Q[b, :], which span the
        C - 1 columns φ_t ⊗ e'_e solved with the smaller factor plus the all-ones class
        direction, whose part is φ_jᵀφ_t/(C·λ'): C - 1 solves instead of C, and
        n·d·(C - 1)²·m flops to project them onto the training features instead of n·d·C²·m
        (81 instead of 100 columns for ten classes).
        """
        basis = self._basis
        if basis is None:
            return None
        train = self.model.features_
        n, d = train.shape
        m, c = features.shape[0], basis.c
        h = c - 1
        size = d * h
        inverse = self._basis_inverse
        if inverse is not None:
            with self.stages.stage(
                "inverse Hessian times unit columns in the class basis",
                2 * size * d * m * h,
                8 * (size * size + 2 * size * m * h),
            ):
                solved = inverse_times_units(inverse, features, h)
        else:
            with self.stages.stage(
                "triangular solves in the class basis",
                2 * size * size * m * h,
                8 * (size * size + 4 * size * m * h),
            ):
                # Rows (k, e'), columns (t, e). The basis was read before the inverse, so
                # its factor is still there.
                assert basis.factor is not None
                solved = cholesky_solve(basis.factor, unit_columns(features, h))
        with self.stages.stage(
            "training features times solutions",
            2 * n * d * (h * h + 1) * m,
            8 * (n * d + n * (h * h + 1) * m),
        ):
            # Columns (e', t, e) of the solutions, then the test features themselves (for the
            # all-ones part φ_jᵀφ_t), against every training point in one product.
            columns = torch.cat([solved.reshape(d, h * m * h), features.T], dim=1)
            products = times_thin(train, columns).T  # (h·m·h + m, n), contiguous
        inner, plain = products[: h * m * h], products[h * m * h :]
        head = basis.rotation[:, :-1]  # (C, h)
        with self.stages.stage(
            "back from the class basis", 4 * c * h * m * h * n, 8 * 3 * c * m * h * n
        ):
            # out[t, b, j, a] = Σ_e,f Q[a, e] inner[e, t, f, j] Q[b, f], as two products.
            rotated = (head @ inner.reshape(h, m * h * n)).reshape(c, m, h, n)  # [a, t, f, j]
            rotated = rotated.permute(1, 2, 3, 0).reshape(m, h, n * c)  # [t, f, (j, a)]
            out = torch.matmul(head, rotated).reshape(m, c, n, c)  # [t, b, j, a]
            out += (plain / (c * basis.lam))[:, None, :, None]
        return out.reshape(m * c, n, c)

    def _class_basis_quadratic_forms(self) -> torch.Tensor:
        """Q_j through the class-basis factor (:func:`forms_in_class_basis`): C(C - 1)/2
        batches of quadratic forms instead of C(C + 1)/2, and the inverse of a d·(C - 1)
        factor instead of a d·C one."""
        basis = self._basis
        assert basis is not None
        features = self.model.features_
        inner = self._forms_from_inverse(self._class_basis_inverse(), basis.c - 1)
        return forms_in_class_basis(inner, features, basis.rotation, basis.lam)

    def operator(self) -> SolveOperator:
        """(H + δI)⁻¹ as a picklable callable, for a retraining's preconditioner elsewhere (a
        task on a cluster's worker): the class basis's factor or kept inverse when there is
        one, else the primal factor (formed on first use, as :attr:`cholesky`)."""
        # The basis before the inverse: a basis without its factor has its inverse kept.
        basis = self._basis
        if basis is not None:
            return SolveOperator(basis.factor, basis.rotation, basis.lam, self._basis_inverse)
        return SolveOperator(self.cholesky)

    def inverse_for_forms(self) -> InverseForms:
        """What forms every training point's Q_j without triangular solves, for a multi-class
        model whose rows are elsewhere (shards on a cluster): S' with Q and λ' in the class
        basis (formed and kept as :meth:`_class_basis_inverse` does), else the whole
        S = (H + δI)⁻¹ (2p³/3 flops)."""
        basis = self._basis
        if basis is not None:
            return InverseForms(self._class_basis_inverse(), basis.rotation, basis.lam)
        return InverseForms(self._inverse_of(self.cholesky, "inverse Hessian from L"), None, 0.0)

    def _dual_quadratic_forms(self) -> torch.Tensor:
        dual = self._dual
        assert dual is not None
        coefficients, gram = dual.coefficients, dual.gram
        n, c, r = coefficients.shape
        size = n * r
        out = torch.empty(n, c, c, dtype=DTYPE)
        chunk = max(1, CHUNK_ENTRIES // (size * c))
        eye = torch.eye(c, dtype=DTYPE)
        with self.stages.stage(
            "quadratic forms through L_M", size * size * n * c, 8 * (size * size + 2 * size * n * c)
        ):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                # R[(l, ρ), (j, a)] = a_l B_l[a, ρ] φ_lᵀφ_j for the chunk's points j.
                rhs = torch.einsum("lar,lj->lrja", coefficients, gram[:, start:stop])
                solved = torch.linalg.solve_triangular(
                    dual.factor, rhs.reshape(size, (stop - start) * c), upper=False
                ).reshape(size, stop - start, c)
                products = torch.einsum("xja,xjb->jab", solved, solved)
                diagonal = gram.diagonal()[start:stop]
                out[start:stop] = (diagonal[:, None, None] * eye - products) / dual.lam
        return out


@dataclass(frozen=True)
class _ClassBasisFactor:
    """The class-basis pieces: Q (C, C), the Cholesky factor of H' + δI (d·(C - 1) square;
    None once the solver keeps its inverse instead), λ' = λ + δ (the curvature along the
    all-ones class direction), d and C."""

    rotation: torch.Tensor
    factor: torch.Tensor | None
    lam: float
    d: int
    c: int


@dataclass(frozen=True)
class _DualFactor:
    """The dual form's pieces: the Gram matrix ΦΦᵀ (n, n), the Cholesky factor L_M of
    M = λ'I + UᵀU (n·r, n·r), the columns' coefficients a_j B_j (n, C, r) and λ' = λ + δ."""

    gram: torch.Tensor
    factor: torch.Tensor
    coefficients: torch.Tensor
    lam: float


def _dual_refusal(model: Any, damping: float) -> str | None:
    """Why the dual form does not apply to this model (None: it does)."""
    if not (isinstance(model, LinearModel) and isinstance(model, ExampleCurvature)):
        return "a convex model with per-example curvature factors (LogisticRegression, KernelSVM)"
    if not isinstance(getattr(model, "features_", None), torch.Tensor):
        return "the training features in this process"
    if not float(model.l2) + damping > 0:
        return "λ + damping > 0"
    n, r = model.features_.shape[0], model.training_derivatives().factor.shape[2]
    if n * r >= model.n_params_:
        return f"fewer data-term columns than parameters (n·r = {n * r} >= p = {model.n_params_})"
    return None


def _hessian_cost(model: Any) -> tuple[float, float]:
    """Flops and bytes of building the Hessian: C(C+1)/2 symmetric rank-k updates of n·d² each,
    in memory or summed over shards (NaN for models without fixed features, whose Hessian is
    built some other way)."""
    shape = model.feature_shape() if isinstance(model, LinearModel) else None
    if shape is None:
        return math.nan, math.nan
    n, d = shape
    c = model.n_outputs_
    # In the class basis (has_class_basis) the blocks of the last class column are not formed.
    columns = c - 1 if has_class_basis(model) else c
    pairs = columns * (columns + 1) // 2
    return pairs * n * d * d, 8 * (pairs * (2 * n * d) + (d * columns) ** 2)


def _primal_cost(model: Any) -> float:
    """Flops of the primal form's build and factorisation."""
    size = model.n_params_
    if has_class_basis(model):
        size = size // model.n_outputs_ * (model.n_outputs_ - 1)
    return _hessian_cost(model)[0] + size**3 / 3


def _dual_cost(model: Any) -> float:
    """Flops of the dual form's build and factorisation."""
    n, d = model.features_.shape
    r = model.training_derivatives().factor.shape[2]
    return n * n * d + 2 * (n * r) ** 2 + (n * r) ** 3 / 3


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
        solver: InverseHVPSolver = ExactSolver(
            model, damping, hessian=hessian, form=config.exact_form
        )
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
    """Indices of the k largest values, largest first; among equal values the lower training
    index comes first, so lists are reproducible across runs and machines.

    The order of a full stable sort of all n values, from a partial one: the k-th largest value
    by selection (O(n)), then a stable sort of only the values at or above it (every tie at the
    threshold included, in index order): at n = 60,000, 0.2 ms instead of the full sort's 8
    (load average 5.5). NaN (which a sort places last) takes the full sort.
    """
    n = len(values)
    if k >= n or not np.isfinite(values).all():
        return np.argsort(-values, kind="stable")[:k]
    threshold = np.partition(values, n - k)[n - k]
    candidates = np.flatnonzero(values >= threshold)
    return candidates[np.argsort(-values[candidates], kind="stable")[:k]]


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
        self._known_forms: torch.Tensor | None = None

    def provide_quadratic_forms(self, forms: Any) -> bool:
        """Use Q_j computed earlier for this same model and solver (a cache, keyed by what
        determines them) instead of forming them again: at 60,000 ten-class points that is
        minutes of dense algebra. Ignored (False) unless its shape is (n, C, C) and every
        value is finite; the caller answers for their being this model's.

        Forming the forms would also have formed the class basis's inverse S', which
        explanations read instead of solving; the exact solver forms it now where that costs
        little next to building H (:meth:`ExactSolver.keep_inverse`)."""
        q = torch.as_tensor(np.asarray(forms), dtype=DTYPE)
        c = self.model.n_outputs_
        if q.shape != (self.n_train, c, c) or not bool(torch.isfinite(q).all()):
            return False
        self._known_forms = q
        if isinstance(self.solver, ExactSolver):
            self.solver.keep_inverse()
        return True

    @property
    def quadratic_forms(self) -> torch.Tensor | None:
        """Q_j (n, C, C) once the Newton-corrected estimate has formed them, else None."""
        return getattr(self, "_quadratic_forms", None)

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

        The exact solver forms them from its factor (:meth:`ExactSolver.unit_quadratic_forms`).
        Other solvers: with S = (H + δI)⁻¹ and S_ab its (a, b) block of d x d
        (θ[k·C + c] = W[k, c]), Q_j[a, b] = φ_jᵀ S_ab φ_j: for each of the C(C+1)/2 pairs a <= b
        (Q_j is symmetric) one batch of quadratic forms over all training points from the lower
        triangle of S_ab's symmetric part (:func:`core.linalg.quadratic_forms`), about
        n·d²·C(C+1)/2 flops in GEMMs, after forming S by p unit solves when d <= n; else by
        solving for the n·C columns φ_j ⊗ e_a. No p x p matrix per point is ever formed.
        """
        if self._known_forms is not None:
            return self._known_forms
        if isinstance(self.solver, ExactSolver):
            return self.solver.unit_quadratic_forms()
        features = self.model.features_
        n, d = features.shape
        c = self.model.n_outputs_
        if d <= n:
            inverse = self._inverse_hessian(chunk)
            return block_quadratic_forms(features, inverse.view(d, c, d, c))
        out = torch.empty(n, c, c, dtype=DTYPE)
        for start in range(0, n, chunk):
            phi = features[start : start + chunk]
            rhs = unit_columns(phi, c)  # columns φ_j ⊗ e_a for the chunk, laid out (p, j, a)
            solved = self.solver.inverse_hvp(rhs).reshape(d, c, len(phi), c)
            out[start : start + chunk] = torch.einsum("jd,dajb->jab", phi, solved)
        return out

    def _inverse_hessian(self, chunk: int) -> torch.Tensor:
        """S = (H + δI)⁻¹ (p, p): from the Cholesky factor, else one solve per unit vector."""
        if isinstance(self.solver, ExactSolver):
            return cholesky_inverse(self.solver.cholesky)
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
        self,
        X_test: Any,
        y_test: Any,
        *,
        estimate: Estimate | None = None,
        features: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Influence of every training point on each test point's loss.

        score[t, j] ≈ ℓ(z_test_t, θ̂_{-j}) - ℓ(z_test_t, θ̂): positive means z_j helped (removing
        it raises the test loss), negative means it hurt.

        Args:
            X_test: (m, D) test inputs in the model's input space.
            y_test: (m,) labels whose loss is explained (usually the predicted or true label).
            estimate: one of :attr:`estimates`; ``None`` is :attr:`default_estimate` ("margin"
                for models with :class:`ExampleCurvature`, else "first_order").
            features: as :meth:`score_estimates`.
        Returns:
            (m, n_train) scores in units of test loss.
        """
        estimate = self.default_estimate if estimate is None else estimate
        return self.score_estimates(X_test, y_test, (estimate,), features=features)[estimate]

    def score_estimates(
        self,
        X_test: Any,
        y_test: Any,
        estimates: tuple[str, ...] | None = None,
        *,
        features: torch.Tensor | None = None,
    ) -> dict[str, np.ndarray]:
        """Several estimates of the same scores at once, sharing the inverse-Hessian solves.

        All test points' right-hand sides go through one batched solve (in chunks of at most
        :data:`CHUNK_ENTRIES` projections).

        Args:
            X_test: (m, D) test inputs; y_test: (m,) labels whose loss is explained.
            estimates: which (default: all of :attr:`estimates`).
            features: ``model.transform(X_test)`` (m, d) when the caller has it already, so it
                is not formed again (for the exact kernel SVM a triangular solve with the n x n
                factor); only models with :class:`ExampleCurvature` use it.
        Returns:
            estimate -> (m, n_train) scores.
        """
        estimates = self.estimates if estimates is None else tuple(estimates)
        for estimate in estimates:
            self._check_estimate(estimate)
        if not self.structured:
            s_test = self.inverse_hvp_test(X_test, y_test)
            return {e: self.scores_from_stest(s_test, estimate=e) for e in estimates}
        model = self.model
        features = model.transform(X_test) if features is None else as_float64(features)
        labels = as_labels(y_test).reshape(-1)
        outputs = model.scores(features)
        # ∇ℓ(z_test) = φ_test ⊗ ∂ℓ/∂s: the linear estimates' s_test is this combination of the
        # C unit output solves (with C = 1, the one solve itself).
        d1 = model.loss_.derivatives(outputs, labels).d1
        linear = [e for e in estimates if e != "margin"]
        if "margin" not in estimates:
            projected = self._projected_test_solves(features, d1)
            return {e: self._linear_scores(projected, e) for e in estimates}
        changes, projected = self._output_changes(features, "corrected", d1 if linear else None)
        out = {e: self._linear_scores(projected, e) for e in linear}
        out["margin"] = loss_change(model.loss_, outputs, changes, labels).numpy()
        return {e: out[e] for e in estimates}

    def scores_from_stest(
        self, s_test: torch.Tensor, *, estimate: Estimate = "corrected"
    ) -> np.ndarray:
        """Linearised scores from precomputed s_test = (H + damping)⁻¹ ∇ℓ(z_test) (m, p).
        Returns: (m, n_train)."""
        self._check_estimate(estimate)
        if estimate not in LINEAR_ESTIMATES:
            raise InfluenceExplorerError(
                f"The {estimate!r} estimate evaluates the test loss itself, so it needs the test "
                "inputs, not only s_test; use influence_scores or score_estimates."
            )
        if not self.structured:
            return (self.model.training_gradient_products(s_test.T) / self.n_train).numpy()
        features = self.model.features_
        d, c = features.shape[1], self.model.n_outputs_
        m = s_test.shape[0]
        # (φ_jᵀ S_t)[c] with S_t the (d, C) reshape of s_test's row t: one product for all t.
        stacked = as_float64(s_test).reshape(m, d, c).permute(1, 0, 2).reshape(d, m * c)
        projected = (features @ stacked).reshape(-1, m, c).permute(1, 0, 2)
        return self._linear_scores(projected, estimate)

    def _linear_scores(self, projected: torch.Tensor, estimate: str) -> np.ndarray:
        """The one place a "corrected" or "first_order" score is formed:
        (1/n) s_tᵀ (φ_j ⊗ e_j) = (1/n) Σ_c (φ_jᵀ S_t)[c] e_j[c], from the projections
        (φ_jᵀ S_t)[c] (m, n, C) of the solves S_t. Returns: (m, n_train)."""
        residuals = self._residuals(estimate)
        if projected.shape[2] == 1:
            return (projected[:, :, 0] * (residuals[:, 0] / self.n_train)).numpy()
        return ((projected * residuals[None]).sum(-1) / self.n_train).numpy()

    def _unit_right_hand_sides(self, features: torch.Tensor) -> torch.Tensor:
        """The columns φ_t ⊗ e_c, for each test point t and output c, in the layout
        θ[k·C + a]. Returns: (p, m·C), column t·C + c."""
        return unit_columns(features, self.model.n_outputs_)

    def _project_units(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`_project` of the unit columns φ_t ⊗ e_b of test features (m, d), through the
        exact solver's class basis when it has one. Returns: (m·C, n, C)."""
        if isinstance(self.solver, ExactSolver):
            units = self.solver.project_units(features)
            if units is not None:
                return units
        return self._project(self._unit_right_hand_sides(features))

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(Φ ⊗ I_C)ᵀ (H + δI)⁻¹ v for (p, k) vectors. Returns: (k, n, C)."""
        if isinstance(self.solver, ExactSolver):
            return self.solver.project(vectors)
        features = self.model.features_
        n, d = features.shape
        solved = self.solver.inverse_hvp(vectors)
        k = solved.shape[1]
        c = solved.shape[0] // d
        return (features @ solved.reshape(d, c * k)).reshape(n, c, k).permute(2, 0, 1)

    def _projected_test_solves(self, features: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        """(φ_jᵀ S_t)[c] for s_test = (H + δI)⁻¹ (φ_t ⊗ ∂ℓ/∂s_t) of each test point.
        Returns: (m, n, C)."""
        m = features.shape[0]
        gradients = (features[:, :, None] * d1[:, None, :]).reshape(m, -1)
        step = max(1, CHUNK_ENTRIES // (self.n_train * self.model.n_outputs_))
        return torch.cat(
            [self._project(gradients[start : start + step].T) for start in range(0, m, step)]
        )

    def _output_changes(
        self, features: torch.Tensor, estimate: str, d1: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Δs[t, j] = (φ_t ⊗ I_C)ᵀ Δθ_j, the predicted change of test point t's outputs when z_j
        is removed, and optionally the projections of the linear estimates' s_test (the same
        unit solves combined by ``d1``, the test losses' ∂ℓ/∂s (m, C)).

        Δθ_j = (1/n) H⁻¹ (φ_j ⊗ e_j) (Woodbury folded into e_j), so output b changes by
        (1/n) Σ_a (φ_jᵀ U_b)[a] e_j[a], U_b the (d, C) reshape of the solve for output b; the
        projections φ_jᵀ U_b come from one batched solve of all the chunk's φ_t ⊗ e_b.

        Returns:
            ((m, n_train, C) changes, (m, n_train, C) projections or None).
        """
        residuals = self._residuals(estimate)
        n, c = self.n_train, self.model.n_outputs_
        m = features.shape[0]
        changes = torch.empty(m, n, c, dtype=DTYPE)
        projected = None if d1 is None else torch.empty(m, n, c, dtype=DTYPE)
        # Test points per batched solve, so that their (C x C per point) projections fit.
        step = max(1, CHUNK_ENTRIES // (n * c * c))
        for start in range(0, m, step):
            block = features[start : start + step]
            stop = start + block.shape[0]
            units = self._project_units(block)  # (t·C + b, j, a)
            units = units.reshape(stop - start, c, n, c)
            if c == 1:
                changes[start:stop] = units[:, 0] * (residuals / n)
            else:
                changes[start:stop] = (units * residuals).sum(-1).transpose(1, 2) / n
            if projected is not None and d1 is not None:
                projected[start:stop] = torch.einsum("tb,tbja->tja", d1[start:stop], units)
        return changes, projected

    def _unit_output_solves(self, features: torch.Tensor) -> torch.Tensor:
        """(H + damping)⁻¹ (φ_t ⊗ e_c) for each test point's features and each output c, in one
        batched solve: how θ must move to change output c. Returns: (m, C, p)."""
        m = features.shape[0]
        c = self.model.n_outputs_
        solved = self.solver.inverse_hvp(self._unit_right_hand_sides(features))
        return solved.T.reshape(m, c, -1)

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
        return self._output_changes(features, _parameter_estimate(estimate))[0].numpy()

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
