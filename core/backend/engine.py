"""The influence engine on sharded models: scores without the (test x train) matrix.

:class:`ShardedInfluenceEngine` is :class:`~core.influence.InfluenceEngine` for a
:class:`~core.backend.models.ShardedLinearModel`. What involves only parameters runs on the
driver through the inherited code: test gradients, the solver (:func:`~core.influence.make_solver`:
the exact solver factorises the Hessian summed over shards; CG and LiSSA call the model's
distributed Hessian-vector products), s_test = (H + δI)⁻¹ ∇ℓ(z_test). What involves every training
point is mapped over the shards (:mod:`core.backend.kernels`) with the same formulas:

- scores (1/n) s_testᵀ (φ_j ⊗ e_j) are formed per shard; :meth:`~ShardedInfluenceEngine.top_k_scores`
  keeps each shard's top k (``dask.array.topk``/``argtopk``) and merges them, so for thousands
  of test images only k x m numbers come back; ``influence_scores`` still returns whole rows for
  a few test images (n numbers each);
- the exact-in-the-margin estimate (the default) evaluates the loss at each test point's
  outputs moved by the Newton-corrected change Δs_j: the driver solves for the C unit output
  directions (H + δI)⁻¹(φ_t ⊗ e_c) of each test point (one batched solve, as in-process), and
  each worker forms Δs_j and ℓ(s + Δs_j) - ℓ(s) for its rows (:class:`~core.backend.kernels.MarginQuery`);
- the Newton-corrected residuals e_j (which the margin estimate uses too), self-influence and
  leverages need the per-point quadratic forms Q_j = (φ_j ⊗ I)ᵀ(H + δI)⁻¹(φ_j ⊗ I) (C x C
  blocks): each worker gets the Cholesky factor (one output) or the inverse, in the class basis
  for a softmax model (:meth:`~core.influence.ExactSolver.inverse_for_forms`), once, and
  computes them for its rows, so these estimates need the exact solver (a dense Hessian, up
  to :data:`DENSE_SOLVER_MAX_PARAMS` parameters); with CG or LiSSA only the first-order estimate is offered (in-process they form
  H⁻¹ from p unit solves, which at that size is what the cluster is there to avoid);
- leave-one-out verification submits its k retrainings as independent tasks
  (:meth:`~ShardedInfluenceEngine.loo_retrain`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.backend import kernels
from core.backend.models import ShardedLinearModel
from core.backend.shards import ShardedData, make_shard
from core.errors import InfluenceExplorerError
from core.influence import (
    ESTIMATES,
    LINEAR_ESTIMATES,
    ExactSolver,
    InfluenceEngine,
    InverseHVPSolver,
    SolveOperator,
    SolverConfig,
    TopK,
    _parameter_estimate,
)
from core.models import as_float64, as_labels
from core.validation import RETRAIN_TOL, RetrainResult, Verification, verifications

Progress = Callable[[int, int], None]

#: Largest parameter count for which a dense Hessian is formed and factorised on the driver
#: (16,384 parameters: a 2 GiB matrix). Above it the inverse-Hessian products use conjugate
#: gradients on distributed Hessian-vector products.
DENSE_SOLVER_MAX_PARAMS = 16_384

#: Largest (test x train) score matrix :meth:`ShardedInfluenceEngine.scores_from_stest` returns
#: whole, in entries (2^27: 1 GiB of float64); beyond it use ``top_k_scores``.
MAX_SCORE_ENTRIES = 1 << 27

#: Test points whose scores are formed together in one pass over the shards.
TEST_CHUNK = 256

#: The estimates a sharded engine computes with the exact solver, default first (all of them).
SHARDED_ESTIMATES: tuple[str, ...] = ESTIMATES

Query = np.ndarray | kernels.MarginQuery


def default_solver(n_params: int) -> SolverConfig:
    """Exact (dense Cholesky) up to :data:`DENSE_SOLVER_MAX_PARAMS` parameters, else CG."""
    return SolverConfig(method="exact" if n_params <= DENSE_SOLVER_MAX_PARAMS else "cg")


@dataclass(frozen=True)
class ShardedTopK:
    """One test point's most influential training points, merged from every shard's top k.

    Attributes:
        top: helpful and harmful points, as :func:`core.influence.top_k` gives them.
        by_magnitude: indices of the k largest |score|, largest first (as
            :func:`core.influence.top_k_by_magnitude`).
        by_magnitude_scores: their scores.
    """

    top: TopK
    by_magnitude: np.ndarray
    by_magnitude_scores: np.ndarray


def _ordered(indices: np.ndarray, keys: np.ndarray) -> np.ndarray:
    # Largest key first; among equal keys the lower training index, as core.influence.top_k.
    return np.lexsort((indices, -keys))


def _merge_row(
    hi_idx: np.ndarray, hi_val: np.ndarray, lo_idx: np.ndarray, lo_val: np.ndarray, k: int
) -> ShardedTopK:
    """One test point's k largest and k smallest scores (each from the shards' candidates)
    -> helpful, harmful and by-magnitude lists, ordered as the in-process functions order them."""
    order = _ordered(hi_idx, hi_val)
    hi_idx, hi_val = hi_idx[order], hi_val[order]
    keep = hi_val > 0
    order = _ordered(lo_idx, -lo_val)
    lo_idx, lo_val = lo_idx[order], lo_val[order]
    keep_lo = lo_val < 0
    top = TopK(hi_idx[keep][:k], hi_val[keep][:k], lo_idx[keep_lo][:k], lo_val[keep_lo][:k])
    # The k largest |score| are among the k largest and the k smallest scores.
    idx = np.concatenate([hi_idx, lo_idx])
    val = np.concatenate([hi_val, lo_val])
    idx, first = np.unique(idx, return_index=True)
    val = val[first]
    order = _ordered(idx, np.abs(val))[:k]
    return ShardedTopK(top, idx[order], val[order])


class ShardedInfluenceEngine(InfluenceEngine):
    """:class:`~core.influence.InfluenceEngine` for a model fitted on shards.

    Args:
        model: a fitted :class:`~core.backend.models.ShardedLinearModel`.
        solver: a :class:`~core.influence.SolverConfig` or a ready solver; default
            :func:`default_solver` (exact up to :data:`DENSE_SOLVER_MAX_PARAMS` parameters).
    """

    #: Leave-one-out and scores run on the cluster (front ends may say so).
    distributed = True

    def __init__(
        self,
        model: ShardedLinearModel,
        solver: SolverConfig | InverseHVPSolver | None = None,
    ) -> None:
        if not isinstance(model, ShardedLinearModel):
            raise InfluenceExplorerError(
                f"ShardedInfluenceEngine takes a sharded model; got {type(model).__name__} "
                "(use core.influence.InfluenceEngine)."
            )
        p = model.n_params_
        config = default_solver(p) if solver is None else solver
        if (
            isinstance(config, SolverConfig)
            and config.method == "exact"
            and p > DENSE_SOLVER_MAX_PARAMS
        ):
            raise InfluenceExplorerError(
                f"The exact solver forms a dense {p} x {p} Hessian ({8 * p * p / 2**30:.1f} GiB), "
                f"more than the {DENSE_SOLVER_MAX_PARAMS} parameters it is used for; use "
                "SolverConfig(method='cg') (--solver cg), which needs only Hessian-vector "
                "products over the shards."
            )
        self.runner = model.runner
        with self.runner.stage("Building the influence solver"):
            super().__init__(model, config)
        self.model: ShardedLinearModel = model
        # The inherited structured quantities read features_ on the driver; here every one of
        # them is overridden below and computed per shard.
        self.structured = True
        self._curvature: list[Any] | None = None

    # ----------------------------------------------------------------- what is available
    @property
    def estimates(self) -> tuple[str, ...]:
        """All three ("margin", the default, "corrected", "first_order") with the exact solver
        (the first two need the Cholesky factor on the workers); only "first_order" with CG or
        LiSSA."""
        if isinstance(self.solver, ExactSolver):
            return SHARDED_ESTIMATES
        return ("first_order",)

    def _check_estimate(self, estimate: str | None) -> str:
        estimate = self.default_estimate if estimate is None else estimate
        if estimate not in self.estimates:
            if estimate in SHARDED_ESTIMATES:
                raise InfluenceExplorerError(
                    f"On a cluster the {estimate!r} estimate needs the exact solver (each worker "
                    "uses the Hessian's Cholesky factor for its training points); with this "
                    "solver use estimate='first_order'."
                )
            raise InfluenceExplorerError(
                f"estimate must be one of {', '.join(self.estimates)} on a cluster; got "
                f"{estimate!r}."
            )
        return estimate

    @property
    def _data(self) -> ShardedData:
        return self.model.data_

    def _columns(self, estimate: str) -> list[list[Any]]:
        """Per-shard (shard, derivatives, curvature) handles for an estimate's scores."""
        data = self._data
        terms = self.model._train_terms.handles
        if estimate == "first_order":
            return [data.shards, terms, [None] * data.n_shards]
        return [data.shards, terms, self._curvature_handles()]

    def _curvature_handles(self, what: str = "The Newton-corrected estimate") -> list[Any]:
        if self._curvature is None:
            if not isinstance(self.solver, ExactSolver):
                raise InfluenceExplorerError(
                    f"{what} on a cluster needs the exact solver: each worker uses the "
                    "Hessian's Cholesky factor for its training points' quadratic forms. Use "
                    "SolverConfig(method='exact') (--solver exact), or first-order scores only."
                )
            with self.runner.stage("Per-point curvature (Newton-corrected estimate)"):
                # One output: the factor, a triangular solve per row. C outputs: the inverse
                # (in the class basis when the loss allows), whose blocks' quadratic forms cost
                # C(C - 1)/2·d² per row in the basis, C(C + 1)/2·d² without, against the C·p²
                # of solving for φ_j ⊗ I.
                solver = self.solver
                payload = (
                    solver.cholesky if self.model.n_outputs_ == 1 else solver.inverse_for_forms()
                )
                factor = self.runner.broadcast(payload)
                self._curvature = self.runner.map(
                    kernels.curvature,
                    [self._data.shards, self.model._train_terms.handles],
                    factor,
                    self.n_train,
                )
        return self._curvature

    # ----------------------------------------------------------------- scores
    def _queries(
        self,
        X_test: Any,
        y_test: Any,
        estimates: tuple[str, ...],
        features: torch.Tensor | None = None,
    ) -> dict[str, Query]:
        """What the workers need per estimate for these test points, sharing the solves as
        :meth:`core.influence.InfluenceEngine.score_estimates` does: with "margin", the C unit
        output solves per test point, and s_test as their combination by ∂ℓ/∂s; without it,
        s_test by one batched solve."""
        X_test = as_float64(X_test)
        labels = as_labels(y_test).reshape(-1)
        if "margin" not in estimates:
            s_test = self.inverse_hvp_test(X_test, labels).numpy()
            return {e: s_test for e in estimates}
        model = self.model
        features = model.transform(X_test) if features is None else as_float64(features)
        outputs = model.scores(features)
        with self.runner.stage("Solving for the test outputs' directions"):
            solves = self._unit_output_solves(features)
        out: dict[str, Query] = {
            "margin": kernels.MarginQuery(solves, outputs, labels, model.loss_)
        }
        if any(e in LINEAR_ESTIMATES for e in estimates):
            # ∇ℓ(z_test) = φ_test ⊗ ∂ℓ/∂s, so s_test is the same combination of the unit solves.
            d1 = model.loss_.derivatives(outputs, labels).d1
            s_test = torch.einsum("tc,tcp->tp", d1, solves).numpy()
            out.update({e: s_test for e in estimates if e in LINEAR_ESTIMATES})
        return out

    def _score_matrix(self, query: Query, estimate: str) -> np.ndarray:
        m = query.outputs.shape[0] if isinstance(query, kernels.MarginQuery) else query.shape[0]
        if m * self.n_train > MAX_SCORE_ENTRIES:
            raise InfluenceExplorerError(
                f"{m} test points x {self.n_train} training points is more scores than are "
                "returned whole; use top_k_scores, which keeps the top k of each shard."
            )
        with self.runner.stage("Scoring training points"):
            handle = self.runner.broadcast(query)
            blocks = self.runner.gather(
                self.runner.map(
                    kernels.score_block, self._columns(estimate), handle, estimate, self.n_train
                )
            )
        return np.concatenate(blocks, axis=1)

    def score_estimates(
        self,
        X_test: Any,
        y_test: Any,
        estimates: tuple[str, ...] | None = None,
        *,
        features: torch.Tensor | None = None,
    ) -> dict[str, np.ndarray]:
        """Several estimates of the same scores, whole rows formed shard by shard and sharing
        the solves (see :meth:`core.influence.InfluenceEngine.score_estimates`, also for
        ``features``); for a few test points. Returns: estimate -> (m, n_train)."""
        estimates = self.estimates if estimates is None else tuple(estimates)
        estimates = tuple(self._check_estimate(e) for e in estimates)
        queries = self._queries(X_test, y_test, estimates, features)
        return {e: self._score_matrix(queries[e], e) for e in estimates}

    def scores_from_stest(
        self, s_test: torch.Tensor, *, estimate: str | None = "corrected"
    ) -> np.ndarray:
        """Whole rows of a linear estimate's scores from s_test (m, p), formed shard by shard
        (see the class docstring); for a few test points. Returns: (m, n_train)."""
        estimate = self._check_estimate(estimate)
        if estimate not in LINEAR_ESTIMATES:
            raise InfluenceExplorerError(
                f"The {estimate!r} estimate evaluates the test loss itself, so it needs the test "
                "inputs, not only s_test; use influence_scores or score_estimates."
            )
        return self._score_matrix(as_float64(s_test).numpy(), estimate)

    def top_k_scores(
        self,
        X_test: Any,
        y_test: Any,
        k: int,
        *,
        estimate: str | None = None,
    ) -> list[ShardedTopK]:
        """The k most helpful, most harmful and largest-|score| training points of each test
        point, without forming the (m, n) score matrix: each shard's top k are kept and merged
        across shards (``dask.array.argtopk``), for test points in blocks of :data:`TEST_CHUNK`.

        Args:
            X_test: (m, D) test inputs; y_test: (m,) labels whose loss is explained.
            k: how many of each.
            estimate: default :attr:`default_estimate`.
        Returns:
            One :class:`ShardedTopK` per test point.
        """
        estimate = self._check_estimate(estimate)
        if k < 1:
            raise InfluenceExplorerError(f"k must be >= 1; got {k}.")
        X_test = as_float64(X_test)
        labels = as_labels(y_test).reshape(-1)
        out: list[ShardedTopK] = []
        for start in range(0, X_test.shape[0], TEST_CHUNK):
            block = slice(start, start + TEST_CHUNK)
            query = self._queries(X_test[block], labels[block], (estimate,))[estimate]
            out.extend(self._top_k_block(query, len(labels[block]), k, estimate))
        return out

    def _top_k_block(self, query: Query, m: int, k: int, estimate: str) -> list[ShardedTopK]:
        import dask
        import dask.array as da

        n = self.n_train
        kk = min(k, n)
        if kk == n:
            # Every point is in the top k (and dask's argtopk refuses k equal to the length).
            everything = np.arange(n)
            rows = self._score_matrix(query, estimate)
            return [_merge_row(everything, row, everything, row, kk) for row in rows]
        with self.runner.stage("Scoring training points (top k per shard)"):
            handle = self.runner.broadcast(query)
            columns = self._columns(estimate)
            blocks = [
                da.from_delayed(
                    dask.delayed(kernels.score_block, pure=False)(
                        shard, terms, curv, handle, estimate, n
                    ),
                    shape=(m, size),
                    dtype=np.float64,
                )
                for shard, terms, curv, size in zip(*columns, self._data.sizes, strict=True)
            ]
            scores = da.concatenate(blocks, axis=1)
            wanted = [
                da.argtopk(scores, kk, axis=1),
                da.topk(scores, kk, axis=1),
                da.argtopk(scores, -kk, axis=1),
                da.topk(scores, -kk, axis=1),
            ]
            if self.runner.distributed:
                client = self.runner.client  # type: ignore[attr-defined]
                hi_i, hi_v, lo_i, lo_v = self.runner.gather(client.compute(wanted))
            else:
                hi_i, hi_v, lo_i, lo_v = dask.compute(*wanted, scheduler="sync")
        return [_merge_row(hi_i[t], hi_v[t], lo_i[t], lo_v[t], kk) for t in range(m)]

    def scores_at(
        self, X_test: Any, y_test: Any, train_indices: Any, *, estimate: str | None = None
    ) -> np.ndarray:
        """Scores of the listed training points only (a lookup on the shards holding them).
        Returns: (m, len(train_indices))."""
        estimate = self._check_estimate(estimate)
        query = self._queries(X_test, y_test, (estimate,))[estimate]
        return self._scores_at(query, train_indices, estimate)

    def _scores_at(self, query: Query, train_indices: Any, estimate: str) -> np.ndarray:
        idx = np.asarray(train_indices, dtype=np.int64).reshape(-1)
        m = query.outputs.shape[0] if isinstance(query, kernels.MarginQuery) else query.shape[0]
        out = np.empty((m, idx.size))
        located = self._data.locate(idx)
        shards, terms, curv = self._columns(estimate)
        with self.runner.stage("Scoring listed training points"):
            handle = self.runner.broadcast(query)
            handles = [
                self.runner.submit(
                    kernels.score_rows,
                    shards[i],
                    terms[i],
                    curv[i],
                    handle,
                    estimate,
                    self.n_train,
                    local,
                )
                for i, local, _ in located
            ]
            for (_, _, positions), values in zip(located, self.runner.gather(handles), strict=True):
                out[:, positions] = values
        return out

    def predicted_output_changes(self, X_test: Any, *, estimate: str = "corrected") -> np.ndarray:
        """Predicted change of each test point's outputs when each training point is removed,
        formed shard by shard (see :meth:`core.influence.InfluenceEngine.predicted_output_changes`).
        Returns: (m, n_train, C)."""
        estimate = _parameter_estimate(self._check_estimate(estimate))
        if estimate == "first_order":
            raise InfluenceExplorerError(
                "On a cluster predicted output changes are the Newton-corrected ones; use "
                "estimate='corrected' (or 'margin')."
            )
        solves = self._unit_output_solves(self.model.transform(X_test))
        with self.runner.stage("Predicted output changes"):
            handle = self.runner.broadcast(solves)
            blocks = self.runner.gather(
                self.runner.map(
                    kernels.output_changes_block,
                    [self._data.shards, self._curvature_handles("Output changes")],
                    handle,
                    self.n_train,
                )
            )
        return np.concatenate(blocks, axis=1)

    # ----------------------------------------------------------------- per-point quantities
    def self_influence(self, estimate: str | None = None) -> np.ndarray:
        """Each training point's influence on its own loss, computed per shard. (n_train,)."""
        estimate = self._check_estimate(estimate)
        if estimate not in self._self_influence:
            with self.runner.stage("Self-influence"):
                parts = self.runner.gather(
                    self.runner.map(
                        kernels.self_influence_part,
                        [
                            self._data.shards,
                            self.model._train_terms.handles,
                            self._curvature_handles("Self-influence"),
                        ],
                        estimate,
                        self.n_train,
                        self.model.theta_.numpy(),
                        self.model.loss_,
                    )
                )
            self._self_influence[estimate] = np.concatenate(parts)
        return self._self_influence[estimate]

    def leverage(self) -> np.ndarray:
        """h_j = (1/n) tr(B_jᵀ Q_j B_j), computed per shard. (n_train,)."""
        with self.runner.stage("Leverages"):
            parts = self.runner.gather(
                self.runner.map(
                    kernels.leverage_part,
                    [self.model._train_terms.handles, self._curvature_handles("Leverage")],
                    self.n_train,
                )
            )
        return np.concatenate(parts)

    def params_change(self, train_indices: Any, *, estimate: str | None = None) -> np.ndarray:
        """Predicted θ̂_{-j} - θ̂ for the listed training points ("margin" uses the
        Newton-corrected change, as in-process). Returns: (k, p)."""
        estimate = _parameter_estimate(self._check_estimate(estimate))
        idx = np.asarray(train_indices, dtype=np.int64).reshape(-1)
        located = self._data.locate(idx)
        shards, terms, curv = self._columns(estimate)
        with self.runner.stage("Parameter changes"):
            handles = [
                self.runner.submit(
                    kernels.example_rows, shards[i], terms[i], curv[i], estimate, local
                )
                for i, local, _ in located
            ]
            phi = np.empty((idx.size, self._data.dim))
            residuals = np.empty((idx.size, self.model.n_outputs_))
            for (_, _, positions), (f, e) in zip(located, self.runner.gather(handles), strict=True):
                phi[positions], residuals[positions] = f, e
        gradients = torch.from_numpy(
            (phi[:, :, None] * residuals[:, None, :]).reshape(idx.size, -1)
        )
        return (self.solver.inverse_hvp(gradients.T).T / self.n_train).numpy()

    def training_inputs(self, train_indices: Any) -> torch.Tensor:
        """The inputs of the listed training points (fetched from their shards). (k, D)."""
        return torch.from_numpy(self.model.inputs_.rows(train_indices)[0])

    def perturbation_influence(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise InfluenceExplorerError(
            "Perturbation influence (the per-pixel heatmap) differentiates the training "
            "objective through every training input, which stay in shards on the cluster; run "
            "it in-process (without INFLUENCE_CLUSTER)."
        )

    # ----------------------------------------------------------------- retraining
    def loo_retrain(
        self,
        train_indices: Any,
        X_test: Any,
        y_test: Any,
        *,
        tol: float = RETRAIN_TOL,
        progress: Progress | None = None,
        mode: str = "auto",
    ) -> RetrainResult:
        """Retrain without each listed training point (leave-one-out) and measure the change
        in each test loss, as :func:`core.validation.loo_retrain`: warm-started from θ̂,
        preconditioned by the exact solver's factor, to ‖∇R‖ <= tol.

        Args:
            mode: "tasks" — each retraining is one independent task on one worker, which then
                holds a copy of every feature shard and a float64 copy of them (fast; needs
                the features to fit a worker); "sequential" — one retraining after another,
                each Newton pass mapped over the shards (for features larger than a worker);
                "auto" — tasks when those copies fit in half the smallest worker's memory
                limit, else sequential.
        """
        if mode not in ("auto", "tasks", "sequential"):
            raise InfluenceExplorerError(
                f"mode must be 'auto', 'tasks' or 'sequential'; got {mode!r}."
            )
        start = time.perf_counter()
        model = self.model
        indices = np.unique(np.asarray(train_indices, dtype=np.int64).reshape(-1))
        model.inputs_.locate(indices)  # refuses indices outside [0, n)
        features = model.transform(X_test)
        labels = as_labels(y_test).reshape(-1)
        base = model.per_example_losses(features, labels)
        if mode == "auto":
            # A task holds every shard and a float64 copy of them: keep that within half of the
            # smallest worker's memory limit.
            memory = self.runner.worker_memory()
            task_bytes = self._data.nbytes + 8 * self._data.n * self._data.dim
            fits = memory is not None and task_bytes <= memory // 2
            mode = "tasks" if self.runner.distributed and fits else "sequential"
        # The preconditioner: (H + δI)⁻¹ as the solver holds it (in the class basis for a
        # multi-class model, not a primal factor formed only for this).
        factor = self.solver.operator() if isinstance(self.solver, ExactSolver) else None
        with self.runner.stage(f"Leave-one-out retraining ({mode})"):
            if mode == "tasks":
                rows = self._retrain_tasks(indices, features, labels, tol, factor, progress)
            else:
                rows = []
                for i, j in enumerate(indices):
                    rows.append(_retrain_one(model, [int(j)], factor, features, labels, tol))
                    if progress is not None:
                        progress(i + 1, len(indices))
        actual = np.stack([r[0] for r in rows]) - base.numpy()[None, :]
        return RetrainResult(
            groups=tuple(np.array([int(j)]) for j in indices),
            actual=actual,
            base_loss=base.numpy(),
            iterations=np.array([r[1] for r in rows], dtype=np.int64),
            gradient_norms=np.array([r[2] for r in rows]),
            seconds=time.perf_counter() - start,
        )

    def _retrain_tasks(
        self,
        indices: np.ndarray,
        features: torch.Tensor,
        labels: torch.Tensor,
        tol: float,
        factor: SolveOperator | None,
        progress: Progress | None,
    ) -> list[tuple[np.ndarray, int, float]]:
        blueprint = self.model.blueprint()
        shared = self.runner.broadcast((blueprint, factor, features, labels, tol))
        handles = [
            self.runner.submit(_retrain_task, shared, int(j), *self._data.shards) for j in indices
        ]
        if progress is None or not self.runner.distributed:
            return self.runner.gather(handles)
        from distributed import as_completed

        position = {h.key: i for i, h in enumerate(handles)}
        rows: list[Any] = [None] * len(handles)
        for done, future in enumerate(as_completed(handles), start=1):
            rows[position[future.key]] = self.runner.gather([future])[0]
            progress(done, len(handles))
        return rows

    def verify(
        self,
        X_test: Any,
        y_test: Any,
        *,
        k: int = 50,
        select_by: str | None = None,
        progress: Progress | None = None,
        mode: str = "auto",
    ) -> list[Verification]:
        """Leave-one-out check of the top k by |score| for each test point, as
        :func:`core.validation.verify`: top k merged from the shards, then k independent
        retraining tasks (each point retrained once even if several test points share it)."""
        select_by = self._check_estimate(select_by)
        if k < 3:
            raise InfluenceExplorerError("k must be at least 3 to compute correlations.")
        X_test = as_float64(X_test)
        labels = as_labels(y_test).reshape(-1)
        k = min(k, self.n_train)
        chosen = [
            row.by_magnitude for row in self.top_k_scores(X_test, labels, k, estimate=select_by)
        ]
        union = np.unique(np.concatenate(chosen))
        queries = self._queries(X_test, labels, self.estimates)
        predicted_all = {e: self._scores_at(queries[e], union, e) for e in self.estimates}
        retrained = self.loo_retrain(union, X_test, labels, progress=progress, mode=mode)
        return verifications(
            chosen,
            union,
            retrained,
            lambda t, indices, rows: {e: predicted_all[e][t, rows] for e in self.estimates},
            select_by,
        )


def _retrain_one(
    model: ShardedLinearModel,
    removed: list[int],
    preconditioner: SolveOperator | None,
    features: torch.Tensor,
    labels: torch.Tensor,
    tol: float,
) -> tuple[np.ndarray, int, float]:
    """Refit ``model`` without the ``removed`` rows, preconditioned by the full data's
    (H + δI)⁻¹; the new test losses, Newton iterations and final gradient norm."""
    refitted = model._refit_with(
        model.without_rows(removed), tol=tol, preconditioner=preconditioner
    )
    losses = refitted.per_example_losses(features, labels).numpy()
    return losses, refitted.fit_info_.iterations, refitted.fit_info_.gradient_norm


def _retrain_task(
    shared: tuple[Any, ...], removed: int, *shards: Any
) -> tuple[np.ndarray, int, float]:
    """One leave-one-out retraining as a task: the model's blueprint on local copies of the
    feature shards, every pass in this worker."""
    blueprint, factor, features, labels, tol = shared
    # One float64 copy for the whole retraining: its dozen passes then read it directly instead
    # of converting every row block on every pass.
    wide = [make_shard(s.offset, s.features.astype(np.float64), s.labels) for s in shards]
    model = blueprint.attach(ShardedData.local(wide))
    return _retrain_one(model, [removed], factor, features, labels, tol)


__all__ = [
    "DENSE_SOLVER_MAX_PARAMS",
    "SHARDED_ESTIMATES",
    "ShardedInfluenceEngine",
    "ShardedTopK",
    "default_solver",
]
