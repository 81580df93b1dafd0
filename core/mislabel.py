"""Fixing training data: finding mislabelled training images by self-influence (Koh & Liang 2017, §5.4).

A training point's self-influence is its score on its own loss (docs/architecture.md's convention):

    self_influence(z_j) = (1/n) ∇ℓ(z_j)ᵀ H⁻¹ ∇ℓ(z_j)  ≈  ℓ(z_j, θ̂_{-j}) - ℓ(z_j, θ̂)  ≥ 0

("corrected" replaces H by H_{-j}, i.e. divides by 1 - h_j). It is large for a point the model can
only fit by bending towards it, which is what a wrong label looks like, so checking training
images in decreasing order of self-influence should find wrong labels sooner than checking them in
decreasing order of training loss or at random (the baselines).

The experiment flips a fraction of the training labels (seeded), fits the model to the noisy
labels, ranks the training points, and reports for each ranking the fraction of flipped labels
found against the fraction of training data checked, and the test accuracy after the labels
found among the checked points are fixed and the model refitted.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TextIO

import numpy as np

from core.data import Dataset
from core.errors import InfluenceExplorerError
from core.explainer import FittedModel
from core.influence import ESTIMATES, InfluenceEngine, SolverConfig
from core.models import LinearModel, as_float64, as_labels

#: Orders in which training points are checked.
RANKINGS: tuple[str, ...] = ("self_influence", "training_loss", "random")
#: Fractions of the training set checked at which labels are fixed and the model refitted.
DEFAULT_CHECKPOINTS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)

StageProgress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


# ---------------------------------------------------------------------------------- rankings
def flip_labels(
    labels: Any, fraction: float, *, n_classes: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flip a fraction of the labels, seeded: to the other class (binary) or a random other class.

    Args:
        labels: (n,) class indices.
        fraction: share of the points to flip, in (0, 1); round(fraction·n) points (at least 1).
        n_classes: number of classes (default: max label + 1, at least 2).
        seed: which points are flipped (and to what, for more than two classes).

    Returns:
        (flipped labels (n,), sorted indices of the flipped points).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if not (0 < fraction < 1 and math.isfinite(fraction)):
        raise InfluenceExplorerError(f"The flip fraction must be in (0, 1); got {fraction!r}.")
    n_classes = max(int(labels.max()) + 1, 2) if n_classes is None else int(n_classes)
    count = min(n, max(1, round(fraction * n)))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=count, replace=False))
    flipped = labels.copy()
    # An offset in 1..C-1 always lands on another class.
    offsets = rng.integers(1, n_classes, size=count)
    flipped[chosen] = (labels[chosen] + offsets) % n_classes
    return flipped, chosen


def suspicion(
    engine: InfluenceEngine, by: str, *, estimate: str = "corrected", seed: int = 0
) -> np.ndarray:
    """The value each training point is ranked by (larger = check first).

    Args:
        by: "self_influence", "training_loss" or "random" (uniform random numbers, seeded).
        estimate: which self-influence ("corrected" or "first_order").
    Returns:
        (n_train,) values.
    """
    model = engine.model
    if by == "self_influence":
        if estimate not in ESTIMATES:
            raise InfluenceExplorerError(
                f"estimate must be one of {', '.join(ESTIMATES)}; got {estimate!r}."
            )
        return np.asarray(engine.self_influence(estimate), dtype=np.float64)
    if by == "training_loss":
        return model.per_example_losses(model.features_, model.labels_).numpy()
    if by == "random":
        return np.random.default_rng(seed).random(model.n_train_)
    raise InfluenceExplorerError(f"ranking must be one of {', '.join(RANKINGS)}; got {by!r}.")


def rank_training_points(
    engine: InfluenceEngine,
    by: str = "self_influence",
    *,
    estimate: str = "corrected",
    seed: int = 0,
) -> np.ndarray:
    """Training indices in the order to check them, most suspicious first. Returns: (n_train,)."""
    return np.argsort(-suspicion(engine, by, estimate=estimate, seed=seed), kind="stable")


# ---------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class SuspiciousImage:
    """A training image, ranked by how suspicious its label is.

    Attributes:
        rank: 1 for the most suspicious.
        train_index: row in the training set; id: the dataset's stable id.
        given_label, given_label_name: the label in the training set.
        predicted_label, predicted_label_name: what the fitted model predicts for it.
        self_influence: its influence on its own loss (units of loss; larger is more suspicious).
        training_loss: its loss under the given label.
    """

    rank: int
    train_index: int
    id: str
    given_label: int
    given_label_name: str
    predicted_label: int
    predicted_label_name: str
    self_influence: float
    training_loss: float


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(SuspiciousImage))
_CSV_TYPES: dict[str, Callable[[str], Any]] = {
    "rank": int,
    "train_index": int,
    "given_label": int,
    "predicted_label": int,
    "self_influence": float,
    "training_loss": float,
}


def suspicious_points(
    engine: InfluenceEngine,
    *,
    k: int | None = 20,
    ids: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    estimate: str = "corrected",
) -> tuple[SuspiciousImage, ...]:
    """The k training points of largest self-influence, most suspicious first.

    Args:
        engine: the fitted model's influence engine.
        k: how many (``None``: all).
        ids: stable ids of the training points (default: their indices).
        class_names: names of the classes (default: the indices as text).
        estimate: "corrected" (default) or "first_order" self-influence.
    """
    model = engine.model
    n = model.n_train_
    if k is not None and k < 1:
        raise InfluenceExplorerError(f"k must be at least 1; got {k}.")
    values = suspicion(engine, "self_influence", estimate=estimate)
    losses = suspicion(engine, "training_loss")
    order = np.argsort(-values, kind="stable")[: n if k is None else k]
    given = model.labels_.numpy()
    scores = model.scores(model.features_)
    predicted = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)
    names = [str(c) for c in range(model.n_classes_)] if class_names is None else class_names
    return tuple(
        SuspiciousImage(
            rank=rank + 1,
            train_index=int(j),
            id=str(j) if ids is None else str(ids[j]),
            given_label=int(given[j]),
            given_label_name=str(names[int(given[j])]),
            predicted_label=int(predicted[j]),
            predicted_label_name=str(names[int(predicted[j])]),
            self_influence=float(values[j]),
            training_loss=float(losses[j]),
        )
        for rank, j in enumerate(order)
    )


def suspicious_training_images(
    fitted: FittedModel, dataset: Dataset, *, k: int | None = 20, estimate: str = "corrected"
) -> tuple[SuspiciousImage, ...]:
    """:func:`suspicious_points` for one fitted model of an explainer's collection, with the
    dataset's ids and class names (``dataset``: the data it was fitted on)."""
    return suspicious_points(
        fitted.engine,
        k=k,
        ids=dataset.train_ids,
        class_names=dataset.class_names,
        estimate=estimate,
    )


