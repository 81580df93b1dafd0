"""Choosing the logistic regression's weight decay λ: repeated stratified cross-validation, a
criterion averaged per example, and the one-standard-error rule.

The rule (docs/architecture.md, "Choosing λ"):

1. ``repeats`` times, with seeds derived from ``seed``, split the training set into ``folds``
   stratified folds; for every λ of the grid fit on all folds but one (Newton to 1e-8) and score
   every held-out example: its log-loss, and whether it is classified correctly.
2. Average each example's held-out values over the repeats, then over the examples (per example,
   not per fold, so unequal folds weigh nothing extra); the standard error is the standard
   deviation of the per-example averages divided by √n.
3. The best λ has the lowest mean log-loss (default criterion; or the highest accuracy). Every
   λ whose mean is within one standard error of the best one's is as good as the data can tell;
   of those, the **largest** is chosen (the most regularised model the data cannot reject).

How much cross-validation is done scales with the training set (:func:`selection_plan`): the
standard error shrinks like 1/√n while each fit's cost grows with n, so large sets need fewer
held-out examples per λ and cannot afford 60 fits. Below 10,000 examples: 3 repeats of 5 folds
(60 fits); up to 40,000: one repeat of 3 folds (12 fits); from 40,000: one stratified hold-out
split of a fifth of the examples (4 fits, at least 8,000 held-out examples). A model with many
parameters gets the 3 folds sooner: from the cost (examples x parameters) of 10,000 examples of a
1280-d binary model, e.g. the demo's ten classes (5,000 examples, 12,800 parameters).

λ is never chosen by how good influence looks. The whole curve (mean and standard error per λ)
is kept as a :class:`LambdaCurve` for reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import InfluenceExplorerError
from core.linalg import row_gram
from core.models import LogisticRegression, SampledCurvature

#: Weight decays tried for the logistic regression.
LOGREG_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
#: What cross-validation can score a λ by. Log-loss uses the predicted probabilities, so it
#: separates λs that classify the same examples correctly.
CRITERIA: tuple[str, ...] = ("log_loss", "accuracy")
#: Tolerance of the fold fits (the final fit uses the model's own, 1e-10).
FOLD_TOL = 1e-8
#: Training-set sizes from which :func:`selection_plan` does less cross-validation.
FEWER_FOLDS_FROM = 10_000
HOLD_OUT_FROM = 40_000
#: Examples x parameters from which :func:`selection_plan` does one repeat of 3 folds whatever n:
#: what FEWER_FOLDS_FROM examples of a binary model on 1280-d features cost.
FEWER_FOLDS_FROM_COST = FEWER_FOLDS_FROM * 1280

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SelectionConfig:
    """How λ is chosen. Frozen, so it can key a cache.

    Attributes:
        grid: the λs tried (at least two, all > 0).
        folds: stratified folds per repeat.
        repeats: how many differently seeded splits are averaged.
        criterion: "log_loss" (default) or "accuracy", averaged per held-out example.
        seed: seeds the splits (repeat r uses the seed sequence (seed, r)).
        held_out: how many of the folds are held out in turn (default: all, cross-validation);
            1 is a single hold-out split of 1/folds of the examples, and the rule then
            averages over those examples only.
    """

    grid: tuple[float, ...] = LOGREG_L2_GRID
    folds: int = 5
    repeats: int = 3
    criterion: str = "log_loss"
    seed: int = 0
    held_out: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(sorted(float(v) for v in self.grid)))
        if len(self.grid) < 2 or len(set(self.grid)) != len(self.grid):
            raise InfluenceExplorerError(
                f"grid must list at least two different λ values; got {self.grid!r}."
            )
        if not all(math.isfinite(v) and v > 0 for v in self.grid):
            raise InfluenceExplorerError(f"grid values must be finite and > 0; got {self.grid!r}.")
        if int(self.folds) < 2:
            raise InfluenceExplorerError(f"folds must be >= 2; got {self.folds!r}.")
        if int(self.repeats) < 1:
            raise InfluenceExplorerError(f"repeats must be >= 1; got {self.repeats!r}.")
        if self.held_out is not None and not 1 <= int(self.held_out) <= int(self.folds):
            raise InfluenceExplorerError(
                f"held_out must be between 1 and folds ({self.folds}); got {self.held_out!r}."
            )
        if self.criterion not in CRITERIA:
            raise InfluenceExplorerError(
                f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}."
            )

    @property
    def held_out_folds(self) -> int:
        """How many folds of each repeat are held out (and fitted without)."""
        return int(self.folds) if self.held_out is None else int(self.held_out)

    @property
    def fits(self) -> int:
        """Fits the cross-validation makes."""
        return int(self.repeats) * self.held_out_folds * len(self.grid)

    @property
    def cache_fields(self) -> dict[str, Any]:
        """What a cached curve depends on besides the data (the criterion only picks from it)."""
        fields: dict[str, Any] = {
            "grid": ",".join(f"{v:g}" for v in self.grid),
            "folds": int(self.folds),
            "repeats": int(self.repeats),
            "seed": int(self.seed),
        }
        # Keys of full cross-validation stay as they were.
        if self.held_out_folds != int(self.folds):
            fields["held_out"] = self.held_out_folds
        return fields

    @property
    def description(self) -> str:
        """How the examples are split, in words."""
        if self.held_out_folds == 1 and int(self.repeats) == 1:
            return f"a stratified hold-out split of 1/{self.folds} of the examples"
        held = (
            "" if self.held_out_folds == int(self.folds) else f" ({self.held_out_folds} held out)"
        )
        return f"{self.repeats} x {self.folds}-fold stratified cross-validation{held}"


def selection_plan(n: int, seed: int = 0, parameters: int | None = None) -> SelectionConfig:
    """The cross-validation done for ``n`` training examples of a model with ``parameters``
    weights (see the module docstring): by the examples alone when ``parameters`` is not given.
    A fit's cost grows with n·p, so a many-class model (p = d·C) gets the fewer folds from the
    cost that :data:`FEWER_FOLDS_FROM` examples of a 1280-d binary model have; the hold-out
    split stays reserved for sets with enough examples to hold out."""
    if n >= HOLD_OUT_FROM:
        return SelectionConfig(folds=5, repeats=1, held_out=1, seed=seed)
    costly = parameters is not None and n * parameters >= FEWER_FOLDS_FROM_COST
    if n >= FEWER_FOLDS_FROM or costly:
        return SelectionConfig(folds=3, repeats=1, seed=seed)
    return SelectionConfig(seed=seed)


@dataclass(frozen=True)
class LambdaCurve:
    """Cross-validated quality of each λ and the choice the rule makes.

    Attributes:
        grid: (G,) the λs tried, increasing.
        criterion: "log_loss" (lower is better) or "accuracy" (higher is better).
        mean: (G,) the criterion averaged over every training example's held-out values.
        stderr: (G,) its standard error (per-example standard deviation / √n).
        log_loss, accuracy: (G,) both criteria's means, whichever chose.
        best: the λ with the best mean.
        chosen: the largest λ within one standard error of the best (the model's λ).
        folds, repeats, seed: the cross-validation that produced it.
        n: held-out examples the means are over (every training example, unless a hold-out
            split held out only some).
        held_out: folds held out per repeat (``folds`` for cross-validation).
    """

    grid: tuple[float, ...]
    criterion: str
    mean: tuple[float, ...]
    stderr: tuple[float, ...]
    log_loss: tuple[float, ...]
    accuracy: tuple[float, ...]
    best: float
    chosen: float
    folds: int
    repeats: int
    seed: int
    n: int
    held_out: int | None = None

    @property
    def rule(self) -> str:
        """One sentence saying how ``chosen`` was picked, for reports."""
        direction = "lowest" if self.criterion == "log_loss" else "highest"
        name = "log-loss" if self.criterion == "log_loss" else "accuracy"
        split = SelectionConfig(
            folds=self.folds, repeats=self.repeats, held_out=self.held_out
        ).description
        return (
            f"{split} (seed {self.seed}), "
            f"held-out {name} averaged per example; the largest λ within one standard error of "
            f"the {direction} mean (λ = {self.best:g}) is chosen: λ = {self.chosen:g}."
        )

    @property
    def edge_note(self) -> str | None:
        """A sentence when the best mean is at either end of the grid (the criterion has no
        minimum inside it, so a λ beyond the grid might do better and the choice is the grid's,
        not the data's); else None. The scores stay exact for the model as fitted: this is about
        which model was fitted, not about its influence."""
        if self.best not in (self.grid[0], self.grid[-1]):
            return None
        name = "log-loss" if self.criterion == "log_loss" else "accuracy"
        smallest = self.best == self.grid[0]
        beyond = "smaller" if smallest else "larger"
        end = "smallest" if smallest else "largest"
        what = (
            "the features may support a less regularised model"
            if smallest
            else "the model may need more regularisation than the grid offers"
        )
        return (
            f"The held-out {name} was best at the {end} λ tried ({self.best:g}, of "
            f"{self.grid[0]:g} to {self.grid[-1]:g}), so cross-validation found no optimum inside "
            f"the grid: a {beyond} λ might do better ({what}). The chosen λ = {self.chosen:g} is "
            "limited by the grid; the influence scores are exact for the model as fitted."
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid),
            "criterion": self.criterion,
            "mean": list(self.mean),
            "stderr": list(self.stderr),
            "log_loss": list(self.log_loss),
            "accuracy": list(self.accuracy),
            "best": self.best,
            "chosen": self.chosen,
            "folds": self.folds,
            "repeats": self.repeats,
            "seed": self.seed,
            "n": self.n,
            "held_out": self.folds if self.held_out is None else self.held_out,
            "rule": self.rule,
            "edge_note": self.edge_note,
        }


def one_standard_error_choice(
    mean: Any, stderr: Any, *, higher_is_better: bool = False
) -> tuple[int, int]:
    """The one-standard-error rule over a grid sorted by increasing regularisation.

    Args:
        mean: (G,) criterion per grid value; stderr: (G,) its standard error.
        higher_is_better: True for accuracy, False for a loss.
    Returns:
        (index of the best mean, index of the largest grid value whose mean is within one
        standard error of the best). Ties in the best mean go to the larger grid value.
    """
    mean = np.asarray(mean, dtype=np.float64)
    stderr = np.asarray(stderr, dtype=np.float64)
    if mean.shape != stderr.shape or mean.ndim != 1 or mean.size == 0:
        raise InfluenceExplorerError("mean and stderr must be (G,) arrays of the same length.")
    if not (np.isfinite(mean).all() and np.isfinite(stderr).all()):
        raise InfluenceExplorerError(
            "The cross-validated criterion is not finite for every λ; check the features."
        )
    signed = -mean if higher_is_better else mean  # lower is better from here on
    best = int(np.flatnonzero(signed == signed.min())[-1])
    within = np.flatnonzero(signed <= signed[best] + stderr[best])
    return best, int(within.max())


def stratified_folds(labels: Any, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index of every example: each class shuffled and dealt round-robin. Returns: (n,)."""
    labels = np.asarray(labels)
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        out[rows] = np.arange(len(rows)) % folds
    return out


def held_out_values(
    features: Any,
    labels: Any,
    config: SelectionConfig,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Every example's held-out log-loss and correctness for every λ and repeat.

    Within a fold, λ runs from the largest down and each fit starts from the previous one's
    solution (the path is smooth, so Newton needs few steps). When the fits take dual Newton
    steps (fewer training rows than features, as the demo's 800 of 1280-d), every fold takes
    its Gram matrix from one Gram matrix of all the rows, formed once: the fold's rows and
    columns of it, instead of 60 Gram matrices of the folds.

    Args:
        features: (n, d) training features; labels: (n,) class indices.
    Returns:
        "log_loss" and "correct": (repeats, n, G) arrays, NaN for an example a repeat did not
        hold out (a hold-out split); "theta": (G, p) the last fold's fitted parameters for each
        λ, a warm start for the final fit.
    """
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, grid = len(y), config.grid
    counts = np.bincount(y)
    if np.any(counts[counts > 0] < config.folds):
        raise InfluenceExplorerError(
            f"Each class needs at least {config.folds} training examples for {config.folds}-fold "
            f"cross-validation of λ; the smallest has {int(counts[counts > 0].min())}. Give "
            "logreg_l2 (--logreg-l2) explicitly instead."
        )
    log_loss = np.full((config.repeats, n, len(grid)), np.nan)
    correct = np.full((config.repeats, n, len(grid)), np.nan)
    thetas: list[np.ndarray | None] = [None] * len(grid)
    total, done = config.fits, 0
    features_t = torch.as_tensor(X)
    all_rows: list[torch.Tensor] = []

    def gram_of(rows: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The fold's Gram matrix, taken from all the rows' (formed on first use) once."""
        fold: list[torch.Tensor] = []

        def gram() -> torch.Tensor:
            if not all_rows:
                all_rows.append(row_gram(features_t))
            if not fold:
                fold.append(all_rows[0][rows][:, rows])
            return fold[0]

        return gram

    for r in range(config.repeats):
        fold_of = stratified_folds(y, config.folds, np.random.default_rng([config.seed, r]))
        for fold in range(config.held_out_folds):
            train, held = fold_of != fold, fold_of == fold
            rows = torch.as_tensor(np.flatnonzero(train))
            X_train, y_train, fold_gram = features_t[rows], y[train], gram_of(rows)
            theta = None
            # One sampled-curvature preconditioner along the fold's λ path (used by large fits).
            curvature = SampledCurvature(seed=config.seed)
            for g in reversed(range(len(grid))):
                if progress is not None:
                    progress(done, total)
                model = LogisticRegression(l2=grid[g], tol=FOLD_TOL).fit(
                    X_train, y_train, theta0=theta, row_gram=fold_gram, curvature=curvature
                )
                theta = model.theta_
                thetas[g] = theta.numpy()
                log_loss[r, held, g] = model.loss(X[held], y[held])
                correct[r, held, g] = model.predict(X[held]) == y[held]
                done += 1
    if progress is not None:
        progress(total, total)
    return {"log_loss": log_loss, "correct": correct, "theta": np.stack(thetas)}


def curve_from_values(values: dict[str, np.ndarray], config: SelectionConfig) -> LambdaCurve:
    """Apply the rule to :func:`held_out_values` (or their per-example averages, shape (n, G)).
    Examples that were never held out (NaN, a hold-out split) are left out of the means."""
    per_example = {}
    for name, key in (("log_loss", "log_loss"), ("accuracy", "correct")):
        array = np.asarray(values[key], dtype=np.float64)
        per_example[name] = per_example_average(array) if array.ndim == 3 else array
    shape = per_example["log_loss"].shape
    if len(shape) == 2:
        evaluated = ~np.isnan(per_example["log_loss"]).any(axis=1)
        per_example = {name: array[evaluated] for name, array in per_example.items()}
    n = per_example["log_loss"].shape[0]
    if len(shape) != 2 or n < 2 or shape[1] != len(config.grid):
        raise InfluenceExplorerError(
            "Cross-validation values must be (n, G) with n >= 2 and G the grid's length."
        )
    chosen_values = per_example[config.criterion]
    mean = chosen_values.mean(axis=0)
    stderr = chosen_values.std(axis=0, ddof=1) / math.sqrt(n)
    best, chosen = one_standard_error_choice(
        mean, stderr, higher_is_better=config.criterion == "accuracy"
    )
    return LambdaCurve(
        grid=config.grid,
        criterion=config.criterion,
        mean=tuple(float(v) for v in mean),
        stderr=tuple(float(v) for v in stderr),
        log_loss=tuple(float(v) for v in per_example["log_loss"].mean(axis=0)),
        accuracy=tuple(float(v) for v in per_example["accuracy"].mean(axis=0)),
        best=config.grid[best],
        chosen=config.grid[chosen],
        folds=int(config.folds),
        repeats=int(config.repeats),
        seed=int(config.seed),
        n=int(n),
        held_out=None if config.held_out is None else int(config.held_out),
    )


def per_example_average(array: Any) -> np.ndarray:
    """(repeats, n, G) held-out values averaged over the repeats that held each example out:
    (n, G), NaN where none did."""
    array = np.asarray(array, dtype=np.float64)
    counts = (~np.isnan(array)).sum(axis=0)
    total = np.nansum(array, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def select_l2(
    features: Any,
    labels: Any,
    config: SelectionConfig | None = None,
    progress: Progress | None = None,
) -> LambdaCurve:
    """Choose the logistic regression's λ by the rule above.

    Args:
        features: (n, d) training features; labels: (n,) class indices.
        config: grid, folds, repeats, criterion and seed (default :class:`SelectionConfig`).
        progress: called as progress(fits done, fits in all).
    Returns:
        The whole :class:`LambdaCurve`; the λ to use is ``.chosen``.
    """
    config = config if config is not None else SelectionConfig()
    return curve_from_values(held_out_values(features, labels, config, progress), config)


__all__ = [
    "CRITERIA",
    "LOGREG_L2_GRID",
    "LambdaCurve",
    "SelectionConfig",
    "curve_from_values",
    "held_out_values",
    "one_standard_error_choice",
    "per_example_average",
    "select_l2",
    "selection_plan",
    "stratified_folds",
]
