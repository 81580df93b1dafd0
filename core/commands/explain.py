"""``influence explain``: the most helpful and harmful training images for one test image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.commands.common import (
    add_common_options,
    add_estimate_option,
    build_explainer,
    emit,
    network_line,
    network_report,
)
from core.errors import InfluenceExplorerError
from core.labels import ESTIMATE_DESCRIPTIONS


def add_query_options(parser: argparse.ArgumentParser) -> None:
    """--test-index or --image, and which label's loss to explain."""
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--test-index", type=int, default=None, help="row of the test set")
    query.add_argument("--image", type=Path, default=None, help="an image file to explain")
    parser.add_argument(
        "--target",
        choices=("auto", "true", "predicted"),
        default="auto",
        help="whose loss to explain: the true label (test images; the default for them) or each "
        "model's predicted label (the default for --image)",
    )


def query_from_args(args: argparse.Namespace, explainer: Any) -> dict[str, Any]:
    """Keyword arguments ``test_index=`` or ``image=`` for the explainer."""
    if args.image is not None:
        from core.images import load_image_file

        decoded = load_image_file(
            args.image,
            target_shape=explainer.dataset.image_shape,
            light_on_dark=explainer.dataset.light_on_dark,
        )
        return {"image": decoded.image}
    if args.test_index is None:
        raise InfluenceExplorerError("Give --test-index I or --image PATH.")
    return {"test_index": args.test_index}


def add_report_option(parser: argparse.ArgumentParser) -> None:
    """--output PATH (repeatable): the documents the dashboard's Explain page downloads."""
    parser.add_argument(
        "--output",
        action="append",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the explanation to PATH: .html (a self-contained report with the "
        "images), .json or .csv (every training image's score under every estimate); repeat for "
        "several",
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="top-k helpful and harmful training images for a test image, every model",
        description="Score every training image's influence on one test image's loss for every "
        "model. Scores are in units of test loss: positive = helped (removing the image would "
        "raise the loss), negative = hurt.",
    )
    add_query_options(parser)
    parser.add_argument("--k", type=int, default=10, help="helpful and harmful images to list")
    add_estimate_option(parser, "which estimate of the leave-one-out change scores the images")
    parser.add_argument(
        "--all-scores", action="store_true", help="include every training image's score in --json"
    )
    add_report_option(parser)
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.report import (
        REPORT_SUFFIXES,
        build_report,
        probability_kind,
        score_scale,
        write_report,
    )

    if args.k < 1:
        raise InfluenceExplorerError("--k must be at least 1.")
    for path in args.output or ():
        if path.suffix.lower() not in REPORT_SUFFIXES:
            raise InfluenceExplorerError(
                f"--output {path}: the suffix must be one of {', '.join(REPORT_SUFFIXES)}."
            )
    explainer = build_explainer(args)
    query = query_from_args(args, explainer)
    explanation = explainer.explain(**query, k=args.k, estimate=args.estimate, target=args.target)
    if args.output:
        report = build_report(
            explainer,
            **query,
            title=None if args.image is None else f"Uploaded {args.image.name}",
            k=args.k,
            estimate=args.estimate,
            target=args.target,
            explanations={args.estimate: explanation},
        )
        for path in args.output:
            write_report(report, path)
    models = {}
    for key, model in explanation.models.items():
        scale = score_scale(model.scores, model.loss)
        entry = {
            "label": model.label,
            "predicted": model.predicted_name,
            "probability": float(model.probabilities[model.predicted]),
            "probability_kind": probability_kind(explainer.models[key].model),
            "explained_label": model.explained_label_name,
            "loss": model.loss,
            "estimate": model.estimate,
            "estimate_label": ESTIMATE_DESCRIPTIONS[model.estimate],
            "helpful": model.helpful,
            "harmful": model.harmful,
            "familiarity": model.familiarity.as_dict(),
            "scale": {**scale.as_dict(), "message": scale.message(model.label)},
        }
        if args.all_scores:
            entry["scores"] = model.scores
        models[key] = entry
    payload = {
        "dataset": explainer.dataset.name,
        "test_index": explanation.test_index,
        "image": None if args.image is None else str(args.image),
        "true_label": explanation.true_label_name,
        "sign_convention": "score ≈ test loss after removing the image minus before; "
        "positive = helped, negative = hurt",
        "seconds": explanation.seconds,
        "models": models,
        # Why the scores may be inaccurate (LiSSA too short: also printed on stderr) or should
        # not be trusted (the image is unlike the training data, the scores are negligible).
        "warnings": [
            *explainer.warnings,
            *explanation.warnings,
            *(m["scale"]["message"] for m in models.values() if m["scale"]["message"]),
        ],
        "outputs": [str(path) for path in args.output or ()],
        # The user's network (--network): what it is, its preprocessing, and how its refitted
        # last layer agrees with its own head; None without one.
        "network": network_report(explainer),
    }
    emit(payload, args, _report)
    return 0


def _report(payload: dict[str, Any]) -> str:
    what = (
        f"test image {payload['test_index']} (true label: {payload['true_label']})"
        if payload["test_index"] is not None
        else f"image {payload['image']}"
    )
    lines = [f"{payload['dataset']}: {what}", f"Sign: {payload['sign_convention']}.", ""]
    if payload["network"] is not None:
        lines[-1:-1] = [network_line(payload["network"]), payload["network"]["what_is_explained"]]
    for model in payload["models"].values():
        kind = f", {model['probability_kind']}" if model["probability_kind"] else ""
        lines.append(
            f"{model['label']}: predicts {model['predicted']} ({model['probability']:.2f}{kind}); "
            f"explaining the loss of '{model['explained_label']}' = {model['loss']:.4f} "
            f"(estimate: {model['estimate_label']})"
        )
        for title, items in (("helped", model["helpful"]), ("hurt", model["harmful"])):
            lines.append(f"  most {title}:")
            lines.append(f"    {'train#':>6}  {'score':>10}  {'pixel dist':>10}  label / id")
            for item in items:
                lines.append(
                    f"    {item.train_index:>6}  {item.score:>+10.2e}  {item.pixel_distance:>10.2f}  "
                    f"{item.label_name} / {item.id}"
                )
            if not items:
                lines.append("    (none)")
        lines.append("")
    lines.extend(f"Warning: {warning}" for warning in payload["warnings"])
    lines.extend(f"Wrote {path}" for path in payload["outputs"])
    return "\n".join(lines)
