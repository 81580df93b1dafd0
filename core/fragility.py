"""Where influence breaks: a fragility lab for small CNNs (Basu, Pope & Feizi, ICLR 2021).

Trains a family of small CNNs (:mod:`core.networks`) end to end on a class pair of the demo data,
with and without weight decay, and measures how well the influence score predicts the actual
effect of retraining without a training point, exactly as the convex models are checked, so the
convex models appear in the same table as reference rows.

The score is the docs/architecture.md one, first order (the paper's estimate):

    score(z_j, z_test) = (1/n) ∇ℓ(z_test, θ̂)ᵀ (H + δI)⁻¹ ∇ℓ(z_j, θ̂)  ≈  ℓ(z_test, θ̂_{-j}) - ℓ(z_test, θ̂),

in units of test loss, positive = z_j helped. H = ∇²R(θ̂), R(θ) = (1/n) Σ ℓ_i + (λ/2)‖θ‖².

**Damping.** A network's Hessian at the end of training is indefinite. As in the literature the
damping is δ = max(0, -λ_min) + margin, with λ_min the Hessian's most negative eigenvalue (exact,
``eigvalsh`` of the dense Hessian, when it is computed; otherwise Lanczos on Hessian-vector
products), so H + δI is positive definite with smallest eigenvalue ``margin``. Both values are
reported per setting and solver.

**Solvers.** "exact": Cholesky of the dense Hessian over all parameters when there are at most
``exact_max_params``; above that the exact row is the Hessian block of the linear head only (the
rest of the network held at θ̂), labelled "exact (last layer)". "cg" and "lissa" always use
Hessian-vector products of the whole network. The solvers are :mod:`core.influence`'s, unchanged.

**Ground truth** (the paper's protocol, made precise):

1. Train: minibatch SGD with momentum from a seeded initialisation, ``epochs`` epochs, cosine
   learning rate from ``learning_rate`` to 0, fixed minibatch order per seed. This is θ̂.
2. For each test point (the highest-loss and the median-loss test image under θ̂) and each solver,
   take the top ``top_k`` training points by |score|; retrain once without each point of the union.
3. Retrain from θ̂ without point j (its sample weight 0, the 1/n and λ kept) for a fixed fraction
   ``retrain_fraction`` of the original number of epochs, with the original schedule compressed
   into them (cosine from the same peak learning rate to 0, momentum restarted from 0).
4. Alongside, a control run retrains from θ̂ with every point, with the same minibatch order (common
   random numbers). actual_j = ℓ_test(θ_{-j}) - ℓ_test(θ_control): the change removing j causes,
   without the drift that further training causes by itself (reported as ``control_drift``).
5. Repeat steps 3-4 for ``seeds`` minibatch orders and average actual_j. The seed-to-seed Pearson
   of the actual changes is reported as the ground truth's reliability.
6. Pearson and Spearman (:func:`core.validation.agreement`) of each solver's scores against the
   actual changes on its own top k.

The convex reference rows are fitted to convergence by Newton's method and checked by exact
leave-one-out retraining (:func:`core.validation.verify`), with the first-order estimate in the
table (the Newton-corrected one is kept alongside).

The dashboard's Trust page builds on :func:`run_fragility`, :func:`run_setting`,
:func:`load_results`, :meth:`FragilityResults.table`, :func:`correlation_series` and
:func:`solver_comparison`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from core.data import Dataset, load_demo
from core.errors import (
    ConvergenceError,
    InfluenceExplorerError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from core.influence import (
    CGSolver,
    InfluenceEngine,
    InverseHVPSolver,
    LiSSASolver,
    LiSSAWarning,
    SolverConfig,
    make_solver,
)
from core.labels import SOLVER_SHORT_LABELS, TEST_POINT_DESCRIPTIONS, TEST_POINT_LABELS
from core.linalg import Spectrum, lanczos_spectrum, spectrum_from_hessian
from core.models import DTYPE, KernelSVM, LinearModel, LogisticRegression
from core.networks import (
    Architecture,
    NetworkObjective,
    ParameterLayout,
    SGDSchedule,
    build_network,
    images_to_tensor,
    torch_threads,
    train_sgd,
)
from core.validation import agreement, verify

#: Version of the results file layout; :func:`load_results` refuses other versions.
FORMAT_VERSION = 1

TEST_POINTS: tuple[str, ...] = ("high_loss", "median_loss")
FRAGILITY_SOLVERS: tuple[str, ...] = ("exact", "cg", "lissa")
CONVEX_MODELS = {"logistic": "Logistic regression (pixels)", "svm": "RBF SVM (pixels)"}
MODELS: tuple[str, ...] = ("cnn", *CONVEX_MODELS)

#: progress(done, total, stage): units done of the total planned, and what is running now.
Progress = Callable[[int, int, str], None]


def solver_label(solver: str, scope: str) -> str:
    """Display name of a solver on a parameter scope: "exact", "exact (last layer)", "CG", "LiSSA"."""
    name = SOLVER_SHORT_LABELS[solver]
    return f"{name} (last layer)" if scope == "last" else name


# ============================================================================ configuration
def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise InfluenceExplorerError(f"{name} must be an integer >= {minimum}; got {value!r}.")


def _check_positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InfluenceExplorerError(f"{name} must be a finite number > 0; got {value!r}.")


@dataclass(frozen=True)
class TrainingConfig:
    """How every network is trained (minibatch SGD, momentum, cosine learning rate to 0).

    Attributes:
        epochs: passes over the training set.
        batch_size: minibatch size.
        learning_rate: peak learning rate.
        momentum: heavy-ball momentum.
        seed: initialisation and minibatch order of the original training.
    """

    epochs: int = 150
    batch_size: int = 50
    learning_rate: float = 0.05
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_positive("learning_rate", self.learning_rate)
        if not (0 <= self.momentum < 1):
            raise InfluenceExplorerError(f"momentum must be in [0, 1); got {self.momentum!r}.")

    def schedule(self, epochs: int | None = None) -> SGDSchedule:
        return SGDSchedule(
            self.epochs if epochs is None else epochs,
            self.batch_size,
            self.learning_rate,
            self.momentum,
        )


@dataclass(frozen=True)
class GroundTruthConfig:
    """Leave-one-out retraining (protocol in the module docstring).

    Attributes:
        top_k: training points retrained per test point and solver (largest |score|).
        retrain_fraction: retraining length as a fraction of the original epochs.
        seeds: minibatch orders averaged over.
    """

    top_k: int = 30
    retrain_fraction: float = 0.25
    seeds: int = 2

    def __post_init__(self) -> None:
        _check_int("top_k", self.top_k, 3)
        if not (0 < self.retrain_fraction <= 1):
            raise InfluenceExplorerError(
                f"retrain_fraction must be in (0, 1]; got {self.retrain_fraction!r}."
            )
        _check_int("seeds", self.seeds, 1)


@dataclass(frozen=True)
class SolverSettings:
    """Inverse-Hessian solvers of the study and their damping.

    Attributes:
        solvers: any of "exact", "cg", "lissa".
        exact_max_params: largest network whose full dense Hessian is computed (p HVPs over the
            training set); larger networks get the exact Hessian of their last layer instead.
        damping_margin: smallest eigenvalue of H + δI; δ = max(0, -λ_min) + damping_margin.
        lanczos_iterations: Krylov steps for λ_min when the dense Hessian is not computed.
        cg_tol, cg_max_iter: conjugate-gradient stopping rule.
        lissa_depth, lissa_batch_size, lissa_repeats, lissa_scale: LiSSA recursion
            (scale ``None``: 2x the largest eigenvalue, estimated by power iteration).
    """

    solvers: tuple[str, ...] = FRAGILITY_SOLVERS
    exact_max_params: int = 1500
    damping_margin: float = 0.01
    lanczos_iterations: int = 80
    cg_tol: float = 1e-6
    cg_max_iter: int = 2000
    lissa_depth: int = 2000
    lissa_batch_size: int = 50
    lissa_repeats: int = 1
    lissa_scale: float | None = None

    def __post_init__(self) -> None:
        if not self.solvers or any(s not in FRAGILITY_SOLVERS for s in self.solvers):
            raise InfluenceExplorerError(
                f"solvers must be a non-empty subset of {', '.join(FRAGILITY_SOLVERS)}; "
                f"got {self.solvers!r}."
            )
        if len(set(self.solvers)) != len(self.solvers):
            raise InfluenceExplorerError(f"solvers lists a solver twice: {self.solvers!r}.")
        _check_int("exact_max_params", self.exact_max_params, 1)
        _check_positive("damping_margin", self.damping_margin)
        _check_int("lanczos_iterations", self.lanczos_iterations, 2)
        if not (0 < self.cg_tol < 1):
            raise InfluenceExplorerError(f"cg_tol must be in (0, 1); got {self.cg_tol!r}.")
        for name in ("cg_max_iter", "lissa_depth", "lissa_batch_size", "lissa_repeats"):
            _check_int(name, getattr(self, name), 1)
        if self.lissa_scale is not None:
            _check_positive("lissa_scale", self.lissa_scale)

    def solver_config(self, method: str, damping: float, seed: int) -> SolverConfig:
        """The engine's :class:`~core.influence.SolverConfig` for one of this study's solvers at
        a damping already chosen (the study measures the spectrum itself, to report it)."""
        return SolverConfig(
            method=method,
            damping=damping,
            cg_tol=self.cg_tol,
            cg_max_iter=self.cg_max_iter,
            lissa_depth=self.lissa_depth,
            lissa_scale=self.lissa_scale,
            lissa_repeats=self.lissa_repeats,
            lissa_batch_size=self.lissa_batch_size,
            seed=seed,
        )


@dataclass(frozen=True)
class FragilityConfig:
    """The whole study: data, grid (architectures x weight decay x solver), training, ground truth.

    Frozen, so it can key a cache. ``FragilityConfig()`` is the full grid of docs/fragility.md;
    :meth:`quick` is a tiny one.

    Attributes:
        classes: class indices or names of the dataset to use (default T-shirt/top vs Shirt);
            ``("all",)`` for every class (softmax; the SVM row is then skipped, it is binary).
        n_train: training images, an equal number per class (a seeded subset of the training
            split); the test split of the chosen classes is used whole.
        image_size: side length the images are average-pooled to (a divisor of theirs).
        architectures: the CNN family members.
        weight_decays: λ values; every model is trained with each.
        convex_models: reference rows, any of "logistic", "svm".
        training, ground_truth, influence: see their classes.
        data_seed: which training images are in the subset.
    """

    classes: tuple[int | str, ...] = (0, 6)
    n_train: int = 500
    image_size: int = 14
    architectures: tuple[Architecture, ...] = (
        Architecture(1, 8),
        Architecture(2, 8),
        Architecture(3, 8),
        Architecture(4, 8),
        Architecture(2, 4),
        Architecture(2, 16),
    )
    weight_decays: tuple[float, ...] = (1e-3, 0.0)
    convex_models: tuple[str, ...] = ("logistic", "svm")
    training: TrainingConfig = TrainingConfig()
    ground_truth: GroundTruthConfig = GroundTruthConfig()
    influence: SolverSettings = SolverSettings()
    data_seed: int = 0

    def __post_init__(self) -> None:
        if not self.classes:
            raise InfluenceExplorerError("classes must name at least two classes, or 'all'.")
        if tuple(self.classes) != ("all",) and len(self.classes) < 2:
            raise InfluenceExplorerError(
                f"classes must name at least two classes, or be ('all',); got {self.classes!r}."
            )
        _check_int("n_train", self.n_train, 4)
        _check_int("image_size", self.image_size, 4)
        if not all(isinstance(a, Architecture) for a in self.architectures):
            raise InfluenceExplorerError("architectures must be Architecture instances.")
        if len(set(self.architectures)) != len(self.architectures):
            raise InfluenceExplorerError("architectures lists an architecture twice.")
        if not self.weight_decays:
            raise InfluenceExplorerError("weight_decays must list at least one value (0 is fine).")
        for wd in self.weight_decays:
            if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
                raise InfluenceExplorerError(f"weight_decays must be finite and >= 0; got {wd!r}.")
        if len(set(self.weight_decays)) != len(self.weight_decays):
            raise InfluenceExplorerError("weight_decays lists a value twice.")
        unknown = [m for m in self.convex_models if m not in CONVEX_MODELS]
        if unknown:
            raise InfluenceExplorerError(
                f"convex_models must be among {', '.join(CONVEX_MODELS)}; got {unknown}."
            )
        if not self.architectures and not self.convex_models:
            raise InfluenceExplorerError(
                "The grid is empty: give an architecture or a convex model."
            )

    @classmethod
    def quick(cls, **overrides: Any) -> FragilityConfig:
        """A tiny grid (a minute or two on one core): depth 1 and 2 at width 4, 200 images."""
        values: dict[str, Any] = {
            "n_train": 200,
            "architectures": (Architecture(1, 4), Architecture(2, 4)),
            "training": TrainingConfig(epochs=60, batch_size=50, learning_rate=0.05),
            "ground_truth": GroundTruthConfig(top_k=15, retrain_fraction=0.25, seeds=1),
            "influence": SolverSettings(
                solvers=("exact", "cg", "lissa"), lissa_depth=1000, lissa_batch_size=50
            ),
        }
        values.update(overrides)
        return cls(**values)

    def settings(self) -> tuple[Setting, ...]:
        """Every (model, weight decay) of the grid: convex reference rows first, then the CNNs."""
        out = [Setting(m, wd) for m in self.convex_models for wd in self.weight_decays]
        out += [Setting("cnn", wd, a) for a in self.architectures for wd in self.weight_decays]
        return tuple(out)


@dataclass(frozen=True)
class Setting:
    """One trained model of the grid: a CNN architecture or a convex model, and a weight decay."""

    model: str = "cnn"
    weight_decay: float = 1e-3
    architecture: Architecture | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise InfluenceExplorerError(
                f"model must be one of {', '.join(MODELS)}; got {self.model!r}."
            )
        if (self.model == "cnn") != (self.architecture is not None):
            raise InfluenceExplorerError(
                "A 'cnn' setting needs an architecture and a convex one must not have one."
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InfluenceExplorerError(
                f"weight_decay must be finite and >= 0; got {self.weight_decay!r}."
            )

    @property
    def label(self) -> str:
        if self.architecture is not None:
            return self.architecture.label
        return CONVEX_MODELS[self.model]


# ============================================================================ results
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
    """How the actual changes were measured for one trained model.

    Attributes:
        protocol: the protocol in words, with its numbers.
        retrain_epochs: length of each retraining (0 for exact convex retraining).
        seeds: minibatch orders averaged.
        n_retrained: training points retrained (the union over solvers and test points).
        control_drift: per test point, ℓ_test(θ_control) - ℓ_test(θ̂): what retraining with every
            point does by itself (0 for the convex models).
        seed_pearson: per test point, Pearson of the actual changes between the first two seeds
            over all retrained points (NaN with one seed).
        seconds: retraining wall time.
    """

    protocol: str
    retrain_epochs: int
    seeds: int
    n_retrained: int
    control_drift: tuple[float, ...]
    seed_pearson: tuple[float, ...]
    seconds: float


@dataclass(frozen=True)
class SettingResult:
    """Everything measured on one trained model of the grid.

    Attributes:
        model: "cnn", "logistic" or "svm"; label: display name ("CNN d2 w8").
        depth, width: the CNN's (0 for convex models).
        weight_decay: λ.
        n_params: parameters of the model.
        train_accuracy, test_accuracy: of θ̂.
        gradient_norm: ‖∇R(θ̂)‖ (how stationary θ̂ is).
        curvature: extreme eigenvalues per parameter scope used.
        solvers: one entry per solver run.
        ground_truth: how the actual changes were measured (None when skipped).
        seconds: total wall time; timings: (phase, seconds) pairs.
        skipped: why the setting could not be run (e.g. a convex fit without weight decay that
            has no unique optimum), or "".
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

    def solver(self, solver: str, scope: str | None = None) -> SolverResult | None:
        """The named solver's result (any scope unless given), or None."""
        return next(
            (s for s in self.solvers if s.solver == solver and (scope is None or s.scope == scope)),
            None,
        )


