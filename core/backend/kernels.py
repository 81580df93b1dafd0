"""Per-shard numerical kernels: what a worker computes on the training rows it holds.

Each function here takes one :class:`~core.backend.shards.Shard` (and the shard's per-example
quantities computed earlier) and returns a partial result that the driver sums over shards, or a
per-row result that stays on the worker. They apply the same formulas as the in-process models
(:mod:`core.models`) and engine (:mod:`core.influence`), row block by row block, in float64 on
float64 copies of the (float32) features, so a sum over shards equals the in-process value up to
the order of floating-point additions. The per-example loss derivatives come from
:mod:`core.losses`, as in-process.

Parameters are laid out θ[k·C + c] = W[k, c] as everywhere else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core.backend.shards import Shard, make_shard
from core.influence import InverseForms
from core.linalg import DTYPE, add_weighted_gram, mirror_lower, t_times, through_rows
from core.losses import Loss, LossDerivatives, curvature_rows
from core.ood import DISTANCE_RTOL

#: Rows converted to float64 and processed at once (bounds a kernel's temporary memory).
CHUNK_ROWS = 4096
#: Bound on the float64 entries of a curvature kernel's right-hand-side block.
CURVATURE_BLOCK = 1 << 24


def _blocks(n: int, size: int = CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


_SCRATCH = threading.local()


def _scratch(slot: int, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float64 block reused across calls in this thread.

    A fresh block of this size is ~40 MB that the OS hands out page by page, and on a busy
    machine those page faults cost more than the arithmetic (a float32 -> float64 copy into new
    memory measured ~10x slower than into memory already touched). Each slot is valid until the
    next call with the same slot in the same thread.
    """
    cache = getattr(_SCRATCH, "blocks", None)
    if cache is None:
        cache = _SCRATCH.blocks = {}
    block = cache.get((slot, cols))
    if block is None or block.shape[0] < rows:
        block = torch.empty(max(rows, CHUNK_ROWS), cols, dtype=DTYPE)
        cache[(slot, cols)] = block
    return block[:rows]


