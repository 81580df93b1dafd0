"""``influence groups``: predicted against actual effects of removing groups of training images."""

from __future__ import annotations

import argparse
import time
from typing import Any

from core.commands.common import StageBars, add_common_options, build_explainer, emit
from core.commands.lists import (
    add_model_choice,
    check_test_index,
    model_keys,
    parse_choices,
    parse_fractions,
    parse_indices,
)
from core.errors import InfluenceExplorerError
from core.labels import GROUP_ESTIMATE_DESCRIPTIONS

KINDS = ("random", "class", "cluster", "helpful", "harmful")


def register(subparsers: Any) -> None:
    from core.groups import DEFAULT_SIZES

    parser = subparsers.add_parser(
        "groups",
        help="remove groups of training images: predicted (1st/2nd order, Newton) vs retraining",
        description="Form groups of training images (random, random within a class, k-means "
        "clusters, the test image's most helpful or harmful tails, or your own selection), "
        "predict the effect of removing each on a test image's loss and on the test set with the "
        "first-order (sum of scores), second-order (Basu et al.) and Newton-corrected estimates, "
        "retrain without each group, and compare. Changes are after minus before, in units of "
        "test loss: positive = the group helped.",
    )
    add_model_choice(parser)
    parser.add_argument(
        "--test-index",
        type=int,
        default=None,
        help="the test image whose loss is explained (default: the first one every model gets "
        "wrong)",
    )
    parser.add_argument(
        "--target",
        choices=("true", "predicted"),
        default="true",
        help="explain the loss of the true label (default) or of each model's prediction",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated group kinds among {', '.join(KINDS)} (default: all)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(f"{s:g}" for s in DEFAULT_SIZES),
        help="group sizes as fractions of the training set (default: 0.25%% to 25%%)",
    )
    parser.add_argument(
        "--groups-per-size",
        type=int,
        default=3,
        help="random, class and cluster groups per size (default 3)",
    )
    parser.add_argument(
        "--indices", default=None, help="also remove your own group: training indices, e.g. 3,17,40"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the groups and k-means")
    parser.add_argument(
        "--no-groups", action="store_true", help="leave the per-group rows out of --json"
    )
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.groups import GroupConfig, first_misclassified, model_group_experiment

    config = GroupConfig(
        kinds=parse_choices(args.kinds, "--kinds", KINDS),
        sizes=parse_fractions(args.sizes, "--sizes"),
        groups_per_size=args.groups_per_size,
        custom=None if args.indices is None else parse_indices(args.indices, "--indices"),
        seed=args.seed,
    )
    if args.test_index is not None and args.test_index < 0:
        raise InfluenceExplorerError(f"--test-index must be >= 0; got {args.test_index}.")
    start = time.perf_counter()
    explainer = build_explainer(args)
    if config.custom is not None and max(config.custom) >= explainer.n_train:
        raise InfluenceExplorerError(
            f"--indices must be training rows in [0, {explainer.n_train}); got {max(config.custom)}."
        )
    test_index = (
        first_misclassified(explainer.models.values(), explainer.test_labels)
        if args.test_index is None
        else check_test_index(explainer, args.test_index)
    )
    bars = StageBars(enabled=not args.quiet)
    models = {}
    for key in model_keys(args.model, tuple(explainer.models)):
        result = model_group_experiment(
            explainer.models[key],
            explainer.dataset,
            config,
            test_index=test_index,
            target=args.target,
            progress=lambda stage, done, total, key=key: bars(f"{key}: {stage}", done, total),
        )
        models[key] = _model_payload(explainer, key, result, include_groups=not args.no_groups)
    payload = {
        "dataset": explainer.dataset.name,
        "classes": list(explainer.class_names),
        "n_train": explainer.n_train,
        "test_index": test_index,
        "true_label": explainer.class_names[int(explainer.test_labels[test_index])],
        "target": args.target,
        "kinds": list(config.kinds),
        "sizes": list(config.sizes),
        "groups_per_size": config.groups_per_size,
        "seed": config.seed,
        "sign_convention": "change = after removing the group minus before, in units of test "
        "loss; positive = the group helped",
        "seconds": time.perf_counter() - start,
        "models": models,
    }
    emit(payload, args, _report)
    return 0


def _model_payload(explainer: Any, key: str, result: Any, *, include_groups: bool) -> dict:
    from core.groups import GROUP_ESTIMATES

    payload: dict[str, Any] = {
        "label": explainer.models[key].label,
        "explained_label": explainer.class_names[result.test_label],
        "base_loss": result.base_loss,
        "base_test_loss": result.base_test_loss,
        "base_test_accuracy": result.base_test_accuracy,
        "n_groups": len(result.groups),
        "agreement": {e: a.as_dict() for e, a in result.agreement.items()},
        "agreement_at_params": {e: a.as_dict() for e, a in result.agreement_at_params.items()},
        "agreement_test_loss": {e: a.as_dict() for e, a in result.agreement_test_loss.items()},
        "agreement_test_loss_at_params": {
            e: a.as_dict() for e, a in result.agreement_test_loss_at_params.items()
        },
        "agreement_by_kind": {
            kind: {e: a.as_dict() for e, a in by.items()}
            for kind, by in result.agreement_by_kind.items()
        },
        "mean_absolute_error": result.mean_absolute_error(),
        "mean_absolute_error_at_params": result.mean_absolute_error(at_params=True),
        "size_trend": result.size_trend,
        "converged": result.converged,
        "predict_seconds": result.predict_seconds,
        "retrain_seconds": result.retrain_seconds,
    }
    if include_groups:
        payload["groups"] = [
            {
                "kind": group.kind,
                "description": group.description,
                "size": group.size,
                "predicted": {e: result.predicted[e][i] for e in GROUP_ESTIMATES},
                "predicted_at_params": {
                    e: result.predicted_at_params[e][i] for e in GROUP_ESTIMATES
                },
                "actual": result.actual[i],
                "predicted_test_loss": {
                    e: result.predicted_test_loss[e][i] for e in GROUP_ESTIMATES
                },
                "actual_test_loss": result.actual_test_loss[i],
                "predicted_test_accuracy": {
                    e: result.predicted_test_accuracy[e][i] for e in GROUP_ESTIMATES
                },
                "actual_test_accuracy": result.actual_test_accuracy[i],
            }
            for i, group in enumerate(result.groups)
        ]
    return payload


def _report(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['dataset']}: removing groups of training "
        f"images ({', '.join(payload['kinds'])}; sizes {', '.join(f'{s:g}' for s in payload['sizes'])} "
        f"of {payload['n_train']})",
        f"Test image {payload['test_index']} (true label {payload['true_label']}, explaining the "
        f"{payload['target']} label). Sign: {payload['sign_convention']}.",
        "",
    ]
    for model in payload["models"].values():
        lines.append(
            f"{model['label']}: {model['n_groups']} groups, loss of '{model['explained_label']}' "
            f"{model['base_loss']:.4f}; retraining {model['retrain_seconds']:.1f} s"
        )
        lines.append(
            f"  {'estimate':<52} {'Pearson':>8} {'Spearman':>9} {'slope':>8}   test-set loss: "
            "Pearson Spearman"
        )
        for estimate, label in GROUP_ESTIMATE_DESCRIPTIONS.items():
            a, t = model["agreement"][estimate], model["agreement_test_loss"][estimate]
            lines.append(
                f"  {label:<52} {a['pearson']:>8.3f} {a['spearman']:>9.3f} {a['slope']:>8.3f}"
                f"   {t['pearson']:>20.3f} {t['spearman']:>8.3f}"
            )
        lines.append("  median actual/predicted by group size (>1 = the estimate under-estimates):")
        lines.append(
            "    " + f"{'size':>6}" + "".join(f"{e:>14}" for e in GROUP_ESTIMATE_DESCRIPTIONS)
        )
        for trend in model["size_trend"]:
            lines.append(
                "    "
                + f"{trend.target_size:>6}"
                + "".join(f"{trend.ratio[e]:>14.3f}" for e in GROUP_ESTIMATE_DESCRIPTIONS)
            )
        lines.append("")
    lines.append(f"Took {payload['seconds']:.1f} s.")
    return "\n".join(lines)
