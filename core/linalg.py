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

import torch

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


#: Columns per strip of the symmetric products below: large enough for efficient GEMMs, small
#: enough that skipping the strict upper triangle saves most of its half. Measured by thread CPU
#: time on one core (1000 x 1280 features): 128 formed ΦΦᵀ in 47-50 ms and ΦᵀWΦ in 64-68 ms,
#: 256 in 54-59 and 76-82 ms, halving recursively to blocks of 160-320 no faster than 256.
STRIP = 128

#: Rows per pass of :func:`weighted_gram`: bounds its temporary (the weighted rows) to ROWS x d.
ROWS = 8192

# Every dense step here runs in torch's BLAS and LAPACK (MKL) on torch's threads. scipy's
# OpenBLAS has a true syrk and a faster Cholesky on this project's AMD machine (single-threaded,
# by thread CPU time: 33 GFLOP/s against 26 for the strips below; 27 against 15 for potrf), but
# its own thread pool spins after each call and fights torch's: measured on the shared 2-core
# machine, the demo's exact first-order scores took 0.29-0.93 s with OpenBLAS on two threads
# against 0.14-0.16 s all in torch (0.11-0.14 s with OpenBLAS on one thread, which a library
# cannot choose for its caller).


def mirror_lower(matrix: torch.Tensor) -> torch.Tensor:
    """Make a square ``matrix`` exactly symmetric from its lower triangle, in place (the upper
    one is overwritten by a copy), one STRIP-wide block at a time: a quarter of the memory
    traffic of adding its two triangles. Returns ``matrix``."""
    size = matrix.shape[0]
    for i0 in range(0, size, STRIP):
        i1 = min(i0 + STRIP, size)
        tile = matrix[i0:i1, i0:i1]
        tile.copy_(tile.tril() + tile.tril(-1).mT)
        matrix[:i0, i0:i1].copy_(matrix[i0:i1, :i0].mT)
    return matrix


