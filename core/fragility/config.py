"""What a fragility study runs: the grid, how networks are trained, how ground truth is measured
and which inverse-Hessian solvers are compared. Frozen dataclasses, validated on construction,
hashable (a configuration keys the dashboard's cache and the resumable progress file)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InfluenceExplorerError
from core.influence import SolverConfig, with_damping
from core.labels import SOLVER_SHORT_LABELS
from core.networks import FAMILIES, Architecture, SGDSchedule

TEST_POINTS: tuple[str, ...] = ("high_loss", "median_loss")
FRAGILITY_SOLVERS: tuple[str, ...] = ("exact", "cg", "lissa")
CONVEX_MODELS = {"logistic": "Logistic regression (pixels)", "svm": "RBF SVM (pixels)"}
#: Setting.model values: a network family ("cnn", "lenet", "resnet") or a convex model.
NETWORK_MODELS: tuple[str, ...] = FAMILIES
MODELS: tuple[str, ...] = (*NETWORK_MODELS, *CONVEX_MODELS)


def solver_label(solver: str, scope: str) -> str:
    """Display name of a solver on a parameter scope: "exact", "exact (last layer)", "CG", "LiSSA"."""
    name = SOLVER_SHORT_LABELS[solver]
    return f"{name} (last layer)" if scope == "last" else name


def wd_text(wd: float) -> str:
    """ "wd 0.001" or "no weight decay"."""
    return "no weight decay" if wd == 0 else f"wd {wd:g}"


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
        seed: initialisation and minibatch order of the original training (repeat r of a cell
            uses ``seed + 1000 r``).
    """

    epochs: int = 100
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
    """Leave-one-out retraining and the noise floor (protocol in :mod:`core.fragility`).

    Attributes:
        top_k: training points retrained per test point and solver (largest |score|).
        retrain_fraction: retraining length as a fraction of the original epochs.
        seeds: minibatch orders the leave-one-out retraining is repeated with (each with its
            own control run on every point); the actual change is their mean.
        noise_seeds: further retrainings on every point (nothing removed), with other minibatch
            orders: with the ``seeds`` control runs they measure how far the test loss moves by
            chance.
        learning_rate: peak learning rate of the retraining's cosine schedule (``None``: the
            training's). A restart at the training's peak kicks a large network far from θ̂ and
            its outcome depends on the minibatch order more than on the removed point.
    """

    top_k: int = 40
    retrain_fraction: float = 0.1
    seeds: int = 2
    noise_seeds: int = 3
    learning_rate: float | None = 0.01

    def __post_init__(self) -> None:
        _check_int("top_k", self.top_k, 3)
        if not (0 < self.retrain_fraction <= 1):
            raise InfluenceExplorerError(
                f"retrain_fraction must be in (0, 1]; got {self.retrain_fraction!r}."
            )
        _check_int("seeds", self.seeds, 1)
        _check_int("noise_seeds", self.noise_seeds, 0)
        if self.learning_rate is not None:
            _check_positive("learning_rate", self.learning_rate)


#: The study's solver configuration: the damping follows the spectrum (networks' Hessians are
#: indefinite), CG to a relative residual of 1e-6, LiSSA 1000 steps deep with minibatches of 50.
STUDY_SOLVER = SolverConfig(
    damping_margin=0.01,
    lanczos_iterations=80,
    cg_tol=1e-6,
    cg_max_iter=2000,
    lissa_depth=1000,
    lissa_batch_size=50,
)


