"""One network cell of the study, in five steps: train θ̂, measure the curvature (and so the
damping), solve for each solver's scores, retrain without the top points (with the noise floor),
score the agreement. Each step is a function of what the previous ones returned."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import vmap

from core.errors import ConvergenceError, NotPositiveDefiniteError, SolverDivergedError
from core.fragility.config import Cell, FragilityConfig, SolverSettings, solver_label
from core.fragility.data import StudyData
from core.fragility.noise import noise_bound
from core.fragility.results import (
    CurvatureResult,
    GroundTruthResult,
    PointResult,
    SettingResult,
    SolverResult,
)
from core.fragility.tracking import Tracker
from core.influence import (
    CGSolver,
    InfluenceEngine,
    InverseHVPSolver,
    LiSSASolver,
    LiSSAWarning,
    make_solver,
    top_k_by_magnitude,
)
from core.linalg import Spectrum, lanczos_spectrum, spectrum_from_hessian
from core.models import DTYPE
from core.networks import (
    Network,
    NetworkObjective,
    ParameterLayout,
    build_network,
    train_sgd,
)
from core.validation import agreement

#: Progress units of the curvature step and of each solver.
CURVATURE_UNITS = 10
SOLVER_UNITS = 10


def planned_units(config: FragilityConfig) -> int:
    """Progress units a network cell reports (epochs trained and retrained, steps between)."""
    gt = config.ground_truth
    return (
        config.training.epochs
        + CURVATURE_UNITS
        + SOLVER_UNITS * len(config.influence.solvers)
        + gt.seeds * config.retrain_epochs()
        + gt.noise_seeds
    )


def run_network_cell(
    cell: Cell, config: FragilityConfig, data: StudyData, tracker: Tracker
) -> SettingResult:
    """Train, solve, retrain and score one network cell (see the module docstring)."""
    started = time.perf_counter()
    trained = train(cell, config, data, tracker)
    curvature = measure_curvature(trained, config.influence, tracker)
    runs = solve(trained, curvature, config.influence, tracker)
    truth = retrain(trained, runs, config, tracker)
    return score(cell, trained, curvature, runs, truth, config, data, started)


# ---------------------------------------------------------------------------- 1. train
@dataclass
class TrainedNetwork:
    """θ̂ and what every later step reads from it."""

    network: Network
    layout: ParameterLayout
    objective: NetworkObjective
    data: StudyData
    weight_decay: float
    seed: int
    train_accuracy: float
    test_accuracy: float
    gradient_norm: float
    test_losses: np.ndarray  # (n_test,)
    points: dict[str, int]  # test point kind -> test index
    seconds: float

    @property
    def kinds(self) -> list[str]:
        return list(self.points)

    def point_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.points[k] for k in self.kinds]
        return self.data.X_test[rows], self.data.y_test[rows]


def train(cell: Cell, config: FragilityConfig, data: StudyData, tracker: Tracker) -> TrainedNetwork:
    """Train θ̂ from the cell's seed; pick the highest-loss and the median-loss test points."""
    assert cell.setting.architecture is not None  # checked by Setting
    tracker.stage("training")
    t = time.perf_counter()
    tc, wd = config.training, float(cell.setting.weight_decay)
    seed = config.training_seed(cell.repeat)
    X, y, n = data.X_train, data.y_train, int(data.X_train.shape[0])
    network = build_network(cell.setting.architecture, data.image_shape, data.n_classes, seed)
    layout = ParameterLayout(network)
    theta = train_sgd(
        network,
        layout.flatten(network, torch.float32)[None],
        X,
        y,
        torch.ones(1, n),
        wd,
        tc.schedule(),
        seed=seed,
        n_classes=data.n_classes,
        progress=tracker.inner(tc.epochs, "training"),
    )[0]
    layout.load_into(network, theta)
    float32 = layout.n_params > config.influence.float64_max_params
    objective = NetworkObjective(
        network,
        X,
        y,
        wd,
        n_classes=data.n_classes,
        dtype=torch.float32 if float32 else DTYPE,
    )
    with torch.no_grad():
        train_accuracy = _accuracy(network(X), y)
        test_accuracy = _accuracy(network(data.X_test), data.y_test)
    test_losses = objective.per_example_losses(data.X_test, data.y_test).numpy()
    order = np.argsort(test_losses, kind="stable")
    return TrainedNetwork(
        network=network,
        layout=layout,
        objective=objective,
        data=data,
        weight_decay=wd,
        seed=seed,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        gradient_norm=float(objective.objective_gradient().norm()),
        test_losses=test_losses,
        points={"high_loss": int(order[-1]), "median_loss": int(order[len(order) // 2])},
        seconds=time.perf_counter() - t,
    )


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)
    return float((predicted == labels).double().mean())


# ---------------------------------------------------------------------------- 2. curvature
@dataclass
class Curvature:
    """The full network's extreme eigenvalues and the damping every full-network solver uses."""

    entries: list[CurvatureResult]
    spectrum: Spectrum
    damping: float
    dense: bool


def measure_curvature(
    trained: TrainedNetwork, settings: SolverSettings, tracker: Tracker
) -> Curvature:
    """λ_min and λ_max of ∇²R(θ̂): exact from the dense Hessian when the network is small
    enough for it, else Lanczos; damping δ = max(0, -λ_min) + margin."""
    tracker.stage("Hessian spectrum")
    t = time.perf_counter()
    objective = trained.objective
    p = objective.n_params_
    dense = p <= settings.exact_max_params
    if dense:
        objective.cache_hessian(progress=tracker.inner(CURVATURE_UNITS, "exact Hessian"))
        values = torch.linalg.eigvalsh(objective.hessian())
        spectrum = Spectrum(float(values[0]), float(values[-1]), "eigvalsh")
        negatives = int((values < 0).sum())
    else:
        iterations = settings.solver.lanczos_iterations
        spectrum = lanczos_spectrum(objective.hvp, p, iterations, seed=trained.seed)
        negatives = -1
    entry = CurvatureResult(
        "all",
        p,
        spectrum.smallest,
        spectrum.largest,
        spectrum.method,
        negatives,
        time.perf_counter() - t,
    )
    damping = max(0.0, -spectrum.smallest) + settings.damping_margin
    tracker.advance(0, "Hessian spectrum")
    return Curvature([entry], spectrum, damping, dense)


# ---------------------------------------------------------------------------- 3. solve
@dataclass
class SolverRun:
    """A solver's scores before ground truth is in."""

    solver: str
    scope: str
    damping: float
    n_params: int
    seconds: float
    note: str
    s_test: torch.Tensor | None  # (p, n_points)
    scores: np.ndarray | None  # (n_points, n_train)
    error: str = ""
    chosen: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> top-k indices


def solve(
    trained: TrainedNetwork, curvature: Curvature, settings: SolverSettings, tracker: Tracker
) -> list[SolverRun]:
    """Each solver's s_test = (H + δI)⁻¹∇ℓ_test and scores, through the one engine.

    "exact" on a network too large for its dense Hessian is the last layer's exact Hessian (a
    labelled row of its own); CG and LiSSA always work on the whole network.
    """
    runs = []
    for name in settings.solvers:
        start = tracker.done
        tracker.stage(f"solver {name}")
        objective, damping = trained.objective, curvature.damping
        extra = 0.0
        if name == "exact" and not curvature.dense:
            objective, damping, entry = _last_layer(trained, settings)
            curvature.entries.append(entry)
            extra = entry.seconds
        elif name == "exact":
            extra = curvature.entries[0].seconds  # the dense Hessian is most of exact's cost
        run = _run_solver(name, objective, damping, settings, trained, curvature.spectrum)
        run.seconds += extra
        runs.append(run)
        tracker.finish(start, SOLVER_UNITS)
        tracker.stage(f"solver {name}")
    return runs


def _last_layer(
    trained: TrainedNetwork, settings: SolverSettings
) -> tuple[NetworkObjective, float, CurvatureResult]:
    t = time.perf_counter()
    objective = NetworkObjective(
        trained.network,
        trained.data.X_train,
        trained.data.y_train,
        trained.weight_decay,
        scope="last",
        n_classes=trained.data.n_classes,
    )
    objective.cache_hessian()
    spectrum = spectrum_from_hessian(objective.hessian())
    entry = CurvatureResult(
        "last",
        objective.n_params_,
        spectrum.smallest,
        spectrum.largest,
        "eigvalsh",
        0 if spectrum.smallest >= 0 else -1,
        time.perf_counter() - t,
    )
    return objective, max(0.0, -spectrum.smallest) + settings.damping_margin, entry


def _run_solver(
    name: str,
    objective: NetworkObjective,
    damping: float,
    settings: SolverSettings,
    trained: TrainedNetwork,
    spectrum: Spectrum,
) -> SolverRun:
    """Scores of one solver: s_test = (H + δI)⁻¹∇ℓ_test, score_j = (1/n) ∇ℓ_jᵀ s_test."""
    test_gradients = objective.loss_gradients(*trained.point_inputs())
    seed = trained.seed
    t = time.perf_counter()
    notes: list[str] = []
    float32 = objective.dtype == torch.float32
    solver: InverseHVPSolver | None = None
    # Lanczos' smallest Ritz value only bounds λ_min from above: if CG meets negative
    # curvature anyway, double the shift and say so.
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                # LiSSA's own depth check assumes H ⪰ λI; the note below uses the true λ_min.
                warnings.simplefilter("ignore", LiSSAWarning)
                config = settings.config_for(name, damping, seed, float32)
                solver = make_solver(objective, config)
                s_test = solver.inverse_hvp(test_gradients.T)
            break
        except NotPositiveDefiniteError as error:
            if attempt == 3:
                return _failed(name, objective, damping, t, notes, error)
            shift = damping - settings.damping_margin
            damping = 2 * max(shift, settings.damping_margin) + settings.damping_margin
            notes.append(f"retried with damping {damping:.3g} (negative curvature met)")
        except (ConvergenceError, SolverDivergedError) as error:
            return _failed(name, objective, damping, t, notes, error)
    assert solver is not None
    scores = InfluenceEngine(objective, solver).scores_from_stest(s_test.T, estimate="first_order")
    if isinstance(solver, CGSolver):
        notes.append(f"{solver.last_iterations} iterations to relative residual {solver.tol:g}")
    if isinstance(solver, LiSSASolver):
        # The damped Hessian's smallest eigenvalue is λ_min + δ; LiSSA keeps a factor
        # (1 - that/scale)^depth of the error along it.
        smallest = max(spectrum.smallest + damping, 1e-12)
        remaining = (1 - smallest / solver.scale) ** solver.depth
        notes.append(
            f"scale {solver.scale:.3g}, depth {solver.depth}, batch {solver.batch_size}: the "
            f"slowest direction keeps {remaining:.2g} of its error"
        )
    if float32:
        notes.append("float32 Hessian-vector products")
    seconds = time.perf_counter() - t
    return SolverRun(
        name,
        objective.scope,
        damping,
        objective.n_params_,
        seconds,
        "; ".join(notes),
        s_test,
        scores,
    )


def _failed(
    name: str,
    objective: NetworkObjective,
    damping: float,
    started: float,
    notes: list[str],
    error: Exception,
) -> SolverRun:
    """This solver's row when it could not produce scores, with the reason."""
    return SolverRun(
        name,
        objective.scope,
        damping,
        objective.n_params_,
        time.perf_counter() - started,
        "; ".join(notes),
        None,
        None,
        str(error),
    )


# ---------------------------------------------------------------------------- 4. retrain
@dataclass
class Retraining:
    """Actual changes and the noise floor.

    Attributes:
        union: (m,) training points retrained (the union of every solver's top k).
        by_seed: (S, m, points) ℓ_test(θ_{-j}) - ℓ_test(θ_control) per minibatch order.
        controls: (C, points) ℓ_test after retraining with nothing removed, C = S + noise seeds.
        base: (points,) ℓ_test(θ̂).
        seconds: wall time.
    """

    union: np.ndarray
    by_seed: np.ndarray
    controls: np.ndarray
    base: np.ndarray
    seconds: float

    def position(self) -> dict[int, int]:
        return {int(j): i for i, j in enumerate(self.union)}


def retrain(
    trained: TrainedNetwork, runs: list[SolverRun], config: FragilityConfig, tracker: Tracker
) -> Retraining:
    """Retrain from θ̂ without each top-k point of any solver and test point, with a control run
    on every point on the same minibatch order (common random numbers), for each seed; then
    retrain on every point with further minibatch orders for the noise floor."""
    t = time.perf_counter()
    gt = config.ground_truth
    kinds = trained.kinds
    for r in runs:
        if r.scores is not None:
            r.chosen = {k: top_k_by_magnitude(r.scores[i], gt.top_k) for i, k in enumerate(kinds)}
    chosen = [idx for r in runs for idx in r.chosen.values()]
    union = np.unique(np.concatenate([*chosen, np.empty(0, dtype=np.int64)]))
    X_points, y_points = trained.point_inputs()
    objective = trained.objective
    base = objective.per_example_losses(X_points, y_points).numpy()
    losses_of = vmap(objective._losses, in_dims=(0, None, None))
    inputs = objective.features(X_points)
    epochs = config.retrain_epochs()
    theta_hat = trained.layout.flatten(trained.network, torch.float32)
    n, m = int(trained.data.X_train.shape[0]), len(union)

    def run(removed: np.ndarray, seed: int, label: str, units: int) -> np.ndarray:
        # Row 0 is the control (every point); row i removes removed[i - 1].
        weights = torch.ones(len(removed) + 1, n)
        weights[torch.arange(1, len(removed) + 1), torch.as_tensor(removed, dtype=torch.int64)] = 0
        thetas = train_sgd(
            trained.network,
            theta_hat[None].repeat(len(removed) + 1, 1),
            trained.data.X_train,
            trained.data.y_train,
            weights,
            trained.weight_decay,
            config.retrain_schedule(),
            seed=seed,
            n_classes=objective.n_classes,
            progress=tracker.inner(units, label),
        )
        with torch.no_grad():
            return losses_of(thetas.to(objective.dtype), inputs, y_points).to(DTYPE).numpy()

    by_seed, controls = [], []
    for s in range(gt.seeds):
        label = f"retraining {m} models, seed {s + 1}/{gt.seeds}"
        losses = run(union, trained.seed + 1 + s, label, epochs)  # (m + 1, points)
        by_seed.append(losses[1:] - losses[0])
        controls.append(losses[0])
    for s in range(gt.noise_seeds):
        label = f"noise floor: retraining on every point, {s + 1}/{gt.noise_seeds}"
        controls.append(run(union[:0], trained.seed + 1 + gt.seeds + s, label, 1)[0])
    return Retraining(
        union=union,
        by_seed=np.stack(by_seed),
        controls=np.stack(controls),
        base=base,
        seconds=time.perf_counter() - t,
    )


# ---------------------------------------------------------------------------- 5. score
def score(
    cell: Cell,
    trained: TrainedNetwork,
    curvature: Curvature,
    runs: list[SolverRun],
    truth: Retraining,
    config: FragilityConfig,
    data: StudyData,
    started: float,
) -> SettingResult:
    """Agreement of each solver's scores with retraining on its own top k, each solver against
    the reference (exact on all parameters, else CG), and the noise floor."""
    reference = next(
        (r for r in runs if r.scores is not None and r.solver == "exact" and r.scope == "all"),
        None,
    ) or next((r for r in runs if r.scores is not None and r.solver == "cg"), None)
    results = [_solver_result(r, reference, trained, truth) for r in runs]
    architecture = cell.setting.architecture
    assert architecture is not None
    objective = trained.objective
    return SettingResult(
        model=cell.setting.model,
        label=cell.setting.label,
        depth=architecture.depth,
        width=architecture.width,
        weight_decay=trained.weight_decay,
        n_params=objective.n_params_,
        train_accuracy=trained.train_accuracy,
        test_accuracy=trained.test_accuracy,
        gradient_norm=trained.gradient_norm,
        curvature=tuple(curvature.entries),
        solvers=tuple(results),
        ground_truth=_ground_truth(truth, config),
        seconds=time.perf_counter() - started,
        timings=(
            ("train", trained.seconds),
            ("curvature", curvature.entries[0].seconds),
            ("solvers", sum(r.seconds for r in runs)),
            ("retrain", truth.seconds),
        ),
        repeat=cell.repeat,
        seed=trained.seed,
        activation=architecture.activation,
        precision="float32" if objective.dtype == torch.float32 else "float64",
    )


def _solver_result(
    run: SolverRun, reference: SolverRun | None, trained: TrainedNetwork, truth: Retraining
) -> SolverResult:
    label = solver_label(run.solver, run.scope)
    if run.scores is None:
        return SolverResult(
            run.solver, run.scope, label, run.damping, run.n_params, run.seconds, (),
            run.note, run.error,
        )  # fmt: skip
    position = truth.position()
    points = []
    for i, kind in enumerate(trained.kinds):
        idx = run.chosen[kind]
        rows = np.array([position[int(j)] for j in idx], dtype=np.int64)
        predicted = run.scores[i, idx]
        by_seed = truth.by_seed[:, rows, i]  # (S, k)
        actual = by_seed.mean(0)
        fit = agreement(predicted, actual)
        score_fit = agreement(run.scores[i], reference.scores[i]) if reference else None
        relative_error = math.nan
        if reference is not None and reference.scope == run.scope and run.s_test is not None:
            ref = reference.s_test[:, i]
            relative_error = float((run.s_test[:, i] - ref).norm() / ref.norm())
        test_index = trained.points[kind]
        points.append(
            PointResult(
                kind=kind,
                test_index=test_index,
                test_id=trained.data.test_ids[test_index],
                label=int(trained.data.y_test[test_index]),
                test_loss=float(trained.test_losses[test_index]),
                train_indices=tuple(int(j) for j in idx),
                train_ids=tuple(trained.data.train_ids[int(j)] for j in idx),
                predicted=tuple(float(v) for v in predicted),
                actual=tuple(float(v) for v in actual),
                actual_std=tuple(
                    float(v)
                    for v in (by_seed.std(0, ddof=1) if len(by_seed) > 1 else np.zeros_like(actual))
                ),
                pearson=fit.pearson,
                spearman=fit.spearman,
                slope=fit.slope,
                score_pearson=score_fit.pearson if score_fit else math.nan,
                score_spearman=score_fit.spearman if score_fit else math.nan,
                relative_error=relative_error,
                actual_by_seed=tuple(tuple(float(v) for v in row) for row in by_seed),
                noise=noise_bound(predicted, by_seed),
            )
        )
    return SolverResult(
        run.solver, run.scope, label, run.damping, run.n_params, run.seconds, tuple(points),
        run.note, run.error,
    )  # fmt: skip


def _ground_truth(truth: Retraining, config: FragilityConfig) -> GroundTruthResult:
    gt = config.ground_truth
    mean = truth.by_seed.mean(0)  # (m, points)
    n_points = truth.by_seed.shape[2]
    if gt.seeds > 1 and len(truth.union) >= 3:
        seed_pearson = tuple(
            agreement(truth.by_seed[0][:, i], truth.by_seed[1][:, i]).pearson
            for i in range(n_points)
        )
    else:
        seed_pearson = tuple(math.nan for _ in range(n_points))
    controls = truth.controls  # (C, points)
    spread = controls.std(0, ddof=1) if len(controls) > 1 else np.full(n_points, math.nan)
    return GroundTruthResult(
        protocol=network_protocol(config),
        retrain_epochs=config.retrain_epochs(),
        seeds=gt.seeds,
        n_retrained=len(truth.union),
        control_drift=tuple(float(v) for v in (controls.mean(0) - truth.base)),
        seed_pearson=seed_pearson,
        seconds=truth.seconds,
        control_losses=tuple(tuple(float(v) for v in controls[:, i]) for i in range(n_points)),
        chance_std=tuple(float(v) for v in spread),
        effect_rms=tuple(
            float(np.sqrt(np.mean(mean[:, i] ** 2))) if len(mean) else math.nan
            for i in range(n_points)
        ),
    )


def network_protocol(config: FragilityConfig) -> str:
    """The ground-truth protocol in words, with its numbers."""
    tc, gt = config.training, config.ground_truth
    return (
        f"Trained {tc.epochs} epochs of minibatch SGD (batch {tc.batch_size}, momentum "
        f"{tc.momentum:g}, cosine learning rate {tc.learning_rate:g} -> 0). Each top-{gt.top_k} "
        f"point was removed (sample weight 0, 1/n and weight decay kept) and the network "
        f"retrained from the trained parameters for {config.retrain_epochs()} epochs "
        f"({gt.retrain_fraction:g} of the original), cosine "
        f"{config.retrain_schedule().learning_rate:g} -> 0, momentum "
        f"restarted; actual change = test loss minus that of a control retrained with every "
        f"point on the same minibatch order; averaged over {gt.seeds} minibatch order(s). "
        f"Noise floor: the control's test loss over {gt.seeds + gt.noise_seeds} minibatch orders."
    )