@dataclass(frozen=True)
class TableCell:
    """Pearson and Spearman of one (model row, test point, weight decay); NaN when not run."""

    pearson: float = math.nan
    spearman: float = math.nan
    n: int = 0
    note: str = ""

    @property
    def available(self) -> bool:
        return math.isfinite(self.pearson) and math.isfinite(self.spearman)

    def text(self) -> str:
        if not self.available:
            return "—"
        return f"{self.pearson:.2f} / {self.spearman:.2f}"


@dataclass(frozen=True)
class TableRow:
    """A model row of the table: a convex model, or a CNN with one solver."""

    label: str
    model: str
    depth: int
    width: int
    solver: str
    scope: str
    cells: tuple[TableCell, ...]


@dataclass(frozen=True)
class FragilityTable:
    """Basu et al.'s Table 1 shape: rows are models, columns (test point, weight decay), cells
    Pearson / Spearman of influence against retraining."""

    columns: tuple[tuple[str, float], ...]
    rows: tuple[TableRow, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.columns)

    def column_labels(self) -> tuple[str, ...]:
        return tuple(f"{TEST_POINT_LABELS[kind]}, {_wd_text(wd)}" for kind, wd in self.columns)

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per row with a "Pearson / Spearman" string per column (for a data frame)."""
        return [
            {
                "model": row.label,
                **{c: cell.text() for c, cell in zip(self.column_labels(), row.cells, strict=True)},
            }
            for row in self.rows
        ]

    def to_markdown(self) -> str:
        """The table as a Markdown pipe table (for docs and ``st.markdown``)."""
        header = ["model", *self.column_labels()]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            lines.append("| " + " | ".join([row.label, *(c.text() for c in row.cells)]) + " |")
        return "\n".join(lines)

    def to_text(self) -> str:
        """The table as aligned plain text (what the CLI prints)."""
        kinds = list(dict.fromkeys(kind for kind, _ in self.columns))
        label_width = max([len("model"), *(len(r.label) for r in self.rows)]) + 2
        per_kind = max(1, len(self.columns) // max(len(kinds), 1))
        cell_width = max(
            13,
            *(len(_wd_text(wd)) + 2 for _, wd in self.columns),
            *(-(-(len(TEST_POINT_DESCRIPTIONS[k]) + 2) // per_kind) for k in kinds),
        )
        header1 = " " * label_width
        header2 = "model".ljust(label_width)
        for kind in kinds:
            span = sum(1 for k, _ in self.columns if k == kind) * cell_width
            header1 += TEST_POINT_DESCRIPTIONS[kind].center(span)
        for _, wd in self.columns:
            header2 += _wd_text(wd).center(cell_width)
        lines = [header1.rstrip(), header2.rstrip(), "-" * len(header2)]
        for row in self.rows:
            line = row.label.ljust(label_width)
            line += "".join(cell.text().center(cell_width) for cell in row.cells)
            lines.append(line.rstrip())
        return "\n".join(lines)


def _wd_text(wd: float) -> str:
    return "no weight decay" if wd == 0 else f"wd {wd:g}"


@dataclass(frozen=True)
class FragilityResults:
    """A whole study: its configuration, data description and every setting's results.

    Attributes:
        config: what was run.
        dataset: dataset name; class_names: the classes used; n_train, n_test: sizes.
        settings: one per (model, weight decay), in :meth:`FragilityConfig.settings` order.
        seconds: total wall time.
        torch_threads: torch intra-op threads during the run (timings depend on it).
        created: ISO timestamp; command: how it was run (for the record).
        format_version: results file layout version.
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

    def table(self) -> FragilityTable:
        """Pearson / Spearman per model row and (test point, weight decay) column."""
        return build_table(self)

    def records(self) -> list[dict[str, Any]]:
        """Tidy rows, one per (setting, solver, test point), for charts and data frames."""
        out = []
        for s in self.settings:
            for r in s.solvers:
                for p in r.points:
                    out.append(
                        {
                            "model": s.model,
                            "label": s.label,
                            "depth": s.depth,
                            "width": s.width,
                            "n_params": s.n_params,
                            "weight_decay": s.weight_decay,
                            "solver": r.solver,
                            "scope": r.scope,
                            "solver_label": r.label,
                            "test_point": p.kind,
                            "pearson": p.pearson,
                            "spearman": p.spearman,
                            "slope": p.slope,
                            "k": len(p.predicted),
                            "score_pearson": p.score_pearson,
                            "relative_error": p.relative_error,
                            "damping": r.damping,
                            "solver_seconds": r.seconds,
                            "test_accuracy": s.test_accuracy,
                        }
                    )
        return out


