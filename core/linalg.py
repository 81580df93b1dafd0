"""Dense and iterative linear algebra shared by the models and the influence solvers.

One conjugate-gradient routine serves the influence solver (many right-hand sides, a tight
tolerance), Newton-CG fitting of large models, and preconditioned retraining near θ̂. Callers
decide what a non-converged or non-positive-curvature run means for them; this module only
reports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas as _blas
from scipy.linalg import lapack as _lapack

DTYPE = torch.float64

MatVec = Callable[[torch.Tensor], torch.Tensor]


def cholesky_solve(chol: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve (L Lᵀ) x = b for a lower Cholesky factor L; b is (p,) or (p, k).

    Two triangular solves rather than ``torch.cholesky_solve``, which copies the whole factor on
    every call: for one right-hand side that copy dominates, and influence queries are usually one
    or a few vectors against a factor computed once. ``python -m bench.scale --models
    logreg-10class --sizes 1000`` times one 10-class test image (p = 12,800): about 0.1 s this
    way, against 3-4 s with ``torch.cholesky_solve`` (bench/results/scale.md, the earlier run).
    """
    rhs = b[:, None] if b.ndim == 1 else b
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)
    x = torch.linalg.solve_triangular(chol.mT, y, upper=True)
    return x[:, 0] if b.ndim == 1 else x


#: Columns per strip of :func:`quadratic_forms`: large enough for efficient GEMMs, small enough
#: that skipping the strict upper triangle saves most of its half.
STRIP = 256

#: Rows per symmetric rank-k update in :func:`weighted_gram`: bounds its temporary (the scaled
#: rows) to ROWS x d while each update stays a large, efficient one.
ROWS = 8192


def _symmetric_from(triangle: torch.Tensor, *, upper: bool) -> torch.Tensor:
    """The symmetric matrix whose upper (or lower) triangle, diagonal included, is that of the
    row-major ``triangle``; its other half is ignored. Exactly symmetric: that half is a copy.
    Returns a new row-major (d, d)."""
    if upper:
        return torch.triu(triangle).add_(torch.triu(triangle, 1).mT)
    return torch.tril(triangle).add_(torch.tril(triangle, -1).mT)


