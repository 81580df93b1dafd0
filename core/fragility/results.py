"""What a fragility study measured: plain frozen dataclasses, written to and read from JSON by
:mod:`core.fragility.codec`. Views over them (tables, series, the comparison with the study) are
in :mod:`core.fragility.reporting` and :mod:`core.fragility.study`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.fragility.config import FragilityConfig

if TYPE_CHECKING:
    from core.fragility.reporting import FragilityTable

#: Version of the results file layout; :func:`~core.fragility.codec.load_results` refuses others.
#: 2: network families, repeats, per-seed actual changes, the noise floor, partial runs.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class NoiseBound:
    """How well *perfect* scores could agree with this ground truth, given its noise.

    The actual change of point j is measured S times (minibatch orders s): A_sj = T_j + e_sj,
    T_j the change retraining would show without noise, e_sj independent with variance σ².
    Over the k retrained points, with Ā_j the mean over seeds (its error variance σ²/S),

        reliability ρ = 1 - (σ̂²/S) / var_j Ā_j,        σ̂² = mean_j var_s A_sj  (k(S-1) df)

    is the share of the variance of Ā that is signal, and for any scores P

        corr(P, Ā) ≈ corr(P, T) · sqrt(ρ) <= sqrt(ρ)                    (attenuation)

    so ``pearson_ceiling`` = sqrt(ρ) is the best Pearson noise allows. Whether an observed
    Pearson is *within noise* of perfect is the classical lack-of-fit test against pure error:
    if T were linear in P (perfect scores up to scale), the residuals of the least-squares line
    of Ā on P would be noise alone, so RSS/(k-2) / (σ̂²/S) ~ F(k-2, k(S-1)). ``pearson_floor`` is
    the lowest Pearson the test accepts (r² = 1 - RSS/TSS); a correlation at or above it, with a
    positive slope, is within noise: its shortfall from 1 is what retraining noise explains.

    Attributes:
        reliability: ρ in [0, 1] (NaN with one seed).
        pearson_ceiling: sqrt(ρ).
        pearson_floor: the lowest Pearson within noise of perfect (5% level).
        lack_of_fit_p: the test's p-value.
        within_noise: positive slope and lack_of_fit_p >= 0.05.
        seed_pearson_range, seed_spearman_range: (min, max) over seeds of the correlation of the
            scores with that seed's actual changes alone.
    """

    reliability: float
    pearson_ceiling: float
    pearson_floor: float
    lack_of_fit_p: float
    within_noise: bool
    seed_pearson_range: tuple[float, float]
    seed_spearman_range: tuple[float, float]


@dataclass(frozen=True)
class PointResult:
    """One solver's influence against retraining for one test point.

    Attributes:
        kind: "high_loss" or "median_loss".
        test_index: row in the study's test split; test_id: the dataset's stable id.
        label: the test point's true class (its loss is the one explained).
        test_loss: ℓ(z_test, θ̂).
        train_indices: (k,) the solver's top k by |score| (rows of the study's training subset);
            train_ids: their dataset ids.
        predicted: (k,) scores (predicted change in test loss).
        actual: (k,) actual change from retraining (mean over seeds).
        actual_std: (k,) its standard deviation over seeds (0 with one seed or exact retraining).
        pearson, spearman, slope: agreement of actual with predicted.
        score_pearson, score_spearman: this solver's scores against the reference solver's over
            the whole training set (1 for the reference itself; NaN when there is none).
        relative_error: ‖s - s_ref‖ / ‖s_ref‖ of the inverse-HVP s = (H + δI)⁻¹∇ℓ_test (NaN when
            there is no reference on the same parameters).
        corrected_pearson, corrected_spearman: the Newton-corrected estimate's agreement
            (convex models only; NaN otherwise).
        actual_by_seed: (seeds, k) the actual changes per minibatch order (networks).
        noise: the best agreement the ground truth's noise allows (None: exact retraining).
    """

    kind: str
    test_index: int
    test_id: str
    label: int
    test_loss: float
    train_indices: tuple[int, ...]
    train_ids: tuple[str, ...]
    predicted: tuple[float, ...]
    actual: tuple[float, ...]
    actual_std: tuple[float, ...]
    pearson: float
    spearman: float
    slope: float
    score_pearson: float = math.nan
    score_spearman: float = math.nan
    relative_error: float = math.nan
    corrected_pearson: float = math.nan
    corrected_spearman: float = math.nan
    actual_by_seed: tuple[tuple[float, ...], ...] = ()
    noise: NoiseBound | None = None


@dataclass(frozen=True)
class SolverResult:
    """One inverse-Hessian solver on one trained model.

    Attributes:
        solver: "exact", "cg" or "lissa"; scope: "all" parameters or the "last" layer's.
        label: display name, e.g. "exact (last layer)".
        damping: δ added to the Hessian.
        n_params: parameters in the scope.
        seconds: time to the scores (for "exact" including the dense Hessian and its
            eigenvalues, which the curvature entry also reports).
        points: one per test point (empty when the solver failed).
        note: convergence details (CG iterations, LiSSA's remaining error factor, retries).
        error: why the solver failed, or "".
    """

    solver: str
    scope: str
    label: str
    damping: float
    n_params: int
    seconds: float
    points: tuple[PointResult, ...]
    note: str = ""
    error: str = ""

    def point(self, kind: str) -> PointResult | None:
        return next((p for p in self.points if p.kind == kind), None)


@dataclass(frozen=True)
class CurvatureResult:
    """Extreme eigenvalues of ∇²R(θ̂) on a parameter scope.

    Attributes:
        scope: "all" or "last"; n_params: parameters in it.
        smallest_eigenvalue, largest_eigenvalue: λ_min (most negative) and λ_max.
        method: "eigvalsh" (exact) or "lanczos".
        negative_eigenvalues: how many are < 0 (eigvalsh only; -1 when unknown).
        seconds: Hessian (or Lanczos) time.
    """

    scope: str
    n_params: int
    smallest_eigenvalue: float
    largest_eigenvalue: float
    method: str
    negative_eigenvalues: int
    seconds: float


@dataclass(frozen=True)
class GroundTruthResult:
    """How the actual changes were measured for one trained model, and its noise floor.

    Attributes:
        protocol: the protocol in words, with its numbers.
        retrain_epochs: length of each retraining (0 for exact convex retraining).
        seeds: minibatch orders averaged.
        n_retrained: training points retrained (the union over solvers and test points).
        control_drift: per test point, ℓ_test(θ_control) - ℓ_test(θ̂): what retraining with every
            point does by itself, mean over the control runs (0 for the convex models).
        seed_pearson: per test point, Pearson of the actual changes between the first two seeds
            over all retrained points (NaN with one seed).
        seconds: retraining wall time.
        control_losses: per test point, ℓ_test after each retraining with nothing removed
            (``seeds`` + ``noise_seeds`` minibatch orders).
        chance_std: per test point, the standard deviation of those: how far the test loss moves
            by chance when the network is retrained without removing anything.
        effect_rms: per test point, the root mean square of the actual changes (mean over seeds)
            over every retrained point: the size of what is measured, to set against chance_std.
    """

    protocol: str
    retrain_epochs: int
    seeds: int
    n_retrained: int
    control_drift: tuple[float, ...]
    seed_pearson: tuple[float, ...]
    seconds: float
    control_losses: tuple[tuple[float, ...], ...] = ()
    chance_std: tuple[float, ...] = ()
    effect_rms: tuple[float, ...] = ()


@dataclass(frozen=True)
class SettingResult:
    """Everything measured on one trained model of the grid (one cell and repeat).

    Attributes:
        model: "cnn", "lenet", "resnet", "logistic" or "svm"; label: display name ("CNN d2 w8").
        depth, width: the network's (0 for convex models).
        weight_decay: λ.
        n_params: parameters of the model.
        train_accuracy, test_accuracy: of θ̂.
        gradient_norm: ‖∇R(θ̂)‖ (how stationary θ̂ is).
        curvature: extreme eigenvalues per parameter scope used.
        solvers: one entry per solver run.
        ground_truth: how the actual changes were measured (None when skipped).
        seconds: total wall time; timings: (phase, seconds) pairs.
        skipped: why the setting could not be run (e.g. a convex fit without weight decay that
            has no unique optimum, or a grid stopped before it), or "".
        repeat: which repeat of the cell (0 for the first); seed: its training seed.
        activation: the network's activation ("" for convex models).
        precision: "float64" or "float32", what influence was computed in.
    """

    model: str
    label: str
    depth: int
    width: int
    weight_decay: float
    n_params: int
    train_accuracy: float
    test_accuracy: float
    gradient_norm: float
    curvature: tuple[CurvatureResult, ...]
    solvers: tuple[SolverResult, ...]
    ground_truth: GroundTruthResult | None
    seconds: float
    timings: tuple[tuple[str, float], ...]
    skipped: str = ""
    repeat: int = 0
    seed: int = 0
    activation: str = ""
    precision: str = "float64"

    @property
    def is_network(self) -> bool:
        return self.depth > 0

    def solver(self, solver: str, scope: str | None = None) -> SolverResult | None:
        """The named solver's result (any scope unless given), or None."""
        return next(
            (s for s in self.solvers if s.solver == solver and (scope is None or s.scope == scope)),
            None,
        )


@dataclass(frozen=True)
class FragilityResults:
    """A whole study: its configuration, data description and every cell's results.

    Attributes:
        config: what was run.
        dataset: dataset name; class_names: the classes used; n_train, n_test: sizes.
        settings: one per cell (setting and repeat), in :meth:`FragilityConfig.cells` order.
        seconds: total wall time (summed over resumed runs).
        torch_threads: torch intra-op threads during the run (timings depend on it).
        created: ISO timestamp; command: how it was run (for the record).
        format_version: results file layout version.
        missing: cells of the grid that were not run (a stopped run written with
            ``--partial``); their rows say "not run".
        load_average: the machine's 1/5/15-minute load average when the results were written
            (timings depend on it).
    """

    config: FragilityConfig
    dataset: str
    class_names: tuple[str, ...]
    n_train: int
    n_test: int
    settings: tuple[SettingResult, ...]
    seconds: float
    torch_threads: int
    created: str = ""
    command: str = ""
    format_version: int = FORMAT_VERSION
    missing: tuple[str, ...] = ()
    load_average: tuple[float, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing

    def table(self) -> FragilityTable:
        """Pearson / Spearman per model row and (test point, weight decay) column, averaged over
        repeats."""
        from core.fragility.reporting import build_table

        return build_table(self)

    def records(self) -> list[dict[str, Any]]:
        """Tidy rows, one per (cell, solver, test point), for charts and data frames."""
        out = []
        for s in self.settings:
            for r in s.solvers:
                for p in r.points:
                    noise = p.noise
                    out.append(
                        {
                            "model": s.model,
                            "label": s.label,
                            "depth": s.depth,
                            "width": s.width,
                            "n_params": s.n_params,
                            "weight_decay": s.weight_decay,
                            "repeat": s.repeat,
                            "solver": r.solver,
                            "scope": r.scope,
                            "solver_label": r.label,
                            "test_point": p.kind,
                            "pearson": p.pearson,
                            "spearman": p.spearman,
                            "slope": p.slope,
                            "k": len(p.predicted),
                            "pearson_ceiling": noise.pearson_ceiling if noise else math.nan,
                            "within_noise": noise.within_noise if noise else None,
                            "score_pearson": p.score_pearson,
                            "relative_error": p.relative_error,
                            "damping": r.damping,
                            "solver_seconds": r.seconds,
                            "test_accuracy": s.test_accuracy,
                        }
                    )
        return out
