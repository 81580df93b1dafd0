"""How far each of the explainer's models can be trusted, read off the committed fragility study.

The study (:mod:`core.fragility`) checks influence against retraining for CNNs and, as reference
rows, for a logistic regression and an RBF SVM on raw pixels. An explainer model of the same
kind is matched to its reference row by the kind of model it is, not by its key, so a model added
to the explainer later either finds its row or, honestly, none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.fragility import FragilityResults, SettingResult
from core.labels import TEST_POINT_LABELS
from core.models import KernelSVM, LogisticRegression

#: The study's reference row for each kind of explainer model.
_REFERENCE_ROWS: tuple[tuple[type, str], ...] = (
    (KernelSVM, "svm"),
    (LogisticRegression, "logistic"),
)
#: How a sentence names each reference row's model.
_ROW_PHRASES = {"svm": "an RBF SVM", "logistic": "logistic regression"}


@dataclass(frozen=True)
class ReferenceCell:
    """The reference row's agreement with retraining for one test point.

    Attributes:
        test_point: its short name, e.g. "high-loss".
        pearson, spearman: of the estimate against the actual change.
    """

    test_point: str
    pearson: float
    spearman: float


@dataclass(frozen=True)
class TrustReference:
    """How far one of the explainer's models can be trusted, from the study's reference row.

    Attributes:
        row: the reference row's label, e.g. "RBF SVM (pixels)".
        estimate: the estimate the numbers are for ("Newton-corrected" when asked for and
            recorded, else "first-order").
        cells: one per test point, in the study's order.
        measures: what the row measured, and how that differs from the explainer's model.
    """

    row: str
    estimate: str
    cells: tuple[ReferenceCell, ...]
    measures: str


def reference_row(results: FragilityResults, model: Any) -> SettingResult | None:
    """The study's reference row for a fitted model of this kind, or None if it has none."""
    name = next((row for kind, row in _REFERENCE_ROWS if isinstance(model, kind)), None)
    if name is None:
        return None
    return next(
        (s for s in results.settings if s.model == name and not s.skipped and s.solvers), None
    )


def trust_reference(
    results: FragilityResults,
    model: Any,
    *,
    estimate: str,
    on_pixels: bool,
    same_classes: bool,
) -> TrustReference | None:
    """The reference numbers for one fitted model, or None if the study has no row for its kind.

    Args:
        results: the committed study.
        model: the explainer's fitted model (e.g. ``Explainer.models[key].model``).
        estimate: the estimate shown next to it ("corrected" or "first_order"); the corrected
            numbers are used when asked for and recorded for every test point.
        on_pixels: whether the model reads raw pixels (else a backbone's ImageNet features).
        same_classes: whether it was fitted on the study's own dataset and class pair.
    """
    row = reference_row(results, model)
    if row is None:
        return None
    points = row.solvers[0].points
    corrected = estimate == "corrected" and all(math.isfinite(p.corrected_pearson) for p in points)
    cells = tuple(
        ReferenceCell(
            TEST_POINT_LABELS.get(p.kind, p.kind),
            p.corrected_pearson if corrected else p.pearson,
            p.corrected_spearman if corrected else p.spearman,
        )
        for p in points
    )
    config = results.config
    size = f"{config.image_size}×{config.image_size}"
    images = f"{config.n_train} training images of {' vs '.join(results.class_names)}"
    if not same_classes:
        images += " (another class pair than here)"
    what = _ROW_PHRASES[row.model]
    if on_pixels:
        measures = f"{what} like this one, on {size} pixels, {images}"
    else:
        measures = f"{what} on raw {size} pixels (not on ImageNet features as here), {images}"
    return TrustReference(
        row=row.label,
        estimate="Newton-corrected" if corrected else "first-order",
        cells=cells,
        measures=measures,
    )


__all__ = ["ReferenceCell", "TrustReference", "reference_row", "trust_reference"]