def weighted_gram(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Φᵀ diag(w) Φ, exactly symmetric, computing only its lower triangle (then mirrored).

    A symmetric rank-k update: the lower triangle is formed one strip of rows at a time, rows
    i0:i1 against columns 0:i1, as one GEMM each: about n·d²·(1 + STRIP/d) flops instead of a
    general product's 2·n·d² (BLAS syrk does n·d², but torch does not expose it; see above). The
    weights may have any sign; rows with w = 0 are skipped; ``ROWS`` rows at a time bound the
    temporary Φ∘w.

    Args:
        features: (n, d) Φ.
        weights: (n,) w.
    Returns:
        (d, d), a new tensor.
    """
    d = features.shape[1]
    weights = weights.to(features.dtype)
    nonzero = weights != 0
    if not bool(nonzero.all()):
        features, weights = features[nonzero], weights[nonzero]
    out = torch.zeros(d, d, dtype=features.dtype)
    add_weighted_gram(out, features, weights)
    return mirror_lower(out)


def add_weighted_gram(out: torch.Tensor, features: torch.Tensor, weights: torch.Tensor) -> None:
    """Add Φᵀ diag(w) Φ to the lower triangle of ``out`` (d, d), in the strips of
    :func:`weighted_gram`, ``ROWS`` rows at a time. The strict upper triangle is left partly
    written: call :func:`mirror_lower` once every part has been added (a sum over blocks of
    rows costs one mirror, not one per block)."""
    d = features.shape[1]
    for r0 in range(0, features.shape[0], ROWS):
        rows = features[r0 : r0 + ROWS]
        weighted = rows * weights[r0 : r0 + ROWS, None]
        for i0 in range(0, d, STRIP):
            i1 = min(i0 + STRIP, d)
            out[i0:i1, :i1].addmm_(weighted[:, i0:i1].T, rows[:, :i1])


def row_gram(features: torch.Tensor) -> torch.Tensor:
    """ΦΦᵀ, the (n, n) Gram matrix of the rows, exactly symmetric, from its lower triangle in
    strips as :func:`weighted_gram` (about n²·d·(1 + STRIP/n) flops; Φ is read in place).

    Args:
        features: (n, d) Φ.
    Returns:
        (n, n), a new tensor.
    """
    n = features.shape[0]
    out = torch.empty(n, n, dtype=features.dtype)
    for i0 in range(0, n, STRIP):
        i1 = min(i0 + STRIP, n)
        out[i0:i1, :i1] = features[i0:i1] @ features[:i1].T
    return mirror_lower(out)


def cholesky(matrix: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor L (L Lᵀ = A) of a symmetric matrix, from its lower triangle.

    Args:
        matrix: (p, p) symmetric A.
        overwrite: factorise in A's own memory (A is destroyed): no second p x p matrix, which
            for the ten-class Hessian (p = 12,800) is 1.3 GB.
    Returns:
        (L, info): info > 0 means A is not (numerically) positive definite, or not finite (NaN
        or inf in A reaches the diagonal of its factor), and L is then not a factor.
    """
    factor = (
        matrix
        if overwrite and matrix.is_contiguous()
        else matrix.clone(memory_format=torch.contiguous_format)
    )
    info = torch.empty((), dtype=torch.int32)
    # LAPACK works on column-major matrices: A's transpose is one, in A's own memory, and its
    # upper factor (Uᵀ U = A, read from Aᵀ's upper triangle: A's lower one) is L in A's
    # row-major layout. Without the transpose torch copies A into column-major order and back:
    # the demo's 1000-square factor took 12.4-13.7 ms inside the solver, now 7.4-7.9 ms, the
    # speed of MKL's potrf alone (`python -m bench.peers`: its step table and kernel section).
    torch.linalg.cholesky_ex(factor.mT, upper=True, out=(factor.mT, info))
    if int(info) == 0 and not bool(torch.isfinite(factor.diagonal()).all()):
        return factor, 1
    return factor, int(info)


def cholesky_inverse(chol: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ from a lower Cholesky factor, made exactly symmetric (2p³/3 flops).
    Args: chol (p, p). Returns: (p, p)."""
    return mirror_lower(torch.cholesky_inverse(chol).contiguous())


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
        flops: floating-point operations the step needs (a multiply-add counts two; a
            symmetric product counts one triangle, what BLAS syrk does).
        bytes: the least memory traffic it needs: every operand read once and every result
            written once, 8 bytes per float64 entry.
    """

    name: str
    seconds: float
    flops: float
    bytes: float


class StageLog:
    """Where the time of a computation went, one :class:`StageCost` per dense step, in order.

    A solver keeps its log for as long as it serves queries (a server's lifetime), so only the
    latest ``limit`` entries are kept.
    """

    def __init__(self, limit: int = 1024) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1; got {limit}.")
        self.limit = limit
        self.entries: list[StageCost] = []

    @contextmanager
    def stage(self, name: str, flops: float, nbytes: float) -> Iterator[None]:
        """Time the block as one step doing ``flops`` operations over ``nbytes`` bytes."""
        start = time.perf_counter()
        yield
        self.entries.append(StageCost(name, time.perf_counter() - start, flops, nbytes))
        if len(self.entries) > self.limit:
            del self.entries[: len(self.entries) - self.limit]


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


#: Up to this many columns, Xᵀ T is formed as (Tᵀ X)ᵀ (see :func:`t_times`).
THIN_COLUMNS = 16


def t_times(matrix: torch.Tensor, thin: torch.Tensor) -> torch.Tensor:
    """Xᵀ T for a tall ``matrix`` X (n, d) and T (n, k): the gradient and Hessian-vector products
    of a multi-class model (k = C outputs, or C·vectors).

    For a few columns (2 <= k <= :data:`THIN_COLUMNS`) the BLAS under torch takes a slow path for
    the transposed product: ``X.T @ T`` with n = 48,000, d = 1280 took 0.68-0.71 s for k = 2 and
    10 against 0.08-0.19 s as ``(T.T @ X).T`` at load 1.7, and 2.8-11 s against 0.14-0.37 s at
    load 9 (2 cores, torch 2.14; ``python -m bench.thin_products``). At k = 1 both are a
    matrix-vector product; from k = 30 ``X.T @ T`` is as fast or faster. Returns: (d, k),
    possibly a transposed view.
    """
    if 2 <= thin.shape[1] <= THIN_COLUMNS:
        return (thin.T @ matrix).T
    return matrix.T @ thin


def times_thin(matrix: torch.Tensor, thin: torch.Tensor) -> torch.Tensor:
    """X V for a tall ``matrix`` X (n, d) and a thin V (d, k): the training features against a
    few solutions, what every explanation computes. Taken as (Vᵀ Xᵀ)ᵀ, which the BLAS under
    torch runs faster than ``X @ V`` for the column counts an explanation has: n = 60,000,
    d = 1280, k = 81 and 100 took 0.25 and 0.24 s against 0.41 s; at k = 1 and 10 the two are
    within 10% (2 cores, torch 2.14, load 1.2; ``python -m bench.thin_products --n 60000``).
    Returns: (n, k), a transposed view.
    """
    return (thin.T @ matrix.T).T


#: Rows per block of :func:`through_rows`: a block of 1280-d float64 rows (5 MB) stays in the
#: cache between its two products. Measured by ``python -m bench.thin_products``.
THROUGH_ROWS = 512


def through_rows(
    matrix: torch.Tensor,
    thin: torch.Tensor,
    middle: Callable[[int, int, torch.Tensor], torch.Tensor],
    rows: int | None = None,
) -> torch.Tensor:
    """Xᵀ m(X V) for a tall ``matrix`` X (n, d) and a thin V (d, k), one block of rows at a time:
    each block's X V is formed, passed through ``middle(start, stop, XV_block)`` (a row-wise map,
    (b, k) -> (b, k)), and its Xᵀ(...) added up while the block is still in the cache. The
    Hessian-vector products of fitting are this with m the loss's curvature; taken as two
    whole products they read X twice from memory at the slow rate of thin GEMMs.

    Returns: (d, k), a transposed view.
    """
    rows = THROUGH_ROWS if rows is None else rows
    n, d = matrix.shape
    thin_t = thin.T.contiguous()
    out = torch.zeros(thin.shape[1], d, dtype=matrix.dtype)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        block = matrix[r0:r1]
        products = (thin_t @ block.T).T
        out.addmm_(middle(r0, r1, products).T, block)
    return out.T


__all__ = [
    "THIN_COLUMNS",
    "THROUGH_ROWS",
    "CGResult",
    "Spectrum",
    "StageCost",
    "StageLog",
    "add_weighted_gram",
    "cholesky",
    "cholesky_inverse",
    "cholesky_solve",
    "conjugate_gradient",
    "gemm_rate",
    "lanczos_spectrum",
    "memory_bandwidth",
    "mirror_lower",
    "quadratic_forms",
    "row_gram",
    "spectrum_from_hessian",
    "t_times",
    "through_rows",
    "times_thin",
    "weighted_gram",
]
