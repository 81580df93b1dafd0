"""Comparing models' explanations: every pair, rank correlation, shared top-k, label make-up."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from core.compare import (
    Comparison,
    LabelMakeup,
    compare_models,
    label_counts,
    rank_correlation,
    shared,
)

NAMES = ("T-shirt/top", "Shirt")


def _item(index: int, label: int) -> SimpleNamespace:
    return SimpleNamespace(train_index=index, label_name=NAMES[label])


def _model(scores: np.ndarray, labels: np.ndarray, k: int) -> SimpleNamespace:
    """An explanation as the engine builds one: top-k by score, strongest first."""
    order = np.argsort(-scores, kind="stable")
    return SimpleNamespace(
        scores=scores,
        helpful=tuple(_item(int(i), int(labels[i])) for i in order[:k]),
        harmful=tuple(_item(int(i), int(labels[i])) for i in order[::-1][:k]),
    )


@pytest.fixture
def three_models() -> tuple[dict[str, SimpleNamespace], np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    base = rng.normal(size=40)
    models = {
        "a": _model(base, labels, 5),
        "b": _model(base + 0.1 * rng.normal(size=40), labels, 5),  # nearly the same ranking
        "c": _model(-base, labels, 5),  # the reverse ranking
    }
    return models, labels


def test_every_pair_is_compared_once_in_the_models_order(three_models) -> None:
    models, _ = three_models
    comparison = compare_models(models, NAMES)
    assert isinstance(comparison, Comparison)
    assert [(p.first, p.second) for p in comparison.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    by_pair = {(p.first, p.second): p for p in comparison.pairs}
    assert by_pair["a", "c"].spearman == pytest.approx(-1.0)
    assert by_pair["a", "b"].spearman > 0.9
    # The reverse ranking's most helpful images are the first model's most harmful.
    assert by_pair["a", "c"].shared_helpful == 0
    assert shared(models["a"].harmful, models["c"].helpful) == 5
    assert by_pair["a", "b"].shared_helpful == shared(models["a"].helpful, models["b"].helpful)
    assert comparison.k == 5


def test_the_figures_are_scipy_s_and_set_overlaps(three_models) -> None:
    models, _ = three_models
    a, b = models["a"], models["b"]
    expected = stats.spearmanr(a.scores, b.scores).statistic
    assert rank_correlation(a.scores, b.scores) == pytest.approx(expected, abs=0)
    (pair,) = compare_models({"a": a, "b": b}, NAMES).pairs
    assert pair.spearman == pytest.approx(expected, abs=0)
    helpful_a = {item.train_index for item in a.helpful}
    helpful_b = {item.train_index for item in b.helpful}
    assert pair.shared_helpful == len(helpful_a & helpful_b)


def test_label_makeup_lists_every_label_in_class_order(three_models) -> None:
    models, labels = three_models
    comparison = compare_models(models, NAMES)
    assert set(comparison.label_makeup) == {"a", "b", "c"}
    makeup = comparison.label_makeup["a"]
    assert isinstance(makeup, LabelMakeup)
    assert list(makeup.helpful) == list(NAMES)
    helpful_labels = [labels[item.train_index] for item in models["a"].helpful]
    assert makeup.helpful == {NAMES[0]: helpful_labels.count(0), NAMES[1]: helpful_labels.count(1)}
    assert sum(makeup.harmful.values()) == 5
    # A label absent from a list is still listed, with 0.
    assert label_counts([_item(0, 1)], NAMES) == {NAMES[0]: 0, NAMES[1]: 1}


def test_one_model_has_no_pairs_and_empty_lists_give_k_1() -> None:
    lonely = SimpleNamespace(scores=np.zeros(3), helpful=(), harmful=())
    comparison = compare_models({"only": lonely}, NAMES)
    assert comparison.pairs == ()
    assert comparison.k == 1
    assert comparison.label_makeup["only"] == LabelMakeup(
        {n: 0 for n in NAMES}, dict.fromkeys(NAMES, 0)
    )