def _rows(shard: Shard, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the shard's features as float64, in scratch slot 0 (float64 shards
    are returned as a view). Valid until the next ``_rows`` call in this thread."""
    rows = shard.features[start:stop]
    if rows.dtype == np.float64:
        return torch.from_numpy(rows)
    return _scratch(0, stop - start, rows.shape[1]).copy_(torch.from_numpy(rows))


def _weights(weights: np.ndarray | None, start: int, stop: int) -> torch.Tensor | None:
    return None if weights is None else torch.from_numpy(weights[start:stop])


@dataclass
class ShardTerms:
    """A shard's loss derivatives at some θ, kept on the worker that computed them, with the
    partial sums of the objective and its gradient.

    Attributes:
        derivs: per-example loss, d1 (n_s, C), d2 and factor (n_s, C, r) (unweighted).
        value: Σ_i w_i ℓ_i over the shard.
        gradient: (p,) Σ_i w_i φ_i ⊗ d1_i over the shard.
    """

    derivs: LossDerivatives
    value: float
    gradient: torch.Tensor


def objective_terms(
    shard: Shard, weights: np.ndarray | None, theta: np.ndarray, loss: Loss, n_outputs: int
) -> ShardTerms:
    """Loss derivatives of the shard's rows at θ and their contribution to R(θ) and ∇R(θ)
    (before the 1/n and the λ terms, which the driver adds)."""
    d = shard.features.shape[1]
    W = torch.from_numpy(np.asarray(theta, dtype=np.float64)).reshape(d, n_outputs)
    labels = torch.from_numpy(shard.labels)
    parts = []
    gradient = torch.zeros(d, n_outputs, dtype=DTYPE)
    value = 0.0
    for start, stop in _blocks(shard.size):
        X = _rows(shard, start, stop)
        derivs = loss.derivatives(X @ W, labels[start:stop])
        parts.append(derivs)
        w = _weights(weights, start, stop)
        if w is None:
            value += float(derivs.loss.sum())
            gradient += t_times(X, derivs.d1)
        else:
            value += float(w @ derivs.loss)
            gradient += t_times(X, w[:, None] * derivs.d1)
    derivs = LossDerivatives(*(torch.cat(field) for field in zip(*parts, strict=True)))
    return ShardTerms(derivs, value, gradient.reshape(-1))


def terms_partial(terms: ShardTerms) -> tuple[float, torch.Tensor]:
    """What a Newton step sums over shards: (Σ w ℓ, Σ w ∇ℓ)."""
    return terms.value, terms.gradient


def hessian_part(
    shard: Shard,
    terms: ShardTerms,
    weights: np.ndarray | None,
    n_total: int,
    n_outputs: int,
) -> torch.Tensor:
    """Σ_i (w_i/n) ∇²ℓ_i over the shard, (p, p), as :meth:`core.models.LinearModel.hessian`
    forms it (blocks per pair of outputs); the driver adds λI."""
    d, c = shard.features.shape[1], n_outputs
    d2 = terms.derivs.d2
    out = torch.zeros(d, c, d, c, dtype=DTYPE)
    for start, stop in _blocks(shard.size):
        X = _rows(shard, start, stop)
        w = _weights(weights, start, stop)
        scaled = (torch.ones(stop - start, dtype=DTYPE) if w is None else w) / n_total
        weighted = _scratch(1, stop - start, d)
        for a in range(c):
            for b in range(a, c):
                torch.mul(X, (scaled * d2[start:stop, a, b])[:, None], out=weighted)
                block = X.T @ weighted
                out[:, a, :, b] += block
                if b != a:
                    out[:, b, :, a] += block
    return out.reshape(d * c, d * c)


def class_basis_check(terms: ShardTerms, rotation: torch.Tensor) -> tuple[float, float]:
    """(largest |entry| of the rotated curvature QᵀA_jQ along the all-ones class direction,
    largest |entry| of A_j) over the shard's rows: the first is zero to rounding for a
    shift-invariant loss, which the driver checks before forming the class basis."""
    d2 = terms.derivs.d2
    if d2.numel() == 0:
        return 0.0, 0.0
    rotated = rotation.T @ d2 @ rotation
    return float(rotated[:, -1, :].abs().amax()), float(d2.abs().amax())


def class_basis_part(
    shard: Shard,
    terms: ShardTerms,
    weights: np.ndarray | None,
    n_total: int,
    rotation: torch.Tensor,
) -> torch.Tensor:
    """Σ_i (w_i/n) (φ_iφ_iᵀ) ⊗ (QᵀA_iQ)[:C-1, :C-1] over the shard: its part of the Hessian in
    the class basis (:meth:`core.models.LinearModel.class_basis_hessian`), (d·(C - 1)) square;
    the driver adds λI. Each of the C(C - 1)/2 blocks a <= b is summed from its lower triangle
    (:func:`core.linalg.add_weighted_gram`) over blocks of rows, then mirrored once."""
    d, h = shard.features.shape[1], rotation.shape[0] - 1
    rotated = (rotation.T @ terms.derivs.d2 @ rotation)[:, :h, :h]
    pairs = [(a, b) for a in range(h) for b in range(a, h)]
    sums = torch.zeros(len(pairs), d, d, dtype=DTYPE)
    for start, stop in _blocks(shard.size):
        X = _rows(shard, start, stop)
        w = _weights(weights, start, stop)
        scaled = (torch.ones(stop - start, dtype=DTYPE) if w is None else w) / n_total
        for i, (a, b) in enumerate(pairs):
            add_weighted_gram(sums[i], X, scaled * rotated[start:stop, a, b])
    out = torch.empty(d * h, d * h, dtype=DTYPE)
    blocks = out.view(d, h, d, h)
    for i, (a, b) in enumerate(pairs):
        block = mirror_lower(sums[i])
        blocks[:, a, :, b] = block
        if b != a:
            blocks[:, b, :, a] = block
    return out


def hvp_part(
    shard: Shard,
    terms: ShardTerms,
    weights: np.ndarray | None,
    denominator: int,
    n_outputs: int,
    vectors: np.ndarray,
    local: np.ndarray | None = None,
) -> torch.Tensor:
    """Σ_i (w_i/denominator) ∇²ℓ_i V over the shard's rows (or only the ``local`` ones, for a
    minibatch), (p, k); the driver adds λV."""
    d, c = shard.features.shape[1], n_outputs
    V = torch.from_numpy(np.asarray(vectors, dtype=np.float64))
    k = V.shape[1]
    V3 = V.reshape(d, c, k)
    out = torch.zeros(d, c, k, dtype=DTYPE)
    if local is not None:
        X = torch.from_numpy(shard.features[local]).to(DTYPE)
        idx = torch.from_numpy(np.asarray(local, dtype=np.int64))
        d2 = terms.derivs.d2[idx]
        w = None if weights is None else torch.from_numpy(weights[local])
        segments = [(X, d2, w)]
    else:
        segments = (
            (_rows(shard, a, b), terms.derivs.d2[a:b], _weights(weights, a, b))
            for a, b in _blocks(shard.size)
        )
    columns = V3.reshape(d, c * k)  # columns (class, vector)
    for X, d2, w in segments:
        scale = (torch.ones(X.shape[0], dtype=DTYPE) if w is None else w) / denominator
        # Both products with X while a block is in the cache, as in-process.
        out += through_rows(X, columns, curvature_rows(d2, scale, k)).reshape(d, c, k)
    return out.reshape(d * c, k)


def gradient_products(shard: Shard, terms: ShardTerms, vectors: np.ndarray) -> np.ndarray:
    """∇ℓ_jᵀ v for the shard's rows j and (p, k) vectors. Returns: (k, n_s)."""
    d, c = shard.features.shape[1], terms.derivs.d1.shape[1]
    V3 = torch.from_numpy(np.asarray(vectors, dtype=np.float64)).reshape(d, c, -1)
    out = np.empty((V3.shape[2], shard.size))
    for start, stop in _blocks(shard.size):
        projected = torch.einsum("jd,dck->kjc", _rows(shard, start, stop), V3)
        out[:, start:stop] = (projected * terms.derivs.d1[None, start:stop]).sum(-1).numpy()
    return out