def weighted_gram(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Φᵀ diag(w) Φ, exactly symmetric, by symmetric rank-k updates (BLAS syrk).

    syrk forms only one triangle of a product AᵀA, n·d² flops instead of a general product's
    2·n·d², at the machine's GEMM rate. torch does not expose it, so this calls the LAPACK/BLAS
    that scipy ships (OpenBLAS): measured on this project's 2-core machine single-threaded, 33
    GFLOP/s on the n·d² count for the demo's n = 1000, d = 1280, against 23 for the earlier
    strips of general products (which also did 20% more work) and 35 for torch's full product
    (twice the work). Rows with w > 0 enter as √w·φ, rows with w < 0 are subtracted the same
    way, rows with w = 0 are skipped; ``ROWS`` rows at a time bound the temporary.

    Args:
        features: (n, d) Φ, float64 (or float32).
        weights: (n,) w, any sign.
    Returns:
        (d, d), a new tensor.
    """
    n, d = features.shape
    dtype = features.dtype
    syrk = _blas.get_blas_funcs("syrk", dtype=_numpy_dtype(dtype))
    weights = weights.to(dtype)
    upper = None
    for sign, rows in ((1.0, weights > 0), (-1.0, weights < 0)):
        index = torch.nonzero(rows)[:, 0]
        for start in range(0, len(index), ROWS):
            chunk = index[start : start + ROWS] if len(index) < n else slice(start, start + ROWS)
            scaled = (features[chunk] * weights[chunk].abs().sqrt()[:, None]).contiguous()
            # scaled (k, d) in row-major order is scaledᵀ (d, k) in column-major order, which
            # BLAS takes without a copy: syrk(trans=0) then forms scaledᵀ·scaled.
            upper = syrk(
                sign,
                scaled.numpy().T,
                beta=0.0 if upper is None else 1.0,
                c=upper,
                trans=0,
                lower=1,
                overwrite_c=1,
            )
    if upper is None:
        return torch.zeros(d, d, dtype=dtype)
    # The column-major lower triangle BLAS filled is the row-major upper one of its transpose.
    return _symmetric_from(torch.from_numpy(upper.T), upper=True)


def row_gram(features: torch.Tensor) -> torch.Tensor:
    """ΦΦᵀ, the (n, n) Gram matrix of the rows, exactly symmetric, by one syrk (n²·d flops; Φ is
    read in place). Args: features (n, d). Returns: (n, n), a new tensor."""
    features = features.contiguous()
    syrk = _blas.get_blas_funcs("syrk", dtype=_numpy_dtype(features.dtype))
    # Φ (n, d) row-major is Φᵀ (d, n) column-major; syrk(trans=1) forms (Φᵀ)ᵀΦᵀ = ΦΦᵀ.
    upper = syrk(1.0, features.numpy().T, trans=1, lower=1)
    return _symmetric_from(torch.from_numpy(upper.T), upper=True)


def cholesky(matrix: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor L (L Lᵀ = A, zeros above the diagonal) by LAPACK potrf, reading A's
    lower triangle.

    scipy's LAPACK (OpenBLAS) rather than ``torch.linalg.cholesky``: measured single-threaded on
    this project's 2-core AMD machine at 27 GFLOP/s for the demo's 1280 x 1280 Hessian against
    15 for torch's (MKL).

    Args:
        matrix: (p, p) symmetric A, float64 or float32.
        overwrite: factorise in A's own memory (A is then destroyed), saving a p x p copy.
    Returns:
        (L, info): info > 0 means A is not (numerically) positive definite, and L is then not a
        factor; a non-finite A gives info > 0 or a non-finite diagonal, which is reported the
        same way.
    """
    a = matrix.contiguous().numpy()
    potrf = _lapack.get_lapack_funcs("potrf", dtype=_numpy_dtype(matrix.dtype))
    # A row-major is Aᵀ column-major: its column-major upper triangle is A's lower one, and the
    # upper factor U (UᵀU = A) LAPACK returns there is L = Uᵀ in row-major order.
    upper, info = potrf(a.T, lower=0, clean=1, overwrite_a=int(overwrite))
    factor = torch.from_numpy(upper.T)
    if info == 0 and not bool(torch.isfinite(factor.diagonal()).all()):
        info = 1  # NaN or inf in A reaches the diagonal of its factor
    return factor, int(info)


def cholesky_inverse(chol: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ from a lower Cholesky factor, exactly symmetric, by LAPACK potri (2p³/3 flops).

    scipy's LAPACK (OpenBLAS) rather than ``torch.cholesky_inverse`` (MKL), which measured
    several times slower on this project's 2-core AMD machine. Args: chol (p, p). Returns: (p, p).
    """
    potri = _lapack.get_lapack_funcs("potri", dtype=_numpy_dtype(chol.dtype))
    # L row-major is U = Lᵀ column-major (upper); potri then fills the upper triangle of the
    # inverse in column-major order, which is the lower one in row-major order.
    inverse, info = potri(chol.contiguous().numpy().T, lower=0)
    if info != 0:
        raise ValueError(f"cholesky_inverse: LAPACK potri failed (info {info}).")
    return _symmetric_from(torch.from_numpy(inverse.T), upper=False)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype({torch.float64: "float64", torch.float32: "float32"}[dtype])


def quadratic_forms(
    features: torch.Tensor, matrix: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """φ_jᵀ G φ_j for every row φ_j of Φ and a symmetric G, from G's lower triangle.

    φᵀGφ = Σ_i φ_iᵀG_iiφ_i + 2 Σ_{i>k} φ_iᵀG_ikφ_k over strips of coordinates, one GEMM per strip
    of rows of G: about n·d²·(1 + STRIP/d) flops instead of 2·n·d², with temporaries of
    ``chunk`` x d.

    Args:
        features: (n, d) Φ.
        matrix: (d, d) G, symmetric (only its lower triangle is read).
    Returns:
        (n,).
    """
    n, d = features.shape
    out = torch.zeros(n, dtype=features.dtype)
    for r0 in range(0, n, chunk):
        rows = features[r0 : r0 + chunk]
        total = out[r0 : r0 + chunk]
        for i0 in range(0, d, STRIP):
            i1 = min(i0 + STRIP, d)
            # (rows_i G_i,0:i1) . rows_0:i1, with the strictly lower part counted twice.
            product = rows[:, i0:i1] @ matrix[i0:i1, :i1]
            total += 2.0 * (product[:, :i0] * rows[:, :i0]).sum(1)
            total += (product[:, i0:i1] * rows[:, i0:i1]).sum(1)
    return out


def gemm_rate(size: int = 2048, repeats: int = 3) -> float:
    """This machine's float64 matrix-multiply rate now, in GFLOP/s (best of ``repeats``
    products of two size x size matrices, 2·size³ flops each): what the dense stages run at."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator, dtype=DTYPE)
    b = torch.randn(size, size, generator=generator, dtype=DTYPE)
    best = float("inf")
    _ = a @ b
    for _ in range(repeats):
        start = time.perf_counter()
        _ = a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth now, in GB/s: the best of ``repeats`` copies of a
    ``megabytes`` float64 array (far larger than the caches) into another, counting the bytes
    read and written: what the stages that stream large matrices are limited by."""
    size = megabytes * 2**20 // 8
    source = torch.ones(size, dtype=DTYPE)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * size * 8 / best / 1e9


@dataclass(frozen=True)
class StageCost:
    """One dense step as it ran: its measured time next to the work it had to do, so that a
    benchmark can set it against the machine's limits (:func:`gemm_rate`,
    :func:`memory_bandwidth`).

    Attributes:
        name: what the step computes.
        seconds: wall time.
        flops: floating-point operations of the algorithm used (a multiply-add counts two).
        bytes: the least memory traffic it needs: every operand read once and every result
            written once, 8 bytes per float64 entry.
    """

    name: str
    seconds: float
    flops: float
    bytes: float


class StageLog:
    """Where the time of a computation went, one :class:`StageCost` per dense step, in order."""

    def __init__(self) -> None:
        self.entries: list[StageCost] = []

    @contextmanager
    def stage(self, name: str, flops: float, nbytes: float) -> Iterator[None]:
        """Time the block as one step doing ``flops`` operations over ``nbytes`` bytes."""
        start = time.perf_counter()
        yield
        self.entries.append(StageCost(name, time.perf_counter() - start, flops, nbytes))


@dataclass(frozen=True)
class CGResult:
    """The outcome of :func:`conjugate_gradient`.

    Attributes:
        solution: same shape as the right-hand side.
        iterations: iterations run (the slowest column's).
        converged: every column reached ``rtol``.
        relative_residuals: (k,) ‖b - A x‖ / ‖b‖ per column at the end.
        nonpositive_curvature: a search direction met dᵀA d <= 0, or residuals grew by 1e6
            (what a singular or indefinite operator does); the run stopped there.
    """

    solution: torch.Tensor
    iterations: int
    converged: bool
    relative_residuals: torch.Tensor
    nonpositive_curvature: bool


def conjugate_gradient(
    matvec: MatVec,
    rhs: torch.Tensor,
    *,
    rtol: float,
    max_iter: int,
    preconditioner: MatVec | None = None,
) -> CGResult:
    """(Preconditioned) conjugate gradients for A x = b, A symmetric positive definite.

    All columns run together, each with its own step sizes; a column stops moving once its
    residual is below ``rtol`` times its right-hand side's norm.

    Args:
        matvec: v (p, k) -> A v.
        rhs: (p,) or (p, k).
        rtol: relative residual at which a column is done.
        max_iter: iterations before giving up (``converged`` is then False).
        preconditioner: optional r (p, k) -> M⁻¹ r with M ≈ A symmetric positive definite.
    """
    squeeze = rhs.ndim == 1
    b = rhs[:, None] if squeeze else rhs
    apply_m = preconditioner if preconditioner is not None else (lambda r: r)
    x = torch.zeros_like(b)
    r = b.clone()
    z = apply_m(r)
    d = z.clone()
    rz = (r * z).sum(0)
    b_norm = b.norm(dim=0)
    target = rtol * b_norm
    iterations = 0
    nonpositive = False
    while True:
        r_norm = r.norm(dim=0)
        active = r_norm > target
        if not bool(active.any()) or iterations >= max_iter:
            break
        ad = matvec(d)
        curvature = (d * ad).sum(0)
        # A singular operator shows up as a residual that grows instead of curvature <= 0.
        if bool(((curvature <= 0) & active).any()) or bool((r_norm > 1e6 * b_norm).any()):
            nonpositive = True
            break
        alpha = torch.where(active, rz / curvature.clamp_min(1e-300), torch.zeros_like(rz))
        x += alpha * d
        r -= alpha * ad
        z = apply_m(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(active, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        d = z + beta * d
        rz = rz_new
        iterations += 1
    relative = r.norm(dim=0) / b_norm.clamp_min(1e-300)
    return CGResult(
        solution=x[:, 0] if squeeze else x,
        iterations=iterations,
        converged=not nonpositive and bool((r.norm(dim=0) <= target).all()),
        relative_residuals=relative,
        nonpositive_curvature=nonpositive,
    )


@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenvalues of a Hessian.

    Attributes:
        smallest: most negative (or smallest) eigenvalue.
        largest: largest eigenvalue.
        method: "eigvalsh" (exact, from the dense Hessian) or "lanczos" (k HVPs; the smallest
            Ritz value is an upper bound on the true smallest eigenvalue).
        iterations: Lanczos steps (0 for eigvalsh).
    """

    smallest: float
    largest: float
    method: str
    iterations: int = 0


def spectrum_from_hessian(hessian: torch.Tensor) -> Spectrum:
    """Exact extreme eigenvalues of a dense symmetric matrix."""
    values = torch.linalg.eigvalsh(hessian)
    return Spectrum(float(values[0]), float(values[-1]), "eigvalsh")


def lanczos_spectrum(hvp: MatVec, n_params: int, iterations: int = 80, seed: int = 0) -> Spectrum:
    """Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        hvp: v (p,) -> H v.
        n_params: p.
        iterations: Krylov dimension (capped at p).
        seed: start vector seed.
    """
    k = min(iterations, n_params)
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n_params, generator=generator, dtype=DTYPE)
    q /= q.norm()
    basis = torch.empty(k, n_params, dtype=DTYPE)
    alphas, betas = [], []
    beta = 0.0
    q_prev = torch.zeros_like(q)
    steps = 0
    for j in range(k):
        basis[j] = q
        w = hvp(q) - beta * q_prev
        alpha = float(q @ w)
        w = w - alpha * q
        # Full reorthogonalisation (twice is enough) keeps ghost eigenvalues out.
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        steps = j + 1
        beta = float(w.norm())
        if beta < 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q_prev, q = q, w / beta
    t = torch.diag(torch.tensor(alphas, dtype=DTYPE))
    off = torch.tensor(betas[: steps - 1], dtype=DTYPE)
    t += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t)
    return Spectrum(float(ritz[0]), float(ritz[-1]), "lanczos", steps)


__all__ = [
    "CGResult",
    "Spectrum",
    "StageCost",
    "StageLog",
    "cholesky",
    "cholesky_inverse",
    "cholesky_solve",
    "conjugate_gradient",
    "gemm_rate",
    "lanczos_spectrum",
    "memory_bandwidth",
    "quadratic_forms",
    "row_gram",
    "spectrum_from_hessian",
    "weighted_gram",
]