# ============================================================================ data
@dataclass(frozen=True, eq=False)
class StudyData:
    """The images the study trains and tests on, as tensors.

    Attributes:
        name: dataset name with the classes; class_names: the classes, label i is class_names[i].
        X_train: (n, C, s, s) float32 in [-1, 1]; y_train: (n,) labels; train_ids: dataset ids.
        X_test, y_test, test_ids: the whole test split of those classes.
    """

    name: str
    class_names: tuple[str, ...]
    X_train: torch.Tensor
    y_train: torch.Tensor
    train_ids: tuple[str, ...]
    X_test: torch.Tensor
    y_test: torch.Tensor
    test_ids: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.X_train.shape
        return int(h), int(w), int(c)


def prepare_data(config: FragilityConfig, dataset: Dataset | None = None) -> StudyData:
    """Select the classes, draw the seeded balanced training subset, pool to ``image_size``.

    Args:
        config: the study.
        dataset: default the bundled demo.
    """
    dataset = dataset if dataset is not None else load_demo()
    if tuple(config.classes) == ("all",):
        chosen = dataset
    else:
        chosen = dataset.select_classes(list(config.classes))
    per_class = config.n_train // chosen.n_classes
    if per_class < 2:
        raise InfluenceExplorerError(
            f"n_train {config.n_train} gives fewer than 2 images per class for "
            f"{chosen.n_classes} classes; raise n_train."
        )
    rng = np.random.default_rng(config.data_seed)
    parts = []
    for c in range(chosen.n_classes):
        members = np.flatnonzero(chosen.train_labels == c)
        parts.append(np.sort(rng.permutation(members)[:per_class]))
    index = np.sort(np.concatenate(parts))
    return StudyData(
        name=chosen.name,
        class_names=tuple(chosen.class_names),
        X_train=images_to_tensor(chosen.train_images[index], config.image_size),
        y_train=torch.tensor(chosen.train_labels[index], dtype=torch.int64),
        train_ids=tuple(str(i) for i in chosen.train_ids[index]),
        X_test=images_to_tensor(chosen.test_images, config.image_size),
        y_test=torch.tensor(np.asarray(chosen.test_labels), dtype=torch.int64),
        test_ids=tuple(str(i) for i in chosen.test_ids),
    )