@dataclass(frozen=True)
class SolverSettings:
    """Which inverse-Hessian solvers the study compares, and how.

    Attributes:
        solvers: any of "exact", "cg", "lissa".
        exact_max_params: largest network whose full dense Hessian is computed (p HVPs over the
            training set: 3.4 minutes of an 8-minute cell at 793 parameters on the shared
            machine); larger networks get the exact Hessian of their last layer instead, and CG
            gives the full network's exact answer.
        float64_max_params: larger networks are differentiated in float32 (a CPU has no fast
            float64 convolution); CG's tolerance is then at least 1e-5.
        solver: the engine's :class:`~core.influence.SolverConfig` for every solver (its
            ``method`` is set per solver). ``damping_margin`` is required: the damping is
            δ = max(0, -λ_min) + damping_margin, with λ_min measured once per network (dense
            eigenvalues when the Hessian is formed, else ``lanczos_iterations`` Lanczos steps)
            and shared by all solvers on that network.
    """

    solvers: tuple[str, ...] = FRAGILITY_SOLVERS
    exact_max_params: int = 500
    float64_max_params: int = 5000
    solver: SolverConfig = STUDY_SOLVER

    def __post_init__(self) -> None:
        if not self.solvers or any(s not in FRAGILITY_SOLVERS for s in self.solvers):
            raise InfluenceExplorerError(
                f"solvers must be a non-empty subset of {', '.join(FRAGILITY_SOLVERS)}; "
                f"got {self.solvers!r}."
            )
        if len(set(self.solvers)) != len(self.solvers):
            raise InfluenceExplorerError(f"solvers lists a solver twice: {self.solvers!r}.")
        _check_int("exact_max_params", self.exact_max_params, 1)
        _check_int("float64_max_params", self.float64_max_params, 1)
        if not isinstance(self.solver, SolverConfig):
            raise InfluenceExplorerError(
                f"solver must be a core.influence.SolverConfig; got {type(self.solver).__name__}."
            )
        if self.solver.damping_margin is None:
            raise InfluenceExplorerError(
                "solver.damping_margin must be set: a network's Hessian is indefinite, so the "
                "study damps it by its most negative eigenvalue plus this margin."
            )

    @property
    def damping_margin(self) -> float:
        assert self.solver.damping_margin is not None  # checked on construction
        return self.solver.damping_margin

    def config_for(self, method: str, damping: float, seed: int, float32: bool) -> SolverConfig:
        """The engine's configuration for one solver at a damping already chosen (the study
        measures the spectrum once per network, to report it and share it between solvers)."""
        config = dataclasses.replace(self.solver, method=method, seed=seed)
        if float32:
            config = dataclasses.replace(config, cg_tol=max(config.cg_tol, 1e-5))
        return with_damping(config, damping)


@dataclass(frozen=True)
class Setting:
    """One trained model of the grid: a network or a convex model, and a weight decay.

    ``model`` is the network's family ("cnn", "lenet", "resnet") when ``architecture`` is given,
    else a convex model ("logistic", "svm"). :meth:`network` builds the former.
    """

    model: str = "cnn"
    weight_decay: float = 1e-3
    architecture: Architecture | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise InfluenceExplorerError(
                f"model must be one of {', '.join(MODELS)}; got {self.model!r}."
            )
        if (self.model in NETWORK_MODELS) != (self.architecture is not None):
            raise InfluenceExplorerError(
                "A network setting needs an architecture and a convex one must not have one."
            )
        if self.architecture is not None and self.architecture.family != self.model:
            raise InfluenceExplorerError(
                f"model {self.model!r} does not match the architecture's family "
                f"{self.architecture.family!r}; use Setting.network(architecture, weight_decay)."
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InfluenceExplorerError(
                f"weight_decay must be finite and >= 0; got {self.weight_decay!r}."
            )

    @classmethod
    def network(cls, architecture: Architecture, weight_decay: float) -> Setting:
        return cls(architecture.family, float(weight_decay), architecture)

    @property
    def is_network(self) -> bool:
        return self.architecture is not None

    @property
    def label(self) -> str:
        if self.architecture is not None:
            return self.architecture.label
        return CONVEX_MODELS[self.model]


#: The depth series (width 8), the width series (depth 2, 8 to 50 channels as in the study),
#: LeNet-5 and ResNet-8.
#: In running order: the study's counterparts first (a stopped grid has the comparison), then the
#: rest of the two series.
DEFAULT_ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(2, 8),
    Architecture.lenet5(),
    Architecture.resnet(8, 8),
    Architecture(2, 50),
    Architecture(1, 8),
    Architecture(3, 8),
    Architecture(4, 8),
    Architecture(2, 16),
)


