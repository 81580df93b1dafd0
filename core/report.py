"""Keeping and sharing a result: an explanation or a verification as JSON, CSV and a self-contained
HTML report, and the rules for reading a score's size.

The dashboard's downloads and the command line's ``--output`` files come from the functions here,
so the two always write the same documents:

- :func:`build_report` gathers one query's explanation by every model, with every training image's
  score under **every** estimate, and :func:`report_json`, :func:`report_csv`, :func:`report_html`
  render it (:func:`write_report` picks by file suffix).
- :func:`verification_json` and :func:`verification_csv` do the same for leave-one-out checks;
  :func:`verification_arrays` / :func:`verification_from_arrays` keep one in the artifact store.

How big is a score? Scores are in units of test loss (docs/architecture.md). When the model is all
but certain of the explained label, its loss and every score are tiny, and a list ranked by
differences of 1e-7 says nothing useful. :class:`ScoreScale` states that rule once, in loss units:
a change smaller than :data:`NEGLIGIBLE_LOSS_CHANGE` is negligible. For the logistic loss
-log p a loss change of δ is a relative change of p by about δ, so below 1e-6 the explained
probability moves by less than one part in a million, far below anything shown (two decimals).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InfluenceExplorerError
from core.influence import ESTIMATES
from core.labels import ESTIMATE_LABELS
from core.validation import Agreement, Verification

#: A change in test loss smaller than this, in loss units, is negligible (see the module's doc).
NEGLIGIBLE_LOSS_CHANGE = 1e-6
#: Below this loss a model is "all but certain" of the explained label (probability above
#: e^-0.001 ≈ 0.999 for the logistic loss).
CERTAIN_LOSS = 1e-3
#: The heatmap's full colour never stands for less than this, in test loss per intensity step:
#: a whole 0-255 swing of one pixel then changes the loss by NEGLIGIBLE_LOSS_CHANGE.
HEATMAP_FLOOR = NEGLIGIBLE_LOSS_CHANGE / 255.0
#: Formats the documents declare, bumped when their layout changes.
REPORT_FORMAT = "influence-explorer/explanation"
VERIFICATION_FORMAT = "influence-explorer/verification"
FORMAT_VERSION = 1
#: File suffixes :func:`write_report` understands.
REPORT_SUFFIXES: tuple[str, ...] = (".json", ".csv", ".html")

SIGN_CONVENTION = (
    "score ≈ test loss after removing the training image − test loss with it; positive = it "
    "helped the prediction, negative = it hurt; units: test loss"
)


# ------------------------------------------------------------------------------ score scale
@dataclass(frozen=True)
class ScoreScale:
    """How large one model's scores are for one query, in loss units, and whether they matter.

    Attributes:
        loss: the explained test loss at θ̂.
        largest: the largest |score| over the training images.
        threshold: :data:`NEGLIGIBLE_LOSS_CHANGE`.
        negligible: ``largest < threshold``: removing any one training image changes the loss by
            less than the threshold.
        certain: ``loss < CERTAIN_LOSS``: the model is all but certain of the explained label.
    """

    loss: float
    largest: float
    threshold: float
    negligible: bool
    certain: bool

    def relative(self, score: float) -> float:
        """``score / loss``: the change as a share of the current loss (NaN if the loss is 0)."""
        return float(score) / self.loss if self.loss > 0 else math.nan

    def message(self, model_label: str) -> str | None:
        """A sentence for the page and the documents when the scores are negligible, else None."""
        if not self.negligible:
            return None
        why = (
            f"is all but certain here (loss {self.loss:.1e})"
            if self.certain
            else f"has loss {self.loss:.2g} here"
        )
        return (
            f"The {model_label} {why}: removing any one training image changes this loss by less "
            f"than {self.threshold:.0e} (the largest |score| is {self.largest:.1e}), so its lists "
            "rank differences too small to matter."
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "largest": self.largest,
            "threshold": self.threshold,
            "negligible": self.negligible,
            "certain": self.certain,
        }


def score_scale(scores: Any, loss: float) -> ScoreScale:
    """:class:`ScoreScale` of one model's scores (n_train,) for a query whose loss is ``loss``."""
    values = np.asarray(scores, dtype=np.float64)
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    return ScoreScale(
        loss=float(loss),
        largest=largest,
        threshold=NEGLIGIBLE_LOSS_CHANGE,
        negligible=largest < NEGLIGIBLE_LOSS_CHANGE,
        certain=float(loss) < CERTAIN_LOSS,
    )