# ============================================================================ running
class _Tracker:
    """Maps stage-level progress of one or many settings onto progress(done, total, stage)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = max(total, 1)
        self.done = 0
        self.prefix = ""

    def stage(self, text: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, f"{self.prefix}{text}")

    def advance(self, units: int, text: str) -> None:
        self.done = min(self.done + units, self.total)
        self.stage(text)

    def inner(self, units: int, text: str) -> Callable[[int, int], None]:
        """A (done, total) callback that spreads ``units`` over an inner loop."""
        start = self.done

        def callback(done: int, total: int) -> None:
            self.done = min(start + units * done // max(total, 1), self.total)
            self.stage(text)

        return callback

    def finish(self, start: int, units: int) -> None:
        self.done = min(start + units, self.total)


def planned_units(setting: Setting, config: FragilityConfig) -> int:
    """Progress units a setting reports (training epochs, stages, retraining epochs)."""
    if setting.model != "cnn":
        return 12
    gt = config.ground_truth
    return (
        config.training.epochs
        + 10
        + 10 * len(config.influence.solvers)
        + gt.seeds * _retrain_epochs(config)
    )


def _retrain_epochs(config: FragilityConfig) -> int:
    return max(1, round(config.ground_truth.retrain_fraction * config.training.epochs))


def run_setting(
    setting: Setting,
    config: FragilityConfig | None = None,
    *,
    data: StudyData | None = None,
    progress: Progress | None = None,
    threads: int | None = 1,
) -> SettingResult:
    """Train one model of the grid, compute its influence with every solver, check by retraining.

    This is the dashboard's live single-setting run.

    Args:
        setting: the model and weight decay (e.g. ``Setting("cnn", 1e-3, Architecture(2, 8))``).
        config: study settings (default :class:`FragilityConfig`); its grid lists are ignored.
        data: prepared data (default :func:`prepare_data` on the bundled demo).
        progress: called as progress(done, total, stage).
        threads: torch threads for the run (restored afterwards); None leaves them alone.
    Returns:
        The setting's :class:`SettingResult`.
    """
    config = config if config is not None else FragilityConfig()
    with torch_threads(threads):
        data = data if data is not None else prepare_data(config)
        tracker = _Tracker(progress, planned_units(setting, config))
        return _run_setting(setting, config, data, tracker)


def _run_setting(
    setting: Setting, config: FragilityConfig, data: StudyData, tracker: _Tracker
) -> SettingResult:
    start = tracker.done
    units = planned_units(setting, config)
    if setting.model == "cnn":
        result = _run_cnn(setting, config, data, tracker)
    else:
        result = _run_convex(setting, config, data, tracker)
    tracker.finish(start, units)
    tracker.stage("done")
    return result


def run_fragility(
    config: FragilityConfig | None = None,
    progress: Progress | None = None,
    *,
    dataset: Dataset | None = None,
    command: str = "",
    threads: int | None = 1,
) -> FragilityResults:
    """Run the whole grid (architecture x weight decay x solver, plus the convex rows).

    Args:
        config: the study (default: the full grid, about half an hour on one CPU core).
        progress: called as progress(done, total, stage).
        dataset: default the bundled demo.
        command: how the run was started, recorded in the results.
        threads: torch threads for the run (restored afterwards); None leaves them alone.
    """
    config = config if config is not None else FragilityConfig()
    with torch_threads(threads):
        return _run_grid(config, progress, dataset, command)


def _run_grid(
    config: FragilityConfig, progress: Progress | None, dataset: Dataset | None, command: str
) -> FragilityResults:
    started = time.perf_counter()
    data = prepare_data(config, dataset)
    settings = config.settings()
    if data.n_classes > 2 and "svm" in config.convex_models:
        settings = tuple(s for s in settings if s.model != "svm")  # the SVM is binary
    tracker = _Tracker(progress, sum(planned_units(s, config) for s in settings))
    results = []
    for i, setting in enumerate(settings):
        tracker.prefix = (
            f"[{i + 1}/{len(settings)}] {setting.label}, {_wd_text(setting.weight_decay)}: "
        )
        results.append(_run_setting(setting, config, data, tracker))
    return FragilityResults(
        config=config,
        dataset=data.name,
        class_names=data.class_names,
        n_train=int(data.X_train.shape[0]),
        n_test=int(data.X_test.shape[0]),
        settings=tuple(results),
        seconds=time.perf_counter() - started,
        torch_threads=torch.get_num_threads(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=command,
    )


def _pick_test_points(losses: np.ndarray) -> dict[str, int]:
    order = np.argsort(losses, kind="stable")
    return {"high_loss": int(order[-1]), "median_loss": int(order[len(order) // 2])}


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)
    return float((predicted == labels).double().mean())


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-np.abs(scores), kind="stable")[: min(k, scores.shape[0])]


@dataclass
class _SolverRun:
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


def _run_cnn(
    setting: Setting, config: FragilityConfig, data: StudyData, tracker: _Tracker
) -> SettingResult:
    assert setting.architecture is not None  # checked by Setting
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tc, gt, sc = config.training, config.ground_truth, config.influence
    wd = float(setting.weight_decay)
    X, y, n = data.X_train, data.y_train, int(data.X_train.shape[0])

    # ---- train θ̂
    tracker.stage("training")
    t = time.perf_counter()
    network = build_network(setting.architecture, data.image_shape, data.n_classes, tc.seed)
    layout = ParameterLayout(network)
    theta = train_sgd(
        network,
        layout.flatten(network, torch.float32)[None],
        X,
        y,
        torch.ones(1, n),
        wd,
        tc.schedule(),
        seed=tc.seed,
        n_classes=data.n_classes,
        progress=tracker.inner(tc.epochs, "training"),
    )[0]
    layout.load_into(network, theta)
    timings["train"] = time.perf_counter() - t

    objective = NetworkObjective(network, X, y, wd, n_classes=data.n_classes)
    with torch.no_grad():
        train_accuracy = _accuracy(network(X), y)
        test_accuracy = _accuracy(network(data.X_test), data.y_test)
    gradient_norm = float(objective.objective_gradient().norm())
    test_losses = objective.per_example_losses(data.X_test, data.y_test).numpy()
    points = _pick_test_points(test_losses)
    kinds = list(points)
    point_rows = [points[k] for k in kinds]
    X_points, y_points = data.X_test[point_rows], data.y_test[point_rows]

    # ---- curvature of the full network: dense Hessian when small enough, else Lanczos
    tracker.stage("Hessian spectrum")
    t = time.perf_counter()
    p_all = objective.n_params_
    dense = p_all <= sc.exact_max_params
    if dense:
        objective.cache_hessian(progress=tracker.inner(10, "exact Hessian"))
        values = torch.linalg.eigvalsh(objective.hessian())
        spectrum = Spectrum(float(values[0]), float(values[-1]), "eigvalsh")
        negatives = int((values < 0).sum())
    else:
        spectrum = lanczos_spectrum(objective.hvp, p_all, sc.lanczos_iterations, seed=tc.seed)
        negatives = -1
    curvature = [
        CurvatureResult(
            "all",
            p_all,
            spectrum.smallest,
            spectrum.largest,
            spectrum.method,
            negatives,
            time.perf_counter() - t,
        )
    ]
    timings["curvature"] = curvature[0].seconds
    damping_all = max(0.0, -spectrum.smallest) + sc.damping_margin
    tracker.advance(0, "Hessian spectrum")

    # ---- solvers
    test_gradients: dict[str, torch.Tensor] = {}

    def scope_test_gradients(obj: NetworkObjective) -> torch.Tensor:
        if obj.scope not in test_gradients:
            test_gradients[obj.scope] = obj.loss_gradients(X_points, y_points)
        return test_gradients[obj.scope]

    runs: list[_SolverRun] = []
    last_objective: NetworkObjective | None = None
    for name in sc.solvers:
        stage_start = tracker.done
        tracker.stage(f"solver {name}")
        obj, damping = objective, damping_all
        if name == "exact" and not dense:
            # The full dense Hessian is too costly: the exact row is the last layer's block.
            t = time.perf_counter()
            last_objective = NetworkObjective(
                network, X, y, wd, scope="last", n_classes=data.n_classes
            )
            last_objective.cache_hessian()
            last_spectrum = spectrum_from_hessian(last_objective.hessian())
            curvature.append(
                CurvatureResult(
                    "last",
                    last_objective.n_params_,
                    last_spectrum.smallest,
                    last_spectrum.largest,
                    "eigvalsh",
                    0 if last_spectrum.smallest >= 0 else -1,
                    time.perf_counter() - t,
                )
            )
            obj = last_objective
            damping = max(0.0, -last_spectrum.smallest) + sc.damping_margin
        run = _run_solver(name, obj, damping, sc, scope_test_gradients, tc.seed, spectrum)
        if name == "exact":
            # The exact solver's cost is mostly the dense Hessian: count it.
            run.seconds += curvature[-1].seconds
        runs.append(run)
        tracker.finish(stage_start, 10)
        tracker.stage(f"solver {name}")
    timings["solvers"] = sum(r.seconds for r in runs)

    # ---- ground truth: retrain without each top-k point of any solver and test point
    chosen = {
        (r.solver, kind): _top_k(r.scores[i], gt.top_k)
        for r in runs
        if r.scores is not None
        for i, kind in enumerate(kinds)
    }
    union = np.unique(np.concatenate([*chosen.values(), np.empty(0, dtype=np.int64)]))
    t = time.perf_counter()
    actual, spread, drift, seed_pearson = _retrain_network(
        network, layout, objective, X, y, wd, union, X_points, y_points, config, tracker
    )
    ground_truth = GroundTruthResult(
        protocol=_network_protocol(config),
        retrain_epochs=_retrain_epochs(config),
        seeds=gt.seeds,
        n_retrained=len(union),
        control_drift=tuple(float(d) for d in drift),
        seed_pearson=tuple(float(v) for v in seed_pearson),
        seconds=time.perf_counter() - t,
    )
    timings["retrain"] = ground_truth.seconds

    # ---- agreement, and each solver against the reference (exact on all parameters, else CG)
    reference = next(
        (r for r in runs if r.scores is not None and r.solver == "exact" and r.scope == "all"),
        None,
    ) or next((r for r in runs if r.scores is not None and r.solver == "cg"), None)
    position = {int(j): i for i, j in enumerate(union)}
    solver_results = []
    for r in runs:
        if r.scores is None:
            solver_results.append(
                SolverResult(
                    r.solver,
                    r.scope,
                    solver_label(r.solver, r.scope),
                    r.damping,
                    r.n_params,
                    r.seconds,
                    (),
                    r.note,
                    r.error,
                )
            )
            continue
        point_results = []
        for i, kind in enumerate(kinds):
            idx = chosen[(r.solver, kind)]
            rows = np.array([position[int(j)] for j in idx], dtype=np.int64)
            predicted = r.scores[i, idx]
            act = actual[rows, i]
            fit = agreement(predicted, act)
            score_fit = (
                agreement(r.scores[i], reference.scores[i]) if reference is not None else None
            )
            relative_error = math.nan
            if (
                reference is not None
                and reference.scope == r.scope
                and reference.s_test is not None
            ):
                ref = reference.s_test[:, i]
                relative_error = float((r.s_test[:, i] - ref).norm() / ref.norm())
            point_results.append(
                PointResult(
                    kind=kind,
                    test_index=points[kind],
                    test_id=data.test_ids[points[kind]],
                    label=int(data.y_test[points[kind]]),
                    test_loss=float(test_losses[points[kind]]),
                    train_indices=tuple(int(j) for j in idx),
                    train_ids=tuple(data.train_ids[int(j)] for j in idx),
                    predicted=tuple(float(v) for v in predicted),
                    actual=tuple(float(v) for v in act),
                    actual_std=tuple(float(v) for v in spread[rows, i]),
                    pearson=fit.pearson,
                    spearman=fit.spearman,
                    slope=fit.slope,
                    score_pearson=score_fit.pearson if score_fit else math.nan,
                    score_spearman=score_fit.spearman if score_fit else math.nan,
                    relative_error=relative_error,
                )
            )
        solver_results.append(
            SolverResult(
                r.solver,
                r.scope,
                solver_label(r.solver, r.scope),
                r.damping,
                r.n_params,
                r.seconds,
                tuple(point_results),
                r.note,
                r.error,
            )
        )
    return SettingResult(
        model="cnn",
        label=setting.label,
        depth=setting.architecture.depth,
        width=setting.architecture.width,
        weight_decay=wd,
        n_params=p_all,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        gradient_norm=gradient_norm,
        curvature=tuple(curvature),
        solvers=tuple(solver_results),
        ground_truth=ground_truth,
        seconds=time.perf_counter() - started,
        timings=tuple(timings.items()),
    )


def _run_solver(
    name: str,
    objective: NetworkObjective,
    damping: float,
    sc: SolverSettings,
    scope_test_gradients: Callable[[NetworkObjective], torch.Tensor],
    seed: int,
    spectrum: Spectrum,
) -> _SolverRun:
    """Scores of one solver: s_test = (H + δI)⁻¹∇ℓ_test, score_j = (1/n) ∇ℓ_jᵀ s_test."""
    test_gradients = scope_test_gradients(objective)
    t = time.perf_counter()
    notes: list[str] = []
    solver: InverseHVPSolver | None = None

    def failed(error: Exception) -> _SolverRun:
        """This solver's row when it could not produce scores, with the reason."""
        elapsed = time.perf_counter() - t
        note = "; ".join(notes)
        return _SolverRun(
            name,
            objective.scope,
            damping,
            objective.n_params_,
            elapsed,
            note,
            None,
            None,
            str(error),
        )

    # Lanczos' smallest Ritz value only bounds λ_min from above: if CG meets negative
    # curvature anyway, double the shift and say so.
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                # LiSSA's own depth check assumes H ⪰ λI; the note below uses the true λ_min.
                warnings.simplefilter("ignore", LiSSAWarning)
                solver = make_solver(objective, sc.solver_config(name, damping, seed))
                s_test = solver.inverse_hvp(test_gradients.T)
            break
        except NotPositiveDefiniteError as error:
            if attempt == 3:
                return failed(error)
            shift = damping - sc.damping_margin
            damping = 2 * max(shift, sc.damping_margin) + sc.damping_margin
            notes.append(f"retried with damping {damping:.3g} (negative curvature met)")
        except (ConvergenceError, SolverDivergedError) as error:
            return failed(error)
    assert solver is not None
    scores = InfluenceEngine(objective, solver).scores_from_stest(s_test.T, estimate="first_order")
    if isinstance(solver, CGSolver):
        notes.append(f"{solver.last_iterations} iterations to relative residual {sc.cg_tol:g}")
    if isinstance(solver, LiSSASolver):
        # The damped Hessian's smallest eigenvalue is λ_min + δ; LiSSA keeps a factor
        # (1 - that/scale)^depth of the error along it.
        smallest = max(spectrum.smallest + damping, 1e-12)
        remaining = (1 - smallest / solver.scale) ** solver.depth
        notes.append(
            f"scale {solver.scale:.3g}, depth {solver.depth}, batch {solver.batch_size}: the "
            f"slowest direction keeps {remaining:.2g} of its error"
        )
    return _SolverRun(
        name,
        objective.scope,
        damping,
        objective.n_params_,
        time.perf_counter() - t,
        "; ".join(notes),
        s_test,
        scores,
    )


