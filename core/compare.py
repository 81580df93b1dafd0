"""How the models' explanations of one query relate: rank agreement, shared top-k, label make-up.

Koh & Liang's Figure 2 contrasts an RBF SVM, whose influential images are its nearest neighbours
in pixels, with a model on learned features, which draws influence from far away. These numbers
say how much two explanations of the same image agree, for every pair of models the explainer
holds (any number of them), and what labels each model's top-k lists are made of.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Protocol

import numpy as np
from scipy import stats


class _Ranked(Protocol):
    """What a comparison reads of one training image in a top-k list (e.g. InfluentialImage)."""

    train_index: int
    label_name: str


class _Explained(Protocol):
    """What a comparison reads of one model's explanation (e.g. ModelExplanation)."""

    scores: np.ndarray
    helpful: Sequence[_Ranked]
    harmful: Sequence[_Ranked]


@dataclass(frozen=True)
class PairAgreement:
    """How two models' explanations of the same query agree.

    Attributes:
        first, second: the two models' keys, in the explainer's order.
        spearman: rank correlation of their scores over every training image (NaN if either
            model gives every image the same score).
        shared_helpful, shared_harmful: training images in both models' top-k helpful (harmful)
            lists.
    """

    first: str
    second: str
    spearman: float
    shared_helpful: int
    shared_harmful: int


@dataclass(frozen=True)
class LabelMakeup:
    """How many images of each training label one model's top-k lists hold.

    Attributes:
        helpful, harmful: label name -> count, every label listed (0 if absent), in class order.
    """

    helpful: dict[str, int]
    harmful: dict[str, int]


@dataclass(frozen=True)
class Comparison:
    """The models' explanations of one query, compared.

    Attributes:
        pairs: one :class:`PairAgreement` per pair of models (none for a single model).
        label_makeup: model key -> its lists' :class:`LabelMakeup`.
        k: the longest top-k list (at least 1): what "shared" counts are out of.
    """

    pairs: tuple[PairAgreement, ...]
    label_makeup: dict[str, LabelMakeup]
    k: int


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation of two (n_train,) score vectors."""
    return float(stats.spearmanr(first, second).statistic)


def shared(first: Iterable[_Ranked], second: Iterable[_Ranked]) -> int:
    """How many training images two lists have in common."""
    return len({item.train_index for item in first} & {item.train_index for item in second})


def label_counts(items: Iterable[_Ranked], class_names: Sequence[str]) -> dict[str, int]:
    """label name -> how many of ``items`` carry it, every class listed, in class order."""
    counts = dict.fromkeys(class_names, 0)
    for item in items:
        counts[item.label_name] += 1
    return counts


def compare_models(models: Mapping[str, _Explained], class_names: Sequence[str]) -> Comparison:
    """Compare every pair of models' explanations of one query.

    Args:
        models: model key -> its explanation (``Explanation.models``), in the explainer's order.
        class_names: the training labels' names, for the label make-up.
    """
    pairs = tuple(
        PairAgreement(
            first=a,
            second=b,
            spearman=rank_correlation(models[a].scores, models[b].scores),
            shared_helpful=shared(models[a].helpful, models[b].helpful),
            shared_harmful=shared(models[a].harmful, models[b].harmful),
        )
        for a, b in combinations(models, 2)
    )
    makeup = {
        key: LabelMakeup(
            helpful=label_counts(model.helpful, class_names),
            harmful=label_counts(model.harmful, class_names),
        )
        for key, model in models.items()
    }
    k = max((len(items) for m in models.values() for items in (m.helpful, m.harmful)), default=0)
    return Comparison(pairs=pairs, label_makeup=makeup, k=max(k, 1))


__all__ = [
    "Comparison",
    "LabelMakeup",
    "PairAgreement",
    "compare_models",
    "label_counts",
    "rank_correlation",
    "shared",
]
