"""``influence verify``: check influence against leave-one-out retraining, every model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.commands.common import (
    StageBars,
    add_common_options,
    build_explainer,
    emit,
    network_line,
    network_report,
)
from core.commands.explain import add_query_options, query_from_args
from core.errors import InfluenceExplorerError
from core.labels import ESTIMATE_DESCRIPTIONS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="retrain without each of the top-k training images and compare with the estimates",
        description="For a test image, retrain every model without each of its k most influential "
        "training images (by |score| of the default estimate), warm-started and to tolerance "
        "1e-11, and compare the actual change in test loss with every estimate on the same "
        "points: Pearson, Spearman, the slope through the origin of actual against predicted "
        "(Σ predicted·actual / Σ predicted²; 1 = predicted ≈ actual) and, for comparison, the "
        "slope and intercept of a fitted line.",
    )
    add_query_options(parser)
    parser.add_argument(
        "--test-indices",
        default=None,
        help="several test rows at once, comma-separated (true labels); overrides --test-index",
    )
    parser.add_argument("--k", type=int, default=50, help="points to retrain per test image")
    parser.add_argument(
        "--output",
        action="append",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the results to PATH: .json (statistics and every retrained point) or "
        ".csv (the scatter data: actual and predicted change per retrained point); repeatable",
    )
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.report import VerifiedQuery, explainer_settings, write_verification

    if args.k < 3:
        raise InfluenceExplorerError("--k must be at least 3 to compute correlations.")
    for path in args.output or ():
        if path.suffix.lower() not in (".json", ".csv"):
            raise InfluenceExplorerError(f"--output {path}: the suffix must be .json or .csv.")
    explainer = build_explainer(args)
    bars = StageBars(enabled=not args.quiet)
    if args.test_indices:
        try:
            indices = [int(i) for i in args.test_indices.split(",") if i.strip()]
        except ValueError:
            raise InfluenceExplorerError("--test-indices takes integers, e.g. 0,5,17.") from None
        results = explainer.verify_many(indices, k=args.k, progress=bars)
        per_test = [
            {"test_index": i, "models": {key: results[key][n] for key in results}}
            for n, i in enumerate(indices)
        ]
    else:
        query = query_from_args(args, explainer)
        result = explainer.verify(**query, k=args.k, target=args.target, progress=bars)
        per_test = [{"test_index": query.get("test_index"), "models": result}]
    if args.output:
        names = list(explainer.class_names)
        queries = [
            VerifiedQuery(
                title=f"Test image #{item['test_index']}"
                if item["test_index"] is not None
                else f"Uploaded {args.image.name}",
                test_index=item["test_index"],
                checks=item["models"],
            )
            for item in per_test
        ]
        for path in args.output:
            write_verification(
                queries,
                path,
                model_labels={key: fitted.label for key, fitted in explainer.models.items()},
                train_ids=[str(i) for i in explainer.dataset.train_ids],
                train_labels=[names[int(c)] for c in explainer.train_labels],
                settings=explainer_settings(explainer),
            )
    payload = {
        "dataset": explainer.dataset.name,
        "k": args.k,
        "results": [
            {
                "test_index": item["test_index"],
                "models": {
                    key: {
                        "label": explainer.models[key].label,
                        "selected_by": v.selected_by,
                        "estimate_labels": {e: ESTIMATE_DESCRIPTIONS[e] for e in v.agreement},
                        "agreement": {e: a.as_dict() for e, a in v.agreement.items()},
                        "retrain_seconds": v.seconds,
                        "converged": v.converged,
                        "train_indices": v.train_indices,
                        "predicted": v.predicted,
                        "actual": v.actual,
                    }
                    for key, v in item["models"].items()
                },
            }
            for item in per_test
        ],
        # Why the scores may be inaccurate (e.g. LiSSA too short); also printed on stderr.
        "warnings": list(explainer.warnings),
        # The user's network (--network): what it is, its preprocessing, and how its refitted
        # last layer agrees with its own head; None without one.
        "network": network_report(explainer),
    }
    emit(payload, args, _report)
    return 0


def _report(payload: dict[str, Any]) -> str:
    lines = [f"{payload['dataset']}: leave-one-out check of the top {payload['k']} by |score|", ""]
    if payload["network"] is not None:
        lines[-1:-1] = [network_line(payload["network"])]
    for item in payload["results"]:
        index = item["test_index"]
        lines.append("uploaded image" if index is None else f"test image {index}")
        for model in item["models"].values():
            lines.append(f"  {model['label']} (retraining took {model['retrain_seconds']:.1f} s)")
            for estimate, a in model["agreement"].items():
                lines.append(
                    f"    {ESTIMATE_DESCRIPTIONS[estimate]:<58} Pearson {a['pearson']:.3f}  "
                    f"Spearman {a['spearman']:.3f}  slope {a['slope']:.3f} (through 0; "
                    f"fitted line {a['affine_slope']:.3f}, intercept {a['intercept']:+.1e})"
                )
        lines.append("")
    return "\n".join(lines)
