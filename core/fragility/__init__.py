"""Where influence breaks: a fragility lab for networks (Basu, Pope & Feizi, ICLR 2021).

Trains networks (:mod:`core.networks`: the small CNNs of a depth and a width series, LeNet-5 and
a residual network without BatchNorm) end to end on a class pair of Fashion-MNIST, with and
without weight decay, and measures how well the influence score predicts the actual effect of
retraining without a training point, exactly as the convex models are checked, so the convex
models appear in the same table as reference rows.

The score is the one of docs/architecture.md, first order (the study's estimate), formed by the
one :class:`~core.influence.InfluenceEngine`:

    score(z_j, z_test) = (1/n) ∇ℓ(z_test, θ̂)ᵀ (H + δI)⁻¹ ∇ℓ(z_j, θ̂)  ≈  ℓ(z_test, θ̂_{-j}) - ℓ(z_test, θ̂),

in units of test loss, positive = z_j helped. H = ∇²R(θ̂), R(θ) = (1/n) Σ ℓ_i + (λ/2)‖θ‖².

**Damping.** A network's Hessian at the end of training is indefinite. As in the literature the
damping is δ = max(0, -λ_min) + margin (``SolverConfig.damping_margin``), with λ_min the
Hessian's most negative eigenvalue (``eigvalsh`` of the dense Hessian when it is computed;
otherwise Lanczos on Hessian-vector products), measured once per network and shared by its
solvers, so H + δI is positive definite with smallest eigenvalue ``margin``.

**Solvers.** "exact": Cholesky of the dense Hessian over all parameters when there are at most
``exact_max_params``; above that the exact row is the Hessian block of the linear head only (the
rest of the network held at θ̂), labelled "exact (last layer)". "cg" and "lissa" always use
Hessian-vector products of the whole network. The solvers are :mod:`core.influence`'s, unchanged.

**Ground truth** (the study's protocol, made precise; one *cell* is a network, a weight decay
and a repeat):

1. Train: minibatch SGD with momentum from a seeded initialisation, ``epochs`` epochs, cosine
   learning rate from ``learning_rate`` to 0, fixed minibatch order per seed. This is θ̂.
2. For each test point (the highest-loss and the median-loss test image under θ̂) and each solver,
   take the top ``top_k`` training points by |score|; retrain once without each point of the union.
3. Retrain from θ̂ without point j (its sample weight 0, the 1/n and λ kept) for a fixed fraction
   ``retrain_fraction`` of the original number of epochs, with the original schedule compressed
   into them (cosine from the same peak learning rate to 0, momentum restarted from 0).
4. Alongside, a control run retrains from θ̂ with every point, with the same minibatch order (common
   random numbers). actual_j = ℓ_test(θ_{-j}) - ℓ_test(θ_control): the change removing j causes,
   without the drift that further training causes by itself.
5. Repeat steps 3-4 for ``seeds`` minibatch orders and average actual_j; retrain with every point
   for ``noise_seeds`` further orders. The spread of the control's test loss is how far the test
   loss moves by chance; the seed-to-seed spread of actual_j bounds how well any scores could
   agree with it (:class:`NoiseBound`).
6. Pearson and Spearman (:func:`core.validation.agreement`) of each solver's scores against the
   actual changes on its own top k, next to that bound.
7. Repeat the cell ``repeats`` times from other training seeds; tables give the mean and range.

The convex reference rows are fitted to convergence by Newton's method and checked by exact
leave-one-out retraining (:func:`core.validation.verify`), with the first-order estimate in the
table (the Newton-corrected one is kept alongside).

Modules: :mod:`~core.fragility.config` (what to run), :mod:`~core.fragility.results` and
:mod:`~core.fragility.codec` (what was measured, as JSON), :mod:`~core.fragility.running` with
:mod:`~core.fragility.network_cell` and :mod:`~core.fragility.convex_cell` (running),
:mod:`~core.fragility.reporting`, :mod:`~core.fragility.noise` and :mod:`~core.fragility.study`
(views). The dashboard's Trust page builds on the names exported here.
"""

from __future__ import annotations

from core.fragility.codec import (
    bundled_results_path,
    load_results,
    progress_path,
    results_from_dict,
    results_to_dict,
    save_results,
)
from core.fragility.config import (
    CONVEX_MODELS,
    DEFAULT_ARCHITECTURES,
    FRAGILITY_SOLVERS,
    MODELS,
    NETWORK_MODELS,
    STUDY_SOLVER,
    TEST_POINTS,
    Cell,
    FragilityConfig,
    GroundTruthConfig,
    Setting,
    SolverSettings,
    TrainingConfig,
    solver_label,
)
from core.fragility.data import StudyData, prepare_data
from core.fragility.noise import noise_bound
from core.fragility.reporting import (
    CorrelationSeries,
    FragilityTable,
    NoiseFloorRow,
    SeriesPoint,
    SolverComparison,
    TableCell,
    TableRow,
    build_table,
    correlation_series,
    noise_floor,
    solver_comparison,
)
from core.fragility.results import (
    FORMAT_VERSION,
    CurvatureResult,
    FragilityResults,
    GroundTruthResult,
    NoiseBound,
    PointResult,
    SettingResult,
    SolverResult,
)
from core.fragility.running import (
    planned_units,
    results_from_progress,
    run_fragility,
    run_setting,
)
from core.fragility.study import (
    MATCH_TOLERANCE,
    STUDY_NUMBERS,
    StudyComparison,
    StudyNumber,
    study_comparison,
)
from core.fragility.tracking import Progress
from core.labels import TEST_POINT_LABELS
from core.networks import Architecture

__all__ = [
    "CONVEX_MODELS",
    "DEFAULT_ARCHITECTURES",
    "FORMAT_VERSION",
    "FRAGILITY_SOLVERS",
    "MATCH_TOLERANCE",
    "MODELS",
    "NETWORK_MODELS",
    "STUDY_NUMBERS",
    "STUDY_SOLVER",
    "TEST_POINTS",
    "TEST_POINT_LABELS",
    "Architecture",
    "Cell",
    "CorrelationSeries",
    "CurvatureResult",
    "FragilityConfig",
    "FragilityResults",
    "FragilityTable",
    "GroundTruthConfig",
    "GroundTruthResult",
    "NoiseBound",
    "NoiseFloorRow",
    "PointResult",
    "Progress",
    "SeriesPoint",
    "Setting",
    "SettingResult",
    "SolverComparison",
    "SolverResult",
    "SolverSettings",
    "StudyComparison",
    "StudyData",
    "StudyNumber",
    "TableCell",
    "TableRow",
    "TrainingConfig",
    "build_table",
    "bundled_results_path",
    "correlation_series",
    "load_results",
    "noise_bound",
    "noise_floor",
    "planned_units",
    "prepare_data",
    "progress_path",
    "results_from_dict",
    "results_from_progress",
    "results_to_dict",
    "run_fragility",
    "run_setting",
    "save_results",
    "solver_comparison",
    "solver_label",
    "study_comparison",
]