def _retrain_network(
    network: torch.nn.Module,
    layout: ParameterLayout,
    objective: NetworkObjective,
    X: torch.Tensor,
    y: torch.Tensor,
    wd: float,
    union: np.ndarray,
    X_points: torch.Tensor,
    y_points: torch.Tensor,
    config: FragilityConfig,
    tracker: _Tracker,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Actual changes (m, n_points) averaged over seeds, their std, control drift, seed Pearson."""
    tc, gt = config.training, config.ground_truth
    n = X.shape[0]
    m = len(union)
    weights = torch.ones(m + 1, n)
    weights[torch.arange(1, m + 1), torch.as_tensor(union, dtype=torch.int64)] = 0.0
    theta_hat = layout.flatten(network, torch.float32)
    base = objective.per_example_losses(X_points, y_points).numpy()
    epochs = _retrain_epochs(config)
    inputs = X_points.to(DTYPE)
    losses_of = vmap(objective._losses, in_dims=(0, None, None))
    per_seed, drifts = [], []
    for s in range(gt.seeds):
        thetas = train_sgd(
            network,
            theta_hat[None].repeat(m + 1, 1),
            X,
            y,
            weights,
            wd,
            tc.schedule(epochs),
            seed=tc.seed + 1 + s,
            n_classes=objective.n_classes,
            progress=tracker.inner(epochs, f"retraining {m} models, seed {s + 1}/{gt.seeds}"),
        )
        with torch.no_grad():
            losses = losses_of(thetas.to(DTYPE), inputs, y_points).numpy()  # (m + 1, points)
        per_seed.append(losses[1:] - losses[0])
        drifts.append(losses[0] - base)
    stacked = np.stack(per_seed)  # (seeds, m, points)
    spread = stacked.std(0, ddof=1) if gt.seeds > 1 else np.zeros_like(stacked[0])
    if gt.seeds > 1 and m >= 3:
        seed_pearson = np.array(
            [agreement(stacked[0][:, i], stacked[1][:, i]).pearson for i in range(stacked.shape[2])]
        )
    else:
        seed_pearson = np.full(stacked.shape[2], math.nan)
    return stacked.mean(0), spread, np.mean(drifts, 0), seed_pearson


def _network_protocol(config: FragilityConfig) -> str:
    tc, gt = config.training, config.ground_truth
    return (
        f"Trained {tc.epochs} epochs of minibatch SGD (batch {tc.batch_size}, momentum "
        f"{tc.momentum:g}, cosine learning rate {tc.learning_rate:g} -> 0, seed {tc.seed}). "
        f"Each top-{gt.top_k} point was removed (sample weight 0, 1/n and weight decay kept) and "
        f"the network retrained from the trained parameters for {_retrain_epochs(config)} epochs "
        f"({gt.retrain_fraction:g} of the original), cosine {tc.learning_rate:g} -> 0, momentum "
        f"restarted; actual change = test loss minus that of a control retrained with every "
        f"point on the same minibatch order; averaged over {gt.seeds} minibatch order(s)."
    )


# ---------------------------------------------------------------------------- convex rows
def _run_convex(
    setting: Setting, config: FragilityConfig, data: StudyData, tracker: _Tracker
) -> SettingResult:
    started = time.perf_counter()
    wd = float(setting.weight_decay)
    n = int(data.X_train.shape[0])
    X = data.X_train.reshape(n, -1).to(DTYPE)
    X_test = data.X_test.reshape(data.X_test.shape[0], -1).to(DTYPE)
    y, y_test = data.y_train, data.y_test
    model: LinearModel = (
        LogisticRegression(l2=wd) if setting.model == "logistic" else KernelSVM(l2=wd)
    )
    tracker.stage("fitting")
    try:
        model.fit(X, y)
        engine = InfluenceEngine(model)
    except InfluenceExplorerError as error:
        return _skipped(
            setting,
            f"{CONVEX_MODELS[setting.model]} with weight decay {wd:g} "
            + ("has no unique optimum here" if wd == 0 else "could not be fitted")
            + f" ({error})",
            time.perf_counter() - started,
        )
    fit_seconds = time.perf_counter() - started
    tracker.advance(2, "curvature")
    t = time.perf_counter()
    spectrum = spectrum_from_hessian(model.hessian())
    if spectrum.smallest <= 1e-9 * max(spectrum.largest, 1e-300):
        # Without weight decay on separable pixels the loss keeps falling as ‖θ‖ grows: the
        # "optimum" is wherever Newton stopped and its Hessian is numerically singular.
        return _skipped(
            setting,
            f"{CONVEX_MODELS[setting.model]} without enough weight decay ({wd:g}) has no finite "
            f"optimum here: the fitted Hessian is singular (eigenvalues {spectrum.smallest:.2g} "
            f"to {spectrum.largest:.2g}).",
            time.perf_counter() - started,
        )
    curvature = CurvatureResult(
        "all",
        model.n_params_,
        spectrum.smallest,
        spectrum.largest,
        "eigvalsh",
        0,
        time.perf_counter() - t,
    )
    test_losses = model.loss(X_test, y_test)
    points = _pick_test_points(test_losses)
    kinds = list(points)
    rows = [points[k] for k in kinds]
    t = time.perf_counter()
    verifications = verify(
        engine,
        X_test[rows],
        y_test[rows],
        k=config.ground_truth.top_k,
        select_by="first_order",
        progress=tracker.inner(10, "exact leave-one-out retraining"),
    )
    retrain_seconds = time.perf_counter() - t
    point_results = []
    for kind, v in zip(kinds, verifications, strict=True):
        first, corrected = v.agreement["first_order"], v.agreement["corrected"]
        point_results.append(
            PointResult(
                kind=kind,
                test_index=points[kind],
                test_id=data.test_ids[points[kind]],
                label=int(y_test[points[kind]]),
                test_loss=float(test_losses[points[kind]]),
                train_indices=tuple(int(j) for j in v.train_indices),
                train_ids=tuple(data.train_ids[int(j)] for j in v.train_indices),
                predicted=tuple(float(x) for x in v.predicted["first_order"]),
                actual=tuple(float(x) for x in v.actual),
                actual_std=tuple(0.0 for _ in v.actual),
                pearson=first.pearson,
                spearman=first.spearman,
                slope=first.slope,
                score_pearson=1.0,
                score_spearman=1.0,
                relative_error=0.0,
                corrected_pearson=corrected.pearson,
                corrected_spearman=corrected.spearman,
            )
        )
    solver = SolverResult(
        "exact",
        "all",
        "exact",
        0.0,
        model.n_params_,
        fit_seconds,
        tuple(point_results),
        "first-order estimate; Newton fit and exact leave-one-out refits to gradient norm 1e-11",
    )
    ground_truth = GroundTruthResult(
        protocol=(
            "Convex reference: refitted without each top-k point by Newton's method to "
            "convergence, warm-started from the optimum (exact leave-one-out, no SGD)."
        ),
        retrain_epochs=0,
        seeds=1,
        n_retrained=len(np.unique(np.concatenate([v.train_indices for v in verifications]))),
        control_drift=tuple(0.0 for _ in kinds),
        seed_pearson=tuple(math.nan for _ in kinds),
        seconds=retrain_seconds,
    )
    with torch.no_grad():
        train_accuracy = model.accuracy(X, y)
        test_accuracy = model.accuracy(X_test, y_test)
    return SettingResult(
        model=setting.model,
        label=setting.label,
        depth=0,
        width=0,
        weight_decay=wd,
        n_params=model.n_params_,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        gradient_norm=float(model.objective_gradient().norm()),
        curvature=(curvature,),
        solvers=(solver,),
        ground_truth=ground_truth,
        seconds=time.perf_counter() - started,
        timings=(
            ("fit", fit_seconds),
            ("curvature", curvature.seconds),
            ("retrain", retrain_seconds),
        ),
    )


def _skipped(setting: Setting, reason: str, seconds: float) -> SettingResult:
    arch = setting.architecture
    return SettingResult(
        model=setting.model,
        label=setting.label,
        depth=arch.depth if arch else 0,
        width=arch.width if arch else 0,
        weight_decay=float(setting.weight_decay),
        n_params=0,
        train_accuracy=math.nan,
        test_accuracy=math.nan,
        gradient_norm=math.nan,
        curvature=(),
        solvers=(),
        ground_truth=None,
        seconds=seconds,
        timings=(),
        skipped=reason,
    )


# ============================================================================ views
def build_table(results: FragilityResults) -> FragilityTable:
    """Basu et al.'s Table 1 from a study: one row per convex model and per (CNN, solver)."""
    config = results.config
    columns = tuple((kind, float(wd)) for kind in TEST_POINTS for wd in config.weight_decays)
    row_keys: list[tuple[str, int, int, str, str, str]] = []
    cells: dict[tuple, dict[tuple[str, float], TableCell]] = {}
    for s in results.settings:
        entries = s.solvers or ()
        if s.skipped:
            key = (s.model, s.depth, s.width, "exact", "all", s.label)
            if key not in cells:
                row_keys.append(key)
                cells[key] = {}
            for kind in TEST_POINTS:
                cells[key][(kind, s.weight_decay)] = TableCell(note=s.skipped)
            continue
        for r in entries:
            label = s.label if s.model != "cnn" else f"{s.label} · {r.label}"
            key = (s.model, s.depth, s.width, r.solver, r.scope, label)
            if key not in cells:
                row_keys.append(key)
                cells[key] = {}
            for kind in TEST_POINTS:
                p = r.point(kind)
                cells[key][(kind, s.weight_decay)] = (
                    TableCell(p.pearson, p.spearman, len(p.predicted))
                    if p is not None
                    else TableCell(note=r.error or "not run")
                )
    solver_order = {name: i for i, name in enumerate(FRAGILITY_SOLVERS)}
    model_order = {"logistic": 0, "svm": 1, "cnn": 2}
    row_keys.sort(key=lambda k: (model_order[k[0]], k[1], k[2], solver_order[k[3]], k[4]))
    rows = tuple(
        TableRow(
            label=key[5],
            model=key[0],
            depth=key[1],
            width=key[2],
            solver=key[3],
            scope=key[4],
            cells=tuple(cells[key].get(c, TableCell(note="not run")) for c in columns),
        )
        for key in row_keys
    )
    return FragilityTable(columns=columns, rows=rows)


@dataclass(frozen=True)
class SeriesPoint:
    """One network of a depth or width series."""

    x: int
    label: str
    n_params: int
    pearson: float
    spearman: float


@dataclass(frozen=True)
class CorrelationSeries:
    """Correlation against depth (width fixed) or width (depth fixed), for one solver, test point
    and weight decay: a line of the Trust page's chart."""

    vary: str
    fixed: int
    solver: str
    test_point: str
    weight_decay: float
    points: tuple[SeriesPoint, ...]

    @property
    def name(self) -> str:
        other = "width" if self.vary == "depth" else "depth"
        return (
            f"{self.solver}, {TEST_POINT_DESCRIPTIONS[self.test_point]}, {_wd_text(self.weight_decay)} "
            f"({other} {self.fixed})"
        )


def correlation_series(
    results: FragilityResults,
    vary: str = "depth",
    *,
    solver: str | None = None,
    test_point: str | None = None,
    weight_decay: float | None = None,
) -> tuple[CorrelationSeries, ...]:
    """Pearson and Spearman against depth or width, one series per (other dimension's value,
    solver label, test point, weight decay) with at least two networks.

    Args:
        vary: "depth" or "width".
        solver: keep only this solver label (e.g. "exact", "LiSSA", "exact (last layer)").
        test_point: keep only "high_loss" or "median_loss".
        weight_decay: keep only this λ.
    """
    if vary not in ("depth", "width"):
        raise InfluenceExplorerError(f"vary must be 'depth' or 'width'; got {vary!r}.")
    groups: dict[tuple[int, str, str, float], list[SeriesPoint]] = {}
    for s in results.settings:
        if s.model != "cnn" or s.skipped:
            continue
        if weight_decay is not None and s.weight_decay != weight_decay:
            continue
        x, fixed = (s.depth, s.width) if vary == "depth" else (s.width, s.depth)
        for r in s.solvers:
            if solver is not None and r.label != solver:
                continue
            for p in r.points:
                if test_point is not None and p.kind != test_point:
                    continue
                key = (fixed, r.label, p.kind, s.weight_decay)
                groups.setdefault(key, []).append(
                    SeriesPoint(x, s.label, s.n_params, p.pearson, p.spearman)
                )
    out = []
    for (fixed, label, kind, wd), pts in groups.items():
        if len({p.x for p in pts}) < 2:
            continue
        out.append(
            CorrelationSeries(vary, fixed, label, kind, wd, tuple(sorted(pts, key=lambda p: p.x)))
        )
    return tuple(sorted(out, key=lambda c: (c.fixed, c.weight_decay, c.test_point, c.solver)))


@dataclass(frozen=True)
class SolverComparison:
    """A solver against the reference (exact, else CG) on one network and test point.

    Attributes:
        label: network; weight_decay; test_point.
        solver, reference: solver labels.
        pearson, spearman: the solver's scores against retraining (its own top k).
        reference_pearson, reference_spearman: the reference's against retraining.
        score_pearson: the solver's scores against the reference's over all training points.
        relative_error: ‖s - s_ref‖/‖s_ref‖ of the inverse-HVP (NaN across parameter scopes).
        seconds, reference_seconds: solve times.
    """

    label: str
    weight_decay: float
    test_point: str
    solver: str
    reference: str
    pearson: float
    spearman: float
    reference_pearson: float
    reference_spearman: float
    score_pearson: float
    relative_error: float
    seconds: float
    reference_seconds: float


def solver_comparison(
    results: FragilityResults, solver: str = "lissa", reference: str = "exact"
) -> tuple[SolverComparison, ...]:
    """Solver vs reference on every CNN setting where both ran (e.g. LiSSA vs exact).

    The reference is the named solver on all parameters; where it only ran on the last layer
    (large networks), CG on all parameters is used instead and named as such.
    """
    out = []
    for s in results.settings:
        if s.model != "cnn" or s.skipped:
            continue
        mine = s.solver(solver)
        ref = s.solver(reference, "all") or s.solver("cg", "all")
        if mine is None or ref is None or ref is mine or not mine.points or not ref.points:
            continue
        for p in mine.points:
            q = ref.point(p.kind)
            if q is None:
                continue
            out.append(
                SolverComparison(
                    label=s.label,
                    weight_decay=s.weight_decay,
                    test_point=p.kind,
                    solver=mine.label,
                    reference=ref.label,
                    pearson=p.pearson,
                    spearman=p.spearman,
                    reference_pearson=q.pearson,
                    reference_spearman=q.spearman,
                    score_pearson=p.score_pearson,
                    relative_error=p.relative_error,
                    seconds=mine.seconds,
                    reference_seconds=ref.seconds,
                )
            )
    return tuple(out)


# ============================================================================ results file
def results_to_dict(results: FragilityResults) -> dict[str, Any]:
    """Plain JSON values (NaN and infinities become null)."""
    return _encode(results)


def results_from_dict(data: dict[str, Any]) -> FragilityResults:
    """Inverse of :func:`results_to_dict`.

    Raises:
        InfluenceExplorerError: not a results document of this version.
    """
    if not isinstance(data, dict) or "settings" not in data or "config" not in data:
        raise InfluenceExplorerError("This is not a fragility results document.")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise InfluenceExplorerError(
            f"The fragility results have format version {version!r}; this code reads "
            f"{FORMAT_VERSION}. Rerun `influence fragility` to regenerate them."
        )
    try:
        return _decode(FragilityResults, data)
    except (KeyError, TypeError, ValueError) as error:
        raise InfluenceExplorerError(f"The fragility results are damaged: {error}.") from error


def save_results(results: FragilityResults, path: str | os.PathLike[str]) -> Path:
    """Write the results file atomically (a temporary file renamed into place)."""
    path = Path(path)
    text = json.dumps(results_to_dict(results), indent=1, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text + "\n")
        os.chmod(temporary, 0o644)  # mkstemp makes it private; results are for sharing
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_results(path: str | os.PathLike[str] | None = None) -> FragilityResults:
    """Read a results file (default: the committed one, :func:`bundled_results_path`)."""
    path = Path(path) if path is not None else bundled_results_path()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InfluenceExplorerError(
            f"No fragility results at {path}; run `influence fragility --output {path}`."
        ) from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InfluenceExplorerError(f"Cannot read fragility results {path}: {error}.") from error
    return results_from_dict(data)


def bundled_results_path() -> Path:
    """The full grid's results committed with the code: docs/fragility-results.json."""
    return Path(__file__).resolve().parent.parent / "docs" / "fragility-results.json"


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.ndarray):
        return _encode(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else math.nan
        options = [a for a in args if a is not type(None)]
        for option in options:
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return _decode(option, value)
        if float in options and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return value
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in names})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value, strict=True))
    if tp is float:
        return math.nan if value is None else float(value)
    if tp is int:
        return int(value)
    if tp is str:
        return str(value)
    return value


__all__ = [
    "FORMAT_VERSION",
    "TEST_POINTS",
    "Architecture",
    "CorrelationSeries",
    "CurvatureResult",
    "FragilityConfig",
    "FragilityResults",
    "FragilityTable",
    "GroundTruthConfig",
    "GroundTruthResult",
    "PointResult",
    "SeriesPoint",
    "Setting",
    "SettingResult",
    "SolverComparison",
    "SolverResult",
    "SolverSettings",
    "StudyData",
    "TableCell",
    "TableRow",
    "TrainingConfig",
    "build_table",
    "bundled_results_path",
    "correlation_series",
    "load_results",
    "prepare_data",
    "results_from_dict",
    "results_to_dict",
    "run_fragility",
    "run_setting",
    "save_results",
    "solver_comparison",
    "solver_label",
]
