"""How far each of the explainer's models can be trusted, read off the committed fragility study.

The study (:mod:`core.fragility`) checks influence against retraining for CNNs and, as reference
rows, for a logistic regression and an RBF SVM, both on raw pixels (the study fits every model of
its grid to the images' pixels). An explainer model is matched to a row by the kind of model it is
**and** what it reads, not by its key: the SVM on pixels has its own row; the logistic regression
on a backbone's ImageNet features has none, and is told so, with what the nearest row (the same
kind of model on pixels) measures, rather than being given that row as if it were its own.
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
#: What every reference row of the study reads (core.fragility fits all models on pixels).
STUDY_INPUTS = "raw pixels"


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
        matches: the row is for this kind of model on these inputs. When False, the row is only
            the nearest one (same kind of model, other inputs) and ``missing`` says so.
        missing: when the study has no row for this model on its inputs, a sentence saying
            exactly that; else "".
    """

    row: str
    estimate: str
    cells: tuple[ReferenceCell, ...]
    measures: str
    matches: bool = True
    missing: str = ""


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

    A model that does not read raw pixels gets the row of its kind with ``matches=False`` and a
    ``missing`` sentence: the study has no row for it, and that row is only the nearest.

    Args:
        results: the committed study.
        model: the explainer's fitted model (e.g. ``Explainer.models[key].model``).
        estimate: the estimate shown next to it ("margin", "corrected" or "first_order"). The
            study records the first-order and the Newton-corrected numbers; for "margin" (the
            same Newton-corrected parameter change, the loss not linearised) the corrected ones
            are the nearest and are labelled as such.
        on_pixels: whether the model reads raw pixels (else a backbone's ImageNet features).
        same_classes: whether it was fitted on the study's own dataset and class pair.
    """
    row = reference_row(results, model)
    if row is None:
        return None
    points = row.solvers[0].points
    corrected = estimate in ("corrected", "margin") and all(
        math.isfinite(p.corrected_pearson) for p in points
    )
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
        missing = ""
    else:
        measures = f"{what} on {STUDY_INPUTS} ({size}), {images}"
        missing = (
            f"The committed study has no row for {what} on ImageNet features: it checked "
            "networks trained end to end and, as references, convex models on "
            f"{STUDY_INPUTS} only."
        )
    return TrustReference(
        row=row.label,
        estimate=(
            "first-order"
            if not corrected
            else "Newton-corrected"
            if estimate == "corrected"
            else "Newton-corrected (the nearest the study records to exact-in-the-margin)"
        ),
        cells=cells,
        measures=measures,
        matches=on_pixels,
        missing=missing,
    )


__all__ = ["STUDY_INPUTS", "ReferenceCell", "TrustReference", "reference_row", "trust_reference"]
