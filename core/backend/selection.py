"""Choosing the logistic regression's λ on a cluster, by the rule of :mod:`core.selection`.

:func:`held_out_values` is :func:`core.selection.held_out_values` with the features left in
shards: the same repeated stratified folds (the same seeds, so the same rows in each fold), the
same grid walked from the largest λ down with each fit warm-started from the previous one, and
the same per-example held-out log-loss and correctness, which :func:`core.selection.curve_from_values`
then turns into the curve and the one-standard-error choice exactly as in-process.

A fold's fit is a :class:`~core.backend.models.ShardedLogisticRegression` on all the shards with
the held-out rows weighted 0. Its objective divides by n, the in-process fold fit's by the
n_train rows it keeps, so it uses λ·n_train/n and tolerance tol·n_train/n: the objective is then
the in-process one times n_train/n, with the same minimiser and the same stopping rule
‖∇R‖ <= tol on the in-process scale. Only the n·C training scores of each fit come back to the
driver, never the features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.backend.models import ShardedLogisticRegression
from core.backend.shards import ShardedData
from core.errors import InfluenceExplorerError
from core.selection import FOLD_TOL, Progress, SelectionConfig, stratified_folds


def held_out_values(
    data: ShardedData,
    labels: Any,
    config: SelectionConfig,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Every example's held-out log-loss and correctness for every λ and repeat, fitted on the
    shards (see the module docstring).

    Args:
        data: the training features in shards; labels: (n,) their class indices (checked
            against the shards').
        config: grid, folds, repeats and seed, as in-process.
    Returns:
        "log_loss" and "correct": (repeats, n, G) arrays, as
        :func:`core.selection.held_out_values` (NaN where a hold-out split held nothing out).
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not np.array_equal(y, data.labels()):
        raise InfluenceExplorerError(
            "labels do not match the labels held in the shards; build the shards from the same "
            "rows."
        )
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
    total, done = config.fits, 0
    labels_t = torch.tensor(y)  # a copy: y may be a read-only view of the stored labels
    for r in range(config.repeats):
        fold_of = stratified_folds(y, config.folds, np.random.default_rng([config.seed, r]))
        for fold in range(config.held_out_folds):
            train, held = fold_of != fold, fold_of == fold
            share = float(train.sum()) / n
            theta = None
            for g in reversed(range(len(grid))):
                if progress is not None:
                    progress(done, total)
                model = ShardedLogisticRegression(l2=grid[g] * share, tol=FOLD_TOL * share).fit(
                    data, sample_weight=train.astype(np.float64), theta0=theta
                )
                theta = model.theta_
                scores = model.training_scores()[torch.from_numpy(held)]
                log_loss[r, held, g] = model.loss_.value(scores, labels_t[held]).numpy()
                if model.n_outputs_ == 1:
                    predicted = (scores[:, 0] > 0).to(torch.int64).numpy()
                else:
                    predicted = scores.argmax(dim=1).numpy()
                correct[r, held, g] = predicted == y[held]
                done += 1
    if progress is not None:
        progress(total, total)
    return {"log_loss": log_loss, "correct": correct}


__all__ = ["held_out_values"]