def heatmap_scale(values: Any) -> float:
    """The |d loss / d pixel| a heatmap shows at full colour: the 99th percentile of the values
    (so one extreme pixel does not wash out the rest), never below :data:`HEATMAP_FLOOR`, so a
    heatmap of negligible values stays faint instead of fully coloured. Units: test loss per
    intensity step (0-255)."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    top = float(np.percentile(magnitude, 99)) if magnitude.size else 0.0
    return max(top if math.isfinite(top) else 0.0, HEATMAP_FLOOR)


def probability_kind(estimator: Any) -> str | None:
    """How a model's probabilities were made when they are not its own likelihood: "Platt-scaled"
    for a margin model calibrated by Platt scaling (it has a fitted ``platt_``), else None."""
    return "Platt-scaled" if hasattr(estimator, "platt_") else None


def probability_text(probability: float, kind: str | None) -> str:
    """E.g. "Platt-scaled p = 0.84" or "p = 0.84"."""
    return (f"{kind} " if kind else "") + f"p = {probability:.2f}"


# ------------------------------------------------------------------------------ the report
@dataclass(frozen=True)
class ModelReport:
    """One model's part of a report.

    Attributes:
        key, label: which model; features: what it sees.
        explanation: its ``ModelExplanation`` under the shown estimate (top-k lists, distances).
        scores: estimate -> (n_train,) every training image's score under that estimate.
        scale: how large the shown scores are (:func:`score_scale`).
        probability_kind: "Platt-scaled" or None (:func:`probability_kind`).
        check: a leave-one-out check of this query (e.g. the dashboard's quick check), or None.
    """

    key: str
    label: str
    features: str
    explanation: Any
    scores: dict[str, np.ndarray]
    scale: ScoreScale
    probability_kind: str | None
    check: Verification | None = None


@dataclass(frozen=True)
class ExplanationReport:
    """Everything the documents of one explanation hold.

    Attributes:
        title: what was explained, e.g. "Test image #49" or "Uploaded cat.jpg".
        explanation: the ``Explanation`` under the shown estimate.
        estimate: the shown estimate.
        k: helpful and harmful images listed per model.
        models: key -> :class:`ModelReport`, in the explainer's order.
        settings: name -> value: dataset, classes, backbone, solver, hyperparameters.
        train_ids: (n_train,) stable ids; train_labels: (n_train,) label names.
        train_images: (n_train, H, W, C) uint8 (for the HTML report's thumbnails).
        warnings: why the result should not be trusted as it stands (solver, unfamiliar image,
            negligible scores), one sentence each.
        link: the dashboard address that shows this view, if known.
        version: the package version that made it.
    """

    title: str
    explanation: Any
    estimate: str
    k: int
    models: dict[str, ModelReport]
    settings: dict[str, Any]
    train_ids: np.ndarray
    train_labels: np.ndarray
    train_images: np.ndarray
    warnings: tuple[str, ...]
    link: str | None
    version: str


def explainer_settings(explainer: Any) -> dict[str, Any]:
    """The settings a report records: dataset, classes, models' inputs and hyperparameters, solver."""
    config = explainer.config
    settings: dict[str, Any] = {
        "dataset": str(explainer.dataset.name),
        "dataset_sha256": str(explainer.dataset.content_hash),
        "classes": list(explainer.class_names),
        "n_train": int(explainer.n_train),
        "n_test": int(explainer.n_test),
        "backbone": str(config.backbone),
        "solver": str(config.solver.method),
        "damping": float(config.solver.damping),
        "max_train_per_class": config.max_train_per_class,
    }
    for key, summary in explainer.summaries().items():
        settings[f"{key}: inputs"] = summary.features
        for name, value in summary.hyperparameters.items():
            settings[f"{key}: {name}"] = value
        settings[f"{key}: test accuracy"] = summary.test_accuracy
    return settings


def build_report(
    explainer: Any,
    *,
    test_index: int | None = None,
    image: np.ndarray | None = None,
    title: str | None = None,
    k: int = 10,
    estimate: str = ESTIMATES[0],
    target: str = "auto",
    explanations: Mapping[str, Any] | None = None,
    checks: Mapping[str, Verification] | None = None,
    link: str | None = None,
) -> ExplanationReport:
    """Explain one query under every estimate and gather what the documents show.

    Args:
        explainer: a prepared :class:`~core.explainer.Explainer`.
        test_index, image: the query (exactly one), as for ``Explainer.explain``.
        title: how the documents name the query (default "Test image #i" / "Uploaded image").
        k: helpful and harmful images per model; estimate: the estimate the lists are ranked by.
        target: whose loss to explain ("auto", "true", "predicted").
        explanations: estimate -> ``Explanation`` already computed with the same query, k and
            target (e.g. the dashboard's cache); the others are computed here.
        checks: model key -> a leave-one-out check of this query, to include.
        link: the dashboard address of this view.

    Raises:
        InfluenceExplorerError: as ``Explainer.explain``; also for an unknown estimate.
    """
    if estimate not in ESTIMATES:
        raise InfluenceExplorerError(
            f"estimate must be one of {', '.join(ESTIMATES)}; got {estimate!r}."
        )
    query = {"test_index": test_index} if image is None else {"image": image}
    done = dict(explanations or {})
    by_estimate: dict[str, Any] = {}
    for name in (estimate, *(e for e in ESTIMATES if e != estimate)):
        if name in done:
            by_estimate[name] = done[name]
            continue
        try:
            by_estimate[name] = explainer.explain(**query, k=k, estimate=name, target=target)
        except InfluenceExplorerError:
            if name == estimate:
                raise
            # A model without the corrected estimate (a network) leaves that column out.
    shown = by_estimate[estimate]
    summaries = explainer.summaries()
    models = {}
    for key, model in shown.models.items():
        fitted = explainer.models[key]
        models[key] = ModelReport(
            key=key,
            label=model.label,
            features=summaries[key].features,
            explanation=model,
            scores={name: np.asarray(e.models[key].scores) for name, e in by_estimate.items()},
            scale=score_scale(model.scores, model.loss),
            probability_kind=probability_kind(fitted.model),
            check=None if checks is None else checks.get(key),
        )
    warnings = [*explainer.warnings, *shown.warnings]
    warnings += [m.scale.message(m.label) for m in models.values() if m.scale.negligible]
    if title is None:
        title = "Uploaded image" if shown.test_index is None else f"Test image #{shown.test_index}"
    names = np.asarray(explainer.class_names, dtype=object)
    return ExplanationReport(
        title=title,
        explanation=shown,
        estimate=estimate,
        k=int(k),
        models=models,
        settings=explainer_settings(explainer),
        train_ids=np.asarray(explainer.dataset.train_ids).astype(str),
        train_labels=names[np.asarray(explainer.train_labels)].astype(str),
        train_images=np.asarray(explainer.dataset.train_images),
        warnings=tuple(w for w in warnings if w),
        link=link,
        version=_version(),
    )


def _version() -> str:
    import core

    return str(core.__version__)


def _number(value: Any) -> Any:
    """A JSON number (NaN and infinities become null)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _listed(item: Any, scale: ScoreScale) -> dict[str, Any]:
    return {
        "train_index": int(item.train_index),
        "id": str(item.id),
        "label": str(item.label_name),
        "score": _number(item.score),
        "relative_to_loss": _number(scale.relative(item.score)),
        "pixel_distance": _number(item.pixel_distance),
        "feature_distance": _number(item.feature_distance),
    }


def _agreement(agreement: Agreement) -> dict[str, Any]:
    return {name: _number(value) for name, value in agreement.as_dict().items()}


def report_payload(report: ExplanationReport) -> dict[str, Any]:
    """The JSON document as plain Python values (what :func:`report_json` writes)."""
    shown = report.explanation
    models = {}
    for key, m in report.models.items():
        e = m.explanation
        models[key] = {
            "label": m.label,
            "features": m.features,
            "predicted": e.predicted_name,
            "probability": _number(e.probabilities[e.predicted]),
            "probability_kind": m.probability_kind,
            "explained_label": e.explained_label_name,
            "loss": _number(e.loss),
            "familiarity": {
                **{
                    k: _number(v) if isinstance(v, float) else v
                    for k, v in e.familiarity.as_dict().items()
                },
                "message": e.familiarity.message(m.label),
            },
            "scale": {
                **{
                    k: _number(v) if isinstance(v, float) else v
                    for k, v in m.scale.as_dict().items()
                },
                "message": m.scale.message(m.label),
            },
            "helpful": [_listed(item, m.scale) for item in e.helpful],
            "harmful": [_listed(item, m.scale) for item in e.harmful],
            "scores": {name: [_number(v) for v in values] for name, values in m.scores.items()},
            "feature_distances": [_number(v) for v in e.feature_distances],
            "check": None
            if m.check is None
            else {
                "k": len(m.check.train_indices),
                "agreement": {name: _agreement(a) for name, a in m.check.agreement.items()},
                "converged": bool(m.check.converged),
            },
        }
    first = next(iter(report.models.values()))
    return {
        "format": REPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": f"Influence Explorer {report.version}",
        "title": report.title,
        "test_index": shown.test_index,
        "true_label": shown.true_label_name,
        "link": report.link,
        "sign_convention": SIGN_CONVENTION,
        "estimate": report.estimate,
        "estimates": list(first.scores),
        "k": report.k,
        "settings": {
            k: _number(v) if isinstance(v, float) else v for k, v in report.settings.items()
        },
        "warnings": list(report.warnings),
        "models": models,
        "training_images": {
            "train_index": list(range(len(report.train_ids))),
            "id": [str(v) for v in report.train_ids],
            "label": [str(v) for v in report.train_labels],
            "pixel_distance": [_number(v) for v in first.explanation.pixel_distances],
        },
    }


def report_json(report: ExplanationReport) -> str:
    """The explanation as one JSON document: settings, warnings, every model's prediction, lists,
    familiarity, score scale, and every training image's score under every estimate."""
    return json.dumps(report_payload(report), indent=1, ensure_ascii=False, allow_nan=False)


def _csv_number(value: Any) -> str:
    value = float(value)
    return repr(value) if math.isfinite(value) else ""


def report_csv(report: ExplanationReport) -> str:
    """One row per model and training image: its score under every estimate (full precision),
    the score relative to the loss under the shown estimate, and its distances."""
    first = next(iter(report.models.values()))
    estimates = list(first.scores)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "model",
            "train_index",
            "id",
            "label",
            *(f"score_{name}" for name in estimates),
            f"relative_to_loss_{report.estimate}",
            "pixel_distance",
            "feature_distance",
        ]
    )
    for key, m in report.models.items():
        e = m.explanation
        shown = m.scores[report.estimate]
        for j in range(len(report.train_ids)):
            writer.writerow(
                [
                    key,
                    j,
                    report.train_ids[j],
                    report.train_labels[j],
                    *(_csv_number(m.scores[name][j]) for name in estimates),
                    _csv_number(m.scale.relative(shown[j])),
                    _csv_number(e.pixel_distances[j]),
                    _csv_number(e.feature_distances[j]),
                ]
            )
    return buffer.getvalue()