@dataclass
class ShardCurvature:
    """What the Newton-corrected estimate needs per training point, kept on the worker.

    Attributes:
        quadratic: (n_s, C, C) Q_j = (φ_j ⊗ I_C)ᵀ (H + δI)⁻¹ (φ_j ⊗ I_C).
        corrected: (n_s, C) e_j, with the corrected score (1/n) s_testᵀ (φ_j ⊗ e_j).
    """

    quadratic: torch.Tensor
    corrected: torch.Tensor


def curvature(
    shard: Shard, terms: ShardTerms, solver: torch.Tensor | InverseForms, n_total: int
) -> ShardCurvature:
    """Q_j and the Woodbury-corrected residuals e_j of the shard's rows, and (as
    :meth:`core.influence.InfluenceEngine._residuals`)
    e_j = d1_j + B_j (nI - B_jᵀQ_jB_j)⁻¹ B_jᵀ Q_j d1_j.

    ``solver`` is the lower Cholesky factor L of H + δI, Q_j = (L⁻¹(φ_j ⊗ I))ᵀ(L⁻¹(φ_j ⊗ I))
    (one output: d² flops per row), or an inverse (:class:`~core.influence.InverseForms`, C
    outputs), whose blocks give Q_j as C(C + 1)/2 quadratic forms, or C(C - 1)/2 in the class
    basis, of d² flops each per row, where triangular solves would cost C·p² per row."""
    d = shard.features.shape[1]
    d1, factor = terms.derivs.d1, terms.derivs.factor
    c = d1.shape[1]
    p = d * c
    rows = max(1, min(CHUNK_ROWS, CURVATURE_BLOCK // max(1, p * c)))
    if isinstance(solver, InverseForms):
        rows = CHUNK_ROWS
    q = torch.empty(shard.size, c, c, dtype=DTYPE)
    eye = torch.eye(c, dtype=DTYPE)
    for start, stop in _blocks(shard.size, rows):
        phi = _rows(shard, start, stop)
        m = stop - start
        if isinstance(solver, InverseForms):
            q[start:stop] = solver.forms(phi)
            continue
        cholesky = solver
        if c == 1:
            # Row j of Φ L⁻ᵀ is (L⁻¹φ_j)ᵀ: solved in place of a scratch block of Φ's shape.
            solved = _scratch(1, m, d)
            torch.linalg.solve_triangular(cholesky.mT, phi, upper=True, left=False, out=solved)
            q[start:stop, 0, 0] = torch.einsum("jd,jd->j", solved, solved)
            continue
        # Columns φ_j ⊗ e_a, laid out (p, j, a).
        rhs = (phi[:, :, None, None] * eye[None, None, :, :]).reshape(m, p, c)
        rhs = rhs.permute(1, 0, 2).reshape(p, m * c)
        solved = torch.linalg.solve_triangular(cholesky, rhs, upper=False).reshape(p, m, c)
        q[start:stop] = torch.einsum("pja,pjb->jab", solved, solved)
    inner = factor.transpose(1, 2) @ q @ factor
    rhs = factor.transpose(1, 2) @ q @ d1[:, :, None]
    eye_r = torch.eye(inner.shape[-1], dtype=DTYPE)
    z = torch.linalg.solve(n_total * eye_r - inner, rhs)
    return ShardCurvature(q, d1 + (factor @ z)[:, :, 0])


def _residuals(terms: ShardTerms, curv: ShardCurvature | None, estimate: str) -> torch.Tensor:
    if estimate == "first_order":
        return terms.derivs.d1
    if curv is None:
        raise ValueError("the corrected estimate needs the shard's curvature")
    return curv.corrected


@dataclass
class MarginQuery:
    """What the exact-in-the-margin estimate needs about m test points (broadcast to the
    workers; see :meth:`core.influence.InfluenceEngine.score_estimates`).

    Attributes:
        solves: (m, C, p) (H + δI)⁻¹ (φ_t ⊗ e_c), how θ must move to change output c of test
            point t (:meth:`core.influence.InfluenceEngine._unit_output_solves`).
        outputs: (m, C) the test points' outputs s = Wᵀφ_t at θ̂.
        labels: (m,) the labels whose loss is explained.
        loss: the model's loss of its outputs.
    """

    solves: torch.Tensor
    outputs: torch.Tensor
    labels: torch.Tensor
    loss: Loss


def _output_changes(
    X: torch.Tensor, residuals: torch.Tensor, solves: torch.Tensor, n_total: int
) -> torch.Tensor:
    """Δs[t, j] = (1/n) Σ_a (φ_jᵀ U_b)[a] e_j[a] for rows X (k, d) with residuals (k, C), as
    :meth:`core.influence.InfluenceEngine._output_changes`. Returns: (m, k, C)."""
    k, d = X.shape
    m, c = solves.shape[0], solves.shape[1]
    out = torch.empty(m, k, c, dtype=DTYPE)
    for t in range(m):
        units = solves[t].reshape(c, d, c).permute(1, 0, 2).reshape(d, c * c)
        projected = (X @ units).reshape(k, c, c)
        out[t] = (projected * residuals[:, None, :]).sum(-1) / n_total
    return out


def output_changes_block(
    shard: Shard, curv: ShardCurvature, solves: torch.Tensor, n_total: int
) -> np.ndarray:
    """Predicted output changes of m test points when each of the shard's rows is removed
    (Newton-corrected). Returns: (m, n_s, C)."""
    m, c = solves.shape[0], solves.shape[1]
    out = np.empty((m, shard.size, c))
    for start, stop in _blocks(shard.size):
        X = _rows(shard, start, stop)
        out[:, start:stop] = _output_changes(X, curv.corrected[start:stop], solves, n_total).numpy()
    return out


def _margin_scores(
    X: torch.Tensor, residuals: torch.Tensor, query: MarginQuery, n_total: int
) -> np.ndarray:
    """ℓ(s_t + Δs_tj) - ℓ(s_t) for rows X (k, d). Returns: (m, k)."""
    changes = _output_changes(X, residuals, query.solves, n_total)
    return query.loss.value_change(query.outputs, changes, query.labels).numpy()


def _linear_scores(
    X: torch.Tensor, residuals: torch.Tensor, s_test: np.ndarray, n_total: int
) -> np.ndarray:
    """(1/n) s_tᵀ (φ_j ⊗ e_j) for rows X (k, d). Returns: (m, k)."""
    d, c = X.shape[1], residuals.shape[1]
    S = torch.from_numpy(np.asarray(s_test, dtype=np.float64)).reshape(-1, d, c)
    projected = torch.einsum("jd,tdc->tjc", X, S)
    return ((projected * residuals[None]).sum(-1) / n_total).numpy()


def score_block(
    shard: Shard,
    terms: ShardTerms,
    curv: ShardCurvature | None,
    query: np.ndarray | MarginQuery,
    estimate: str,
    n_total: int,
) -> np.ndarray:
    """Scores of the shard's rows for each test point, as
    :meth:`core.influence.InfluenceEngine.score_estimates` forms them: (1/n) s_tᵀ (φ_j ⊗ e_j)
    for the linear estimates (``query`` is s_test, (m, p)); ℓ(s_t + Δs_tj) - ℓ(s_t) for
    "margin" (``query`` a :class:`MarginQuery`). Returns: (m, n_s)."""
    residuals = _residuals(terms, curv, estimate)
    m = query.outputs.shape[0] if isinstance(query, MarginQuery) else query.shape[0]
    out = np.empty((m, shard.size))
    for start, stop in _blocks(shard.size):
        X = _rows(shard, start, stop)
        out[:, start:stop] = _block_scores(X, residuals[start:stop], query, estimate, n_total)
    return out


def _block_scores(
    X: torch.Tensor,
    residuals: torch.Tensor,
    query: np.ndarray | MarginQuery,
    estimate: str,
    n_total: int,
) -> np.ndarray:
    if estimate == "margin":
        if not isinstance(query, MarginQuery):
            raise ValueError("the margin estimate needs a MarginQuery")
        return _margin_scores(X, residuals, query, n_total)
    return _linear_scores(X, residuals, np.asarray(query), n_total)


def score_rows(
    shard: Shard,
    terms: ShardTerms,
    curv: ShardCurvature | None,
    query: np.ndarray | MarginQuery,
    estimate: str,
    n_total: int,
    local: np.ndarray,
) -> np.ndarray:
    """Scores of the listed rows only (see :func:`score_block`). Returns: (m, len(local))."""
    residuals = _residuals(terms, curv, estimate)[torch.from_numpy(local)]
    X = torch.from_numpy(shard.features[local]).to(DTYPE)
    return _block_scores(X, residuals, query, estimate, n_total)


def self_influence_part(
    shard: Shard,
    terms: ShardTerms,
    curv: ShardCurvature,
    estimate: str,
    n_total: int,
    theta: np.ndarray,
    loss: Loss,
) -> np.ndarray:
    """Each of the shard's rows' influence on its own loss, as
    :meth:`core.influence.InfluenceEngine.self_influence`: (1/n) d1_jᵀ Q_j e_j for the linear
    estimates (e_j = d1_j for the first order); for "margin" ℓ(s_j + Δs_j) - ℓ(s_j) with the
    row's own outputs moved by Δs_j = (1/n) Q_j e_j. (n_s,)."""
    d1 = terms.derivs.d1
    if estimate == "margin":
        changes = torch.einsum("jab,jb->ja", curv.quadratic, curv.corrected) / n_total
        scores = torch.from_numpy(training_scores(shard, theta, d1.shape[1]))
        labels = torch.from_numpy(shard.labels)
        return loss.value_change(scores, changes[:, None, :], labels)[:, 0].numpy()
    residuals = d1 if estimate == "first_order" else curv.corrected
    return (torch.einsum("ja,jab,jb->j", d1, curv.quadratic, residuals) / n_total).numpy()


def leverage_part(terms: ShardTerms, curv: ShardCurvature, n_total: int) -> np.ndarray:
    """h_j = (1/n) tr(B_jᵀ Q_j B_j) for the shard's rows. (n_s,)."""
    factor = terms.derivs.factor
    inner = factor.transpose(1, 2) @ curv.quadratic @ factor
    return (torch.diagonal(inner, dim1=1, dim2=2).sum(-1) / n_total).numpy()


def example_rows(
    shard: Shard,
    terms: ShardTerms,
    curv: ShardCurvature | None,
    estimate: str,
    local: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64) and residuals e_j of the listed rows: their gradients φ_j ⊗ e_j."""
    residuals = _residuals(terms, curv, estimate)[torch.from_numpy(local)]
    return np.array(shard.features[local], dtype=np.float64), residuals.numpy()


def training_scores(shard: Shard, theta: np.ndarray, n_outputs: int) -> np.ndarray:
    """Raw scores Wᵀφ_j of the shard's rows. Returns: (n_s, C)."""
    d = shard.features.shape[1]
    W = torch.from_numpy(np.asarray(theta, dtype=np.float64)).reshape(d, n_outputs)
    out = np.empty((shard.size, n_outputs))
    for start, stop in _blocks(shard.size):
        out[start:stop] = (_rows(shard, start, stop) @ W).numpy()
    return out


def correct_count(shard: Shard, theta: np.ndarray, n_outputs: int) -> int:
    """How many of the shard's rows the model classifies as labelled (as ``predict``)."""
    scores = torch.from_numpy(training_scores(shard, theta, n_outputs))
    predicted = (scores[:, 0] > 0).to(torch.int64) if n_outputs == 1 else scores.argmax(1)
    return int((predicted.numpy() == shard.labels).sum())


def distances(shard: Shard, point: np.ndarray) -> np.ndarray:
    """Euclidean distance of each of the shard's rows to ``point`` (d,), in float64. (n_s,)."""
    return neighbourhood_part(shard, point, 1)[0]


def neighbourhood_part(shard: Shard, point: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the shard's rows for one point, as :meth:`core.ood.NeighbourDistance.query`
    makes it in-process: the squared distances by the expansion |t|² + |x|² - 2 t·x (clamped at
    0), their k smallest, and each row's distance, recomputed as ‖t - x‖ on the rows where the
    expansion's cancellation could exceed :data:`core.ood.DISTANCE_RTOL` (near-duplicates).
    A matrix-vector product and a norm per block, no (rows, d) temporary.
    Returns: (n_s,) distances, (min(k, n_s),) smallest squared distances, ascending."""
    x = torch.from_numpy(np.asarray(point, dtype=np.float64))
    x_sq = x @ x
    squared = torch.empty(shard.size, dtype=DTYPE)
    bound = torch.empty(shard.size, dtype=DTYPE)
    eps = torch.finfo(DTYPE).eps
    for start, stop in _blocks(shard.size):
        rows = _rows(shard, start, stop)
        rows_sq = torch.linalg.vector_norm(rows, dim=1).square_()
        squared[start:stop] = (rows_sq + x_sq - 2.0 * (rows @ x)).clamp_min_(0.0)
        bound[start:stop] = (x.shape[0] + 2) * eps * (rows_sq + x_sq)
    kk = min(int(k), shard.size)
    smallest = torch.topk(squared, kk, largest=False).values
    out = squared.sqrt()
    close = torch.nonzero(squared <= bound / DISTANCE_RTOL).flatten().numpy()
    if len(close):
        rows = torch.from_numpy(shard.features[close]).to(DTYPE)
        out[close] = torch.linalg.vector_norm(rows - x, dim=1)
    return out.numpy(), np.sort(smallest.numpy())


def nearest_squared(shard: Shard, queries: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """The k smallest squared distances from each query to the shard's rows, formed as
    :meth:`core.ood.NeighbourDistance.statistics` forms them (|q|² + |t|² - 2 q·t, clamped at 0).
    Returns: (q, min(k, n_s)), ascending."""
    train = torch.from_numpy(shard.features).to(DTYPE)
    train_sq = (train * train).sum(1)
    Q = torch.from_numpy(np.asarray(queries, dtype=np.float64))
    kk = min(int(k), shard.size)
    out = np.empty((Q.shape[0], kk))
    for start in range(0, Q.shape[0], int(chunk)):
        block = Q[start : start + int(chunk)]
        squared = (block * block).sum(1)[:, None] + train_sq[None, :] - 2.0 * block @ train.T
        smallest = torch.topk(squared.clamp_min(0.0), kk, dim=1, largest=False).values
        out[start : start + len(block)] = smallest.numpy()
    return out


def with_intercept(shard: Shard) -> Shard:
    """The shard with a constant feature appended (``fit_intercept``)."""
    ones = np.ones((shard.size, 1), dtype=shard.features.dtype)
    return make_shard(shard.offset, np.concatenate([shard.features, ones], axis=1), shard.labels)


def nystroem_features(
    shard: Shard,
    landmarks: torch.Tensor,
    cholesky: torch.Tensor,
    gamma: float,
    chunk_size: int,
) -> Shard:
    """The shard's Nyström features φ(x) = L_m⁻¹ k(Z, x) (float64), exactly as
    :meth:`core.models.NystroemSVM.torch_transform` forms them."""
    from core.models import rbf_kernel

    out = np.empty((shard.size, landmarks.shape[0]))
    for start, stop in _blocks(shard.size, int(chunk_size)):
        X = _rows(shard, start, stop)
        k = rbf_kernel(landmarks, X, gamma)
        out[start:stop] = torch.linalg.solve_triangular(cholesky, k, upper=False).T.numpy()
    return make_shard(shard.offset, out, shard.labels)


__all__ = [
    "CHUNK_ROWS",
    "MarginQuery",
    "ShardCurvature",
    "ShardTerms",
    "correct_count",
    "curvature",
    "distances",
    "example_rows",
    "gradient_products",
    "hessian_part",
    "hvp_part",
    "leverage_part",
    "nearest_squared",
    "nystroem_features",
    "objective_terms",
    "output_changes_block",
    "score_block",
    "score_rows",
    "self_influence_part",
    "terms_partial",
    "training_scores",
    "with_intercept",
]