@dataclass(frozen=True)
class FragilityConfig:
    """The whole study: data, grid (architectures x weight decay x solver x repeat), training,
    ground truth.

    Frozen, so it can key a cache. ``FragilityConfig()`` is the full grid of docs/fragility.md;
    :meth:`quick` is a tiny one.

    Attributes:
        classes: class indices or names of the dataset to use (default T-shirt/top vs Shirt);
            ``("all",)`` for every class (softmax; the SVM row is then skipped, it is binary).
        n_train: training images, an equal number per class (a seeded subset of the training
            split); the test split of the chosen classes is used whole.
        image_size: side length the images are average-pooled to (a divisor of theirs).
        architectures: the networks.
        weight_decays: λ values; every model is trained with each.
        convex_models: reference rows, any of "logistic", "svm".
        training, ground_truth, influence: see their classes.
        repeats: how often each network cell is run from another training seed (initialisation
            and minibatch order), to measure the spread of its correlations.
        data_seed: which training images are in the subset.
    """

    classes: tuple[int | str, ...] = (0, 6)
    n_train: int = 500
    image_size: int = 14
    architectures: tuple[Architecture, ...] = DEFAULT_ARCHITECTURES
    weight_decays: tuple[float, ...] = (1e-3, 0.0)
    convex_models: tuple[str, ...] = ("logistic", "svm")
    training: TrainingConfig = TrainingConfig()
    ground_truth: GroundTruthConfig = GroundTruthConfig()
    influence: SolverSettings = SolverSettings()
    repeats: int = 2
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
        _check_int("repeats", self.repeats, 1)

    @classmethod
    def quick(cls, **overrides: Any) -> FragilityConfig:
        """A tiny grid (a minute or two on one core): depth 1 and 2 at width 4, 200 images."""
        values: dict[str, Any] = {
            "n_train": 200,
            "architectures": (Architecture(1, 4), Architecture(2, 4)),
            "training": TrainingConfig(epochs=60, batch_size=50, learning_rate=0.05),
            "ground_truth": GroundTruthConfig(
                top_k=15, retrain_fraction=0.25, seeds=2, noise_seeds=1
            ),
            "repeats": 1,
        }
        values.update(overrides)
        return cls(**values)

    def settings(self) -> tuple[Setting, ...]:
        """Every (model, weight decay) of the grid: convex reference rows first, then the
        networks."""
        out = [Setting(m, wd) for m in self.convex_models for wd in self.weight_decays]
        out += [Setting.network(a, wd) for a in self.architectures for wd in self.weight_decays]
        return tuple(out)

    def cells(self) -> tuple[Cell, ...]:
        """Every unit of work, in running order: each setting once, then the networks' further
        repeats (so a stopped run has the whole grid once before any repeat)."""
        settings = self.settings()
        out = [Cell(s, 0) for s in settings]
        out += [Cell(s, r) for r in range(1, self.repeats) for s in settings if s.is_network]
        return tuple(out)

    def protocol(self) -> tuple[Any, ...]:
        """Everything that decides a cell's result besides which cell it is: two configurations
        with the same protocol give the same result for a cell both contain (a grid can be
        narrowed or extended and keep its finished cells)."""
        return (
            tuple(self.classes),
            self.n_train,
            self.image_size,
            self.training,
            self.ground_truth,
            self.influence,
            self.data_seed,
        )

    def training_seed(self, repeat: int) -> int:
        """The training seed of a cell's repeat (initialisation and minibatch order)."""
        return self.training.seed + 1000 * repeat

    def retrain_epochs(self) -> int:
        return max(1, round(self.ground_truth.retrain_fraction * self.training.epochs))

    def retrain_schedule(self) -> SGDSchedule:
        """The retraining's schedule: the training's, compressed into :meth:`retrain_epochs`,
        from the ground truth's peak learning rate if it has one."""
        peak = self.ground_truth.learning_rate or self.training.learning_rate
        return dataclasses.replace(
            self.training.schedule(self.retrain_epochs()), learning_rate=peak
        )


@dataclass(frozen=True)
class Cell:
    """One unit of the grid: a setting and which repeat of it."""

    setting: Setting
    repeat: int = 0

    @property
    def key(self) -> str:
        """A stable name, e.g. "CNN d2 w8 | wd 0.001 | repeat 0" (progress files use it)."""
        return f"{self.setting.label} | {wd_text(self.setting.weight_decay)} | repeat {self.repeat}"
