"""Reference rows for the explainer's models, from the committed fragility study."""

from __future__ import annotations

import pytest

from core.fragility import load_results
from core.models import KernelSVM, LogisticRegression
from core.trust import ReferenceCell, reference_row, trust_reference


@pytest.fixture(scope="module")
def results():
    return load_results()


def test_a_model_finds_the_row_of_its_kind_and_an_unknown_kind_none(results) -> None:
    assert reference_row(results, KernelSVM()).label == "RBF SVM (pixels)"
    assert reference_row(results, LogisticRegression()).label == "Logistic regression (pixels)"
    assert reference_row(results, object()) is None
    assert (
        trust_reference(results, object(), estimate="corrected", on_pixels=True, same_classes=True)
        is None
    )


def test_the_numbers_follow_the_estimate_shown(results) -> None:
    row = reference_row(results, KernelSVM())
    points = row.solvers[0].points
    corrected = trust_reference(
        results, KernelSVM(), estimate="corrected", on_pixels=True, same_classes=True
    )
    first = trust_reference(
        results, KernelSVM(), estimate="first_order", on_pixels=True, same_classes=True
    )
    assert corrected.estimate == "Newton-corrected" and first.estimate == "first-order"
    assert corrected.cells == tuple(
        ReferenceCell(name, p.corrected_pearson, p.corrected_spearman)
        for name, p in zip(("high-loss", "median-loss"), points, strict=True)
    )
    assert [c.pearson for c in first.cells] == [p.pearson for p in points]


def test_what_the_row_measures_says_how_it_differs_from_the_model_here(results) -> None:
    svm = trust_reference(
        results, KernelSVM(), estimate="corrected", on_pixels=True, same_classes=True
    )
    assert svm.measures.startswith("an RBF SVM like this one, on ")
    assert "another class pair" not in svm.measures
    logreg = trust_reference(
        results, LogisticRegression(), estimate="corrected", on_pixels=False, same_classes=False
    )
    assert "(not on ImageNet features as here)" in logreg.measures
    assert logreg.measures.endswith("(another class pair than here)")