def suspicious_csv(rows: Sequence[SuspiciousImage]) -> str:
    """The list as CSV text with a header row (for a download button)."""
    buffer = io.StringIO()
    write_suspicious_csv(rows, buffer)
    return buffer.getvalue()


def write_suspicious_csv(
    rows: Sequence[SuspiciousImage], destination: str | os.PathLike[str] | TextIO
) -> None:
    """Write the list as CSV (columns :data:`CSV_COLUMNS`, floats to full precision)."""
    if isinstance(destination, (str, os.PathLike)):
        with open(destination, "w", newline="", encoding="utf-8") as handle:
            write_suspicious_csv(rows, handle)
        return
    writer = csv.writer(destination)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_value(getattr(row, name)) for name in CSV_COLUMNS])


def _csv_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def read_suspicious_csv(source: str | os.PathLike[str] | TextIO) -> tuple[SuspiciousImage, ...]:
    """Read a list written by :func:`write_suspicious_csv`."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, newline="", encoding="utf-8") as handle:
            return read_suspicious_csv(handle)
    reader = csv.DictReader(source)
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise InfluenceExplorerError(
            f"Not a suspicious-labels CSV: expected the columns {', '.join(CSV_COLUMNS)}."
        )
    out = []
    for line, record in enumerate(reader, start=2):
        try:
            values = {name: _CSV_TYPES.get(name, str)(record[name]) for name in CSV_COLUMNS}
        except (TypeError, ValueError) as error:
            raise InfluenceExplorerError(f"Line {line} of the CSV is malformed: {error}.") from None
        out.append(SuspiciousImage(**values))
    return tuple(out)


# ---------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class MislabelConfig:
    """The flipped-labels experiment. Frozen and hashable, so it can key a cache.

    Attributes:
        flip_fraction: share of training labels flipped (default 10%).
        seed: which labels are flipped; the random ranking uses seed + 1.
        checkpoints: fractions of the training set checked at which the labels found are fixed
            and the model is refitted.
        rankings: orders to compare, among :data:`RANKINGS`.
        estimate: which self-influence ranks the points ("corrected" or "first_order").
    """

    flip_fraction: float = 0.1
    seed: int = 0
    checkpoints: tuple[float, ...] = DEFAULT_CHECKPOINTS
    rankings: tuple[str, ...] = RANKINGS
    estimate: str = "corrected"

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(float(c) for c in self.checkpoints))
        object.__setattr__(self, "rankings", tuple(self.rankings))
        if not (0 < self.flip_fraction < 1 and math.isfinite(self.flip_fraction)):
            raise InfluenceExplorerError(
                f"flip_fraction must be in (0, 1); got {self.flip_fraction!r}."
            )
        bad = [c for c in self.checkpoints if not (0 < c <= 1 and math.isfinite(c))]
        if bad:
            raise InfluenceExplorerError(
                f"checkpoints are fractions of the training set in (0, 1]; got {bad}."
            )
        if not self.rankings:
            raise InfluenceExplorerError("rankings must name at least one ranking.")
        unknown = [r for r in self.rankings if r not in RANKINGS]
        if unknown:
            raise InfluenceExplorerError(
                f"rankings must be among {', '.join(RANKINGS)}; got {', '.join(map(repr, unknown))}."
            )
        if self.estimate not in ESTIMATES:
            raise InfluenceExplorerError(
                f"estimate must be one of {', '.join(ESTIMATES)}; got {self.estimate!r}."
            )


@dataclass(frozen=True)
class RankingResult:
    """How one ranking did.

    Attributes:
        ranking: its name.
        order: (n,) training indices in the order checked.
        found: (n + 1,) fraction of the flipped labels found after checking 0, 1, ..., n points.
        found_at_checkpoints: checkpoint (as configured) -> fraction found after checking
            round(checkpoint·n) points.
        fixed_accuracy: checkpoint -> test accuracy after fixing the flipped labels found among the
            checked points and refitting.
    """

    ranking: str
    order: np.ndarray
    found: np.ndarray
    found_at_checkpoints: dict[float, float]
    fixed_accuracy: dict[float, float]

    def found_after(self, fraction: float) -> float:
        """Fraction of flipped labels found after checking this fraction of the training set."""
        n = len(self.order)
        return float(self.found[min(n, max(0, round(fraction * n)))])


@dataclass(frozen=True)
class MislabelExperiment:
    """Finding flipped labels: one :class:`RankingResult` per ranking.

    Attributes:
        config: what was run.
        flipped: sorted indices of the flipped training points.
        clean_accuracy: test accuracy of the model fitted on the clean labels.
        noisy_accuracy: test accuracy of the model fitted on the flipped labels (nothing fixed).
        checked: (n + 1,) fraction of training data checked, 0, 1/n, ..., 1.
        results: ranking -> result.
        seconds: wall time.
    """

    config: MislabelConfig
    flipped: np.ndarray
    clean_accuracy: float
    noisy_accuracy: float
    checked: np.ndarray
    results: dict[str, RankingResult]
    seconds: float


def mislabel_experiment(
    model: LinearModel,
    X_test: Any,
    y_test: Any,
    config: MislabelConfig | None = None,
    *,
    solver: SolverConfig | None = None,
    progress: StageProgress | None = None,
) -> MislabelExperiment:
    """Flip labels, fit, rank, and measure how fast each ranking finds the flips.

    Args:
        model: a model fitted on the clean labels (not modified); the noisy and fixed models are
            refits on its training features (same feature map, warm-started, to tolerance).
        X_test: (m, D) test inputs; y_test: (m,) their true labels.
        config: the experiment (default :class:`MislabelConfig`).
        solver: the inverse-Hessian solver for the noisy model's self-influence.
        progress: ``progress(stage, done, total)``.
    """
    start = time.perf_counter()
    config = config if config is not None else MislabelConfig()
    report = progress or _no_progress
    X_test, y_test = as_float64(X_test), as_labels(y_test)
    clean = model.labels_.numpy()
    n = len(clean)
    noisy_labels, flipped = flip_labels(
        clean, config.flip_fraction, n_classes=model.n_classes_, seed=config.seed
    )
    report("Fitting to the flipped labels", 0, 1)
    noisy = model.refit(labels=noisy_labels)
    engine = InfluenceEngine(noisy, solver)
    report("Fitting to the flipped labels", 1, 1)
    is_flipped = np.zeros(n, dtype=bool)
    is_flipped[flipped] = True
    checked = np.arange(n + 1) / n
    checkpoints = sorted(set(config.checkpoints))
    counts = [min(n, max(1, round(c * n))) for c in checkpoints]
    total = len(config.rankings) * len(counts)
    stage = "Fixing the labels found and refitting"
    results = {}
    for r, ranking in enumerate(config.rankings):
        order = rank_training_points(
            engine, ranking, estimate=config.estimate, seed=config.seed + 1
        )
        found = np.concatenate([[0], np.cumsum(is_flipped[order])]) / len(flipped)
        fixed_accuracy, found_at = {}, {}
        for c, count in enumerate(counts):
            report(stage, r * len(counts) + c, total)
            labels = noisy_labels.copy()
            fix = order[:count][is_flipped[order[:count]]]
            labels[fix] = clean[fix]
            refit = noisy.refit(labels=labels)
            fixed_accuracy[checkpoints[c]] = refit.accuracy(X_test, y_test)
            found_at[checkpoints[c]] = float(found[count])
        results[ranking] = RankingResult(
            ranking=ranking,
            order=order,
            found=found,
            found_at_checkpoints=found_at,
            fixed_accuracy=fixed_accuracy,
        )
    report(stage, total, total)
    return MislabelExperiment(
        config=config,
        flipped=flipped,
        clean_accuracy=model.accuracy(X_test, y_test),
        noisy_accuracy=noisy.accuracy(X_test, y_test),
        checked=checked,
        results=results,
        seconds=time.perf_counter() - start,
    )


def model_mislabel_experiment(
    fitted: FittedModel,
    dataset: Dataset,
    config: MislabelConfig | None = None,
    *,
    progress: StageProgress | None = None,
) -> MislabelExperiment:
    """:func:`mislabel_experiment` for one fitted model of an explainer's collection
    (``dataset``: the data it was fitted on)."""
    return mislabel_experiment(
        fitted.model,
        fitted.test_inputs,
        dataset.test_labels,
        config,
        solver=fitted.solver,
        progress=progress,
    )


def curve_points(result: RankingResult, fractions: Sequence[float]) -> np.ndarray:
    """Fraction found at each of several fractions checked (e.g. a 1% grid for a plot)."""
    return np.array([result.found_after(f) for f in fractions])


__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_CHECKPOINTS",
    "RANKINGS",
    "MislabelConfig",
    "MislabelExperiment",
    "RankingResult",
    "SuspiciousImage",
    "curve_points",
    "flip_labels",
    "mislabel_experiment",
    "model_mislabel_experiment",
    "rank_training_points",
    "read_suspicious_csv",
    "suspicion",
    "suspicious_csv",
    "suspicious_points",
    "suspicious_training_images",
    "write_suspicious_csv",
]
