"""``influence mislabel``: find flipped training labels by self-influence; list suspicious images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.commands.common import (
    StageBars,
    add_common_options,
    add_estimate_option,
    build_explainer,
    emit,
)
from core.commands.lists import add_model_choice, model_keys, parse_choices, parse_fractions
from core.errors import InfluenceExplorerError
from core.labels import ESTIMATE_DESCRIPTIONS, RANKING_LABELS


def register(subparsers: Any) -> None:
    from core.mislabel import DEFAULT_CHECKPOINTS, RANKINGS

    parser = subparsers.add_parser(
        "mislabel",
        help="flip some training labels and see how fast self-influence finds them",
        description="Flip a fraction of the training labels (seeded), refit, and check training "
        "images in order of self-influence, of training loss, or at random: the fraction of "
        "flipped labels found against the fraction of training data checked, and the test "
        "accuracy after fixing the labels found. Also lists the most suspicious images of the "
        "actual training set (by self-influence) and can export the list as CSV.",
    )
    add_model_choice(parser)
    parser.add_argument(
        "--flip-fraction", type=float, default=0.1, help="share of labels flipped (default 0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="which labels are flipped")
    parser.add_argument(
        "--checkpoints",
        default=",".join(f"{c:g}" for c in DEFAULT_CHECKPOINTS),
        help="fractions checked at which the labels found are fixed and the model refitted",
    )
    parser.add_argument(
        "--rankings",
        default=",".join(RANKINGS),
        help=f"orders to compare, among {', '.join(RANKINGS)} (default: all)",
    )
    # The flipped-labels figures in docs/beyond-single-points.md were measured with "corrected".
    add_estimate_option(parser, "which self-influence ranks the images", default="corrected")
    parser.add_argument(
        "--curve-step",
        type=float,
        default=0.01,
        help="spacing of the found-vs-checked curve in --json (fraction of the training set)",
    )
    parser.add_argument(
        "--suspicious",
        type=int,
        default=10,
        help="list this many most suspicious images of the actual training set (0: none)",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="write the whole suspicious list (every training image, ranked) as CSV; with several "
        "models, one file per model named <stem>-<model><suffix>",
    )
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.mislabel import (
        RANKINGS,
        MislabelConfig,
        curve_points,
        model_mislabel_experiment,
        suspicious_training_images,
        write_suspicious_csv,
    )

    config = MislabelConfig(
        flip_fraction=args.flip_fraction,
        seed=args.seed,
        checkpoints=parse_fractions(args.checkpoints, "--checkpoints", upper_inclusive=True),
        rankings=parse_choices(args.rankings, "--rankings", RANKINGS),
        estimate=args.estimate,
    )
    if not 0 < args.curve_step <= 0.5:
        raise InfluenceExplorerError(f"--curve-step must be in (0, 0.5]; got {args.curve_step}.")
    if args.suspicious < 0:
        raise InfluenceExplorerError(f"--suspicious must be >= 0; got {args.suspicious}.")
    if args.csv is not None and not args.csv.parent.is_dir():
        raise InfluenceExplorerError(f"--csv: the directory {args.csv.parent} does not exist.")
    start = time.perf_counter()
    explainer = build_explainer(args)
    bars = StageBars(enabled=not args.quiet)
    grid = np.round(np.arange(0, 1 + 1e-9, args.curve_step), 10)
    keys = model_keys(args.model, tuple(explainer.models))
    models = {}
    for key in keys:
        result = model_mislabel_experiment(
            explainer.models[key],
            explainer.dataset,
            config,
            progress=lambda stage, done, total, key=key: bars(f"{key}: {stage}", done, total),
        )
        entry: dict[str, Any] = {
            "label": explainer.models[key].label,
            "clean_test_accuracy": result.clean_accuracy,
            "noisy_test_accuracy": result.noisy_accuracy,
            "n_flipped": len(result.flipped),
            "seconds": result.seconds,
            "rankings": {
                name: {
                    "found": {f"{c:g}": v for c, v in r.found_at_checkpoints.items()},
                    "test_accuracy_after_fixing": {
                        f"{c:g}": v for c, v in r.fixed_accuracy.items()
                    },
                    "curve": {"checked": grid, "found": curve_points(r, grid)},
                }
                for name, r in result.results.items()
            },
        }
        if args.suspicious:
            entry["suspicious"] = suspicious_training_images(
                explainer.models[key], explainer.dataset, k=args.suspicious, estimate=args.estimate
            )
        if args.csv is not None:
            path = args.csv if len(keys) == 1 else _per_model_path(args.csv, key)
            write_suspicious_csv(
                suspicious_training_images(
                    explainer.models[key], explainer.dataset, k=None, estimate=args.estimate
                ),
                path,
            )
            entry["csv"] = path
        models[key] = entry
    payload = {
        "dataset": explainer.dataset.name,
        "classes": list(explainer.class_names),
        "n_train": explainer.n_train,
        "flip_fraction": config.flip_fraction,
        "seed": config.seed,
        "estimate": config.estimate,
        "estimate_label": ESTIMATE_DESCRIPTIONS[config.estimate],
        "checkpoints": list(config.checkpoints),
        "seconds": time.perf_counter() - start,
        "models": models,
    }
    emit(payload, args, _report)
    return 0


def _per_model_path(path: Path, key: str) -> Path:
    return path.with_name(f"{path.stem}-{key}{path.suffix}")


def _report(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['dataset']}: "
        f"{payload['flip_fraction']:.0%} of {payload['n_train']} training labels flipped "
        f"(seed {payload['seed']}); self-influence: {payload['estimate_label']}",
        "",
    ]
    checkpoints = [f"{c:g}" for c in payload["checkpoints"]]
    for model in payload["models"].values():
        lines.append(
            f"{model['label']}: test accuracy {model['clean_test_accuracy']:.3f} clean, "
            f"{model['noisy_test_accuracy']:.3f} with {model['n_flipped']} flipped labels"
        )
        header = "".join(f"{float(c):>9.0%}" for c in checkpoints)
        lines.append(f"  {'fraction of flips found after checking':<40}{header}")
        for name, ranking in model["rankings"].items():
            values = "".join(f"{ranking['found'][c]:>9.2f}" for c in checkpoints)
            lines.append(f"    {RANKING_LABELS[name]:<38}{values}")
        lines.append(f"  {'test accuracy after fixing them':<40}{header}")
        for name, ranking in model["rankings"].items():
            values = "".join(
                f"{ranking['test_accuracy_after_fixing'][c]:>9.3f}" for c in checkpoints
            )
            lines.append(f"    {RANKING_LABELS[name]:<38}{values}")
        if model.get("suspicious"):
            lines.append("  most suspicious images of the actual training set:")
            lines.append(
                f"    {'rank':>4} {'train#':>6} {'self-infl.':>10} {'loss':>7}  given -> predicted  id"
            )
            for row in model["suspicious"]:
                lines.append(
                    f"    {row.rank:>4} {row.train_index:>6} {row.self_influence:>10.2e} "
                    f"{row.training_loss:>7.3f}  {row.given_label_name} -> "
                    f"{row.predicted_label_name}  {row.id}"
                )
        if model.get("csv") is not None:
            lines.append(f"  suspicious list written to {model['csv']}")
        lines.append("")
    lines.append(f"Took {payload['seconds']:.1f} s.")
    return "\n".join(lines)
