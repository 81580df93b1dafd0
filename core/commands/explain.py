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
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise InfluenceExplorerError("--k must be at least 1.")
    explainer = build_explainer(args)
    explanation = explainer.explain(
        **query_from_args(args, explainer), k=args.k, estimate=args.estimate, target=args.target
    )
    models = {}
    for key, model in explanation.models.items():
        entry = {
            "label": model.label,
            "predicted": model.predicted_name,
            "probability": float(model.probabilities[model.predicted]),
            "explained_label": model.explained_label_name,
            "loss": model.loss,
            "estimate": model.estimate,
            "estimate_label": ESTIMATE_DESCRIPTIONS[model.estimate],
            "helpful": model.helpful,
            "harmful": model.harmful,
            "familiarity": model.familiarity.as_dict(),
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
        # not be trusted (the image is unlike the training data).
        "warnings": [*explainer.warnings, *explanation.warnings],
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
        lines.append(
            f"{model['label']}: predicts {model['predicted']} ({model['probability']:.2f}); "
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
    return "\n".join(lines)