# ------------------------------------------------------------------------------ HTML
def png_data_uri(image: np.ndarray, size: int = 84) -> str:
    """An (H, W, C) uint8 image as a ``data:image/png;base64,...`` URI, enlarged by an integer
    factor with nearest neighbour so its pixels stay visible as pixels."""
    from PIL import Image

    array = np.asarray(image)
    factor = max(1, int(size) // max(array.shape[0], array.shape[1]))
    if factor > 1:
        array = array.repeat(factor, axis=0).repeat(factor, axis=1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:72rem;
color:#111827;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem}h3{font-size:1rem;margin:1rem 0 .4rem}
.query{display:flex;gap:1.5rem;align-items:flex-start}
.warn{background:#fef3c7;border-left:4px solid #d97706;padding:.5rem .8rem;margin:.4rem 0}
.models{display:grid;grid-template-columns:repeat(auto-fit,minmax(22rem,1fr));gap:2rem}
.grid{display:flex;flex-wrap:wrap;gap:.5rem}
figure{margin:0;width:92px;font-size:.72rem;line-height:1.25}
figure img{display:block;image-rendering:pixelated;width:84px;height:84px}
figcaption span{white-space:nowrap;display:block}
table{border-collapse:collapse;font-size:.85rem}td,th{padding:.15rem .6rem;text-align:left;
border-bottom:1px solid #e5e7eb;vertical-align:top}
.muted{color:#6b7280;font-size:.85rem}code{font-size:.85rem;word-break:break-all}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tile(item: Any, scale: ScoreScale, image: np.ndarray) -> str:
    relative = scale.relative(item.score)
    share = f"{relative:+.0%} of loss" if math.isfinite(relative) else ""
    return (
        f'<figure data-train-index="{int(item.train_index)}">'
        f'<img alt="training image #{int(item.train_index)}" src="{png_data_uri(image)}">'
        f"<figcaption><span>#{int(item.train_index)} {_e(item.label_name)}</span>"
        f'<span class="score">{item.score:+.3g}</span><span>{_e(share)}</span>'
        f"<span>d {item.pixel_distance:.1f}</span></figcaption></figure>"
    )


def report_html(report: ExplanationReport) -> str:
    """A self-contained HTML page (images as inline data URIs, no external resources): the query,
    settings, warnings, the link, and per model its prediction and its most helpful and most
    harmful training images with their scores."""
    shown = report.explanation
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Influence Explorer: {_e(report.title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_e(report.title)}</h1>",
        '<div class="query">',
        f'<img alt="the explained image" src="{png_data_uri(shown.image, 168)}" '
        'style="image-rendering:pixelated;width:168px">',
        "<div>",
    ]
    if shown.true_label_name is not None:
        parts.append(f"<p>True label: <b>{_e(shown.true_label_name)}</b></p>")
    else:
        parts.append("<p>An upload has no true label: each model explains its own prediction.</p>")
    parts.append(
        f"<p>Scores: <b>{_e(ESTIMATE_LABELS.get(report.estimate, report.estimate))}</b> "
        f"estimate. {_e(SIGN_CONVENTION)}.</p>"
    )
    if report.link:
        parts.append(
            f'<p>Open in the dashboard: <a href="{_e(report.link)}"><code>{_e(report.link)}</code>'
            "</a></p>"
        )
    parts.append("</div></div>")
    if report.warnings:
        parts.append("<h2>Warnings</h2>")
        parts.extend(f'<p class="warn">{_e(w)}</p>' for w in report.warnings)
    parts.append('<div class="models">')
    for key, m in report.models.items():
        e = m.explanation
        verdict = ""
        if shown.true_label is not None:
            verdict = " ✓" if e.predicted == shown.true_label else " ✗ (wrong)"
        parts.append(f'<section data-model="{_e(key)}"><h2>{_e(m.label)}</h2>')
        parts.append(
            f"<p>Predicts <b>{_e(e.predicted_name)}</b> "
            f"({_e(probability_text(float(e.probabilities[e.predicted]), m.probability_kind))})"
            f"{verdict}. Explaining the loss of <b>{_e(e.explained_label_name)}</b> "
            f"(loss {e.loss:.3g}).</p>"
        )
        if m.check is not None:
            a = m.check.agreement[report.estimate]
            parts.append(
                f"<p>Checked by retraining without each of the top {len(m.check.train_indices)}: "
                f"Pearson {a.pearson:.3f}, Spearman {a.spearman:.3f}, slope {a.slope:.2f}.</p>"
            )
        for title, items in (("Most helpful", e.helpful), ("Most harmful", e.harmful)):
            parts.append(f"<h3>{title} ({len(items)})</h3>")
            if not items:
                parts.append('<p class="muted">None.</p>')
                continue
            parts.append('<div class="grid">')
            parts.extend(
                _tile(item, m.scale, report.train_images[item.train_index]) for item in items
            )
            parts.append("</div>")
        parts.append(
            '<p class="muted">Caption: training index and label · score · score as a share of '
            "the current loss · pixel distance to the explained image.</p></section>"
        )
    parts.append("</div><h2>Settings</h2><table>")
    parts.extend(
        f"<tr><th>{_e(name)}</th><td>{_e(_setting_text(value))}</td></tr>"
        for name, value in report.settings.items()
    )
    parts.append(
        "</table>"
        f'<p class="muted">Made by Influence Explorer {_e(report.version)}. Every training '
        "image's score under every estimate is in the JSON and CSV exports of the same view.</p>"
        "</body></html>"
    )
    return "\n".join(parts)


def _setting_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "—" if value is None else str(value)


def write_report(report: ExplanationReport, path: str | Path) -> Path:
    """Write the document ``path``'s suffix names (.json, .csv or .html).

    Raises:
        InfluenceExplorerError: another suffix, or the file cannot be written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    render = {".json": report_json, ".csv": report_csv, ".html": report_html}.get(suffix)
    if render is None:
        raise InfluenceExplorerError(
            f"--output {path.name}: the suffix must be one of {', '.join(REPORT_SUFFIXES)}."
        )
    _write_text(path, render(report))
    return path


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InfluenceExplorerError(f"Could not write {path}: {exc.strerror or exc}.") from None


# ------------------------------------------------------------------------------ verification
@dataclass(frozen=True)
class VerifiedQuery:
    """One query's leave-one-out checks, for the verification documents.

    Attributes:
        title: e.g. "Test image #3"; test_index: its row, or None for an upload.
        checks: model key -> :class:`~core.validation.Verification`.
    """

    title: str
    test_index: int | None
    checks: dict[str, Verification]


def verification_payload(
    queries: Sequence[VerifiedQuery],
    *,
    model_labels: Mapping[str, str],
    train_ids: Sequence[str],
    train_labels: Sequence[str],
    settings: Mapping[str, Any] | None = None,
    link: str | None = None,
) -> dict[str, Any]:
    """The verification JSON document as plain Python values."""
    out = []
    for query in queries:
        models = {}
        for key, v in query.checks.items():
            models[key] = {
                "label": model_labels.get(key, key),
                "selected_by": v.selected_by,
                "agreement": {name: _agreement(a) for name, a in v.agreement.items()},
                "retrain_seconds": _number(v.seconds),
                "converged": bool(v.converged),
                "points": [
                    {
                        "train_index": int(j),
                        "id": str(train_ids[int(j)]),
                        "label": str(train_labels[int(j)]),
                        "actual": _number(v.actual[i]),
                        **{
                            f"predicted_{name}": _number(values[i])
                            for name, values in v.predicted.items()
                        },
                    }
                    for i, j in enumerate(np.asarray(v.train_indices))
                ],
            }
        out.append({"title": query.title, "test_index": query.test_index, "models": models})
    return {
        "format": VERIFICATION_FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": f"Influence Explorer {_version()}",
        "link": link,
        "sign_convention": SIGN_CONVENTION,
        "settings": {
            k: _number(v) if isinstance(v, float) else v for k, v in (settings or {}).items()
        },
        "results": out,
    }


def verification_json(queries: Sequence[VerifiedQuery], **kwargs: Any) -> str:
    """Leave-one-out checks as one JSON document: per query and model, the statistics under every
    estimate and every retrained point's actual and predicted change."""
    return json.dumps(
        verification_payload(queries, **kwargs), indent=1, ensure_ascii=False, allow_nan=False
    )


def verification_csv(
    queries: Sequence[VerifiedQuery], *, train_ids: Sequence[str], train_labels: Sequence[str]
) -> str:
    """The scatter data: one row per query, model and retrained training image."""
    estimates = _estimates_of(queries)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "query",
            "test_index",
            "model",
            "train_index",
            "id",
            "label",
            "actual",
            *(f"predicted_{name}" for name in estimates),
        ]
    )
    for query in queries:
        for key, v in query.checks.items():
            for i, j in enumerate(np.asarray(v.train_indices)):
                writer.writerow(
                    [
                        query.title,
                        "" if query.test_index is None else query.test_index,
                        key,
                        int(j),
                        train_ids[int(j)],
                        train_labels[int(j)],
                        _csv_number(v.actual[i]),
                        *(_csv_number(v.predicted[name][i]) for name in estimates),
                    ]
                )
    return buffer.getvalue()


def verification_statistics_csv(queries: Sequence[VerifiedQuery]) -> str:
    """The statistics: one row per query, model and estimate (Pearson, Spearman, slope, ...)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "query",
            "test_index",
            "model",
            "estimate",
            "pearson",
            "spearman",
            "slope",
            "intercept",
            "n",
            "retrain_seconds",
            "converged",
        ]
    )
    for query in queries:
        for key, v in query.checks.items():
            for name, a in v.agreement.items():
                writer.writerow(
                    [
                        query.title,
                        "" if query.test_index is None else query.test_index,
                        key,
                        name,
                        _csv_number(a.pearson),
                        _csv_number(a.spearman),
                        _csv_number(a.slope),
                        _csv_number(a.intercept),
                        a.n,
                        _csv_number(v.seconds),
                        v.converged,
                    ]
                )
    return buffer.getvalue()


def _estimates_of(queries: Sequence[VerifiedQuery]) -> list[str]:
    names: list[str] = []
    for query in queries:
        for v in query.checks.values():
            names.extend(name for name in v.predicted if name not in names)
    return names


def write_verification(
    queries: Sequence[VerifiedQuery],
    path: str | Path,
    *,
    model_labels: Mapping[str, str],
    train_ids: Sequence[str],
    train_labels: Sequence[str],
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write the verification document ``path``'s suffix names: .json (statistics and points) or
    .csv (the scatter data).

    Raises:
        InfluenceExplorerError: another suffix, or the file cannot be written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = verification_json(
            queries,
            model_labels=model_labels,
            train_ids=train_ids,
            train_labels=train_labels,
            settings=settings,
        )
    elif suffix == ".csv":
        text = verification_csv(queries, train_ids=train_ids, train_labels=train_labels)
    else:
        raise InfluenceExplorerError(f"--output {path.name}: the suffix must be .json or .csv.")
    _write_text(path, text)
    return path


def verification_arrays(check: Verification) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A verification as named arrays and JSON meta, for :class:`core.store.ArtifactStore`."""
    arrays = {
        "train_indices": np.asarray(check.train_indices, dtype=np.int64),
        "actual": np.asarray(check.actual, dtype=np.float64),
    }
    for name, values in check.predicted.items():
        arrays[f"predicted_{name}"] = np.asarray(values, dtype=np.float64)
    meta = {
        "test_position": int(check.test_position),
        "estimates": list(check.predicted),
        "agreement": {name: a.as_dict() for name, a in check.agreement.items()},
        "selected_by": check.selected_by,
        "seconds": float(check.seconds),
        "converged": bool(check.converged),
    }
    return arrays, meta


def verification_from_arrays(
    arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Verification:
    """The inverse of :func:`verification_arrays`.

    Raises:
        InfluenceExplorerError: the arrays or meta are not a verification's.
    """
    try:
        agreement = {
            name: Agreement(
                pearson=float(a["pearson"]),
                spearman=float(a["spearman"]),
                slope=float(a["slope"]),
                affine_slope=float(a["affine_slope"]),
                intercept=float(a["intercept"]),
                n=int(a["n"]),
            )
            for name, a in meta["agreement"].items()
        }
        return Verification(
            test_position=int(meta["test_position"]),
            train_indices=np.asarray(arrays["train_indices"]),
            predicted={name: np.asarray(arrays[f"predicted_{name}"]) for name in meta["estimates"]},
            actual=np.asarray(arrays["actual"]),
            agreement=agreement,
            selected_by=str(meta["selected_by"]),
            seconds=float(meta["seconds"]),
            converged=bool(meta["converged"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InfluenceExplorerError(f"Not a stored verification: {exc!r}.") from None


__all__ = [
    "CERTAIN_LOSS",
    "HEATMAP_FLOOR",
    "NEGLIGIBLE_LOSS_CHANGE",
    "REPORT_SUFFIXES",
    "SIGN_CONVENTION",
    "ExplanationReport",
    "ModelReport",
    "ScoreScale",
    "VerifiedQuery",
    "build_report",
    "explainer_settings",
    "heatmap_scale",
    "png_data_uri",
    "probability_kind",
    "probability_text",
    "report_csv",
    "report_html",
    "report_json",
    "report_payload",
    "score_scale",
    "verification_arrays",
    "verification_csv",
    "verification_from_arrays",
    "verification_json",
    "verification_payload",
    "verification_statistics_csv",
    "write_report",
    "write_verification",
]
