"""``influence attack``: perturb a test image's most helpful training images and retrain."""

from __future__ import annotations

import argparse
import time
from typing import Any

from core.commands.common import StageBars, add_common_options, build_explainer, emit
from core.commands.lists import add_model_choice, check_test_index, model_keys, parse_indices
from core.errors import InfluenceExplorerError


def register(subparsers: Any) -> None:
    from core.attack import AttackConfig

    parser = subparsers.add_parser(
        "attack",
        help="training-set attack: perturb helpful training images within a budget, retrain",
        description="For each test image, perturb its most helpful training images within an "
        "L-infinity budget in pixel units (valid uint8 images), following the gradient of the "
        "retrained model's loss of the predicted label, retrain after each step (logistic "
        "regression: recomputed backbone features; SVM: a new kernel from the perturbed "
        "pixels), and report whether the prediction flipped (Koh & Liang 2017, section 5.2).",
    )
    add_model_choice(parser)
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument(
        "--test-indices", default=None, help="test images to attack, comma-separated"
    )
    targets.add_argument(
        "--n-test",
        type=int,
        default=10,
        help="attack this many test images that every model classifies correctly, chosen with "
        "--seed (default 10)",
    )
    defaults = AttackConfig()
    parser.add_argument(
        "--budget",
        type=int,
        default=defaults.budget,
        help=f"L-infinity budget in pixel units, 0-255 scale (default {defaults.budget})",
    )
    parser.add_argument(
        "--step-size",
        type=int,
        default=defaults.step_size,
        help=f"pixel units per step (default {defaults.step_size})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help=f"steps at most; stops when the prediction flips (default {defaults.steps})",
    )
    parser.add_argument(
        "--n-perturb",
        type=int,
        default=defaults.n_perturb,
        help=f"most helpful training images to perturb (default {defaults.n_perturb})",
    )
    parser.add_argument(
        "--no-retrain-every-step",
        action="store_true",
        help="follow the original model's gradient and retrain once at the end (faster, weaker)",
    )
    parser.add_argument("--seed", type=int, default=0, help="which test images --n-test picks")
    parser.add_argument(
        "--pick",
        choices=("random", "lowest-margin"),
        default="random",
        help="how --n-test picks test images: 'random' (seeded) among those every model gets "
        "right, or 'lowest-margin': for each model, the ones it gets right with the smallest "
        "margin (where the dashboard's Attack page starts)",
    )
    parser.add_argument(
        "--include-images",
        action="store_true",
        help="include original and perturbed images (uint8 arrays) in --json",
    )
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.attack import (
        AttackConfig,
        attack_many,
        correctly_classified,
        lowest_margin_correct,
    )

    config = AttackConfig(
        budget=args.budget,
        step_size=args.step_size,
        steps=args.steps,
        n_perturb=args.n_perturb,
        retrain_every_step=not args.no_retrain_every_step,
    )
    requested = (
        None if args.test_indices is None else parse_indices(args.test_indices, "--test-indices")
    )
    if requested is None and args.n_test < 1:
        raise InfluenceExplorerError(f"--n-test must be >= 1; got {args.n_test}.")
    start = time.perf_counter()
    explainer = build_explainer(args)
    keys = model_keys(args.model, tuple(explainer.models))
    if requested is not None:
        indices = [check_test_index(explainer, i) for i in requested]
        per_model = {key: indices for key in keys}
    elif args.pick == "lowest-margin":
        per_model = {
            key: lowest_margin_correct(
                explainer.models[key], explainer.test_labels, count=args.n_test
            )
            for key in keys
        }
        indices = sorted({i for chosen in per_model.values() for i in chosen})
    else:
        indices = correctly_classified(
            explainer.models.values(), explainer.test_labels, count=args.n_test, seed=args.seed
        )
        per_model = {key: indices for key in keys}
    if not all(per_model.values()):
        raise InfluenceExplorerError(
            "No test image is classified correctly by every model; give --test-indices."
        )
    bars = StageBars(enabled=not args.quiet)
    names = explainer.class_names
    models = {}
    for key in keys:
        summary = attack_many(
            explainer.models[key], explainer.dataset, per_model[key], config, progress=bars
        )
        attacks = []
        for result in summary.results:
            entry = {
                "test_index": result.test_index,
                "true_label": names[int(explainer.test_labels[result.test_index])],
                "flipped": result.flipped,
                "predicted_before": names[result.predicted_before],
                "predicted_after": names[result.predicted_after],
                "probabilities_before": result.probabilities_before,
                "probabilities_after": result.probabilities_after,
                "train_indices": result.train_indices,
                "train_ids": [str(explainer.dataset.train_ids[j]) for j in result.train_indices],
                "steps_taken": result.steps_taken,
                "max_change": result.max_change,
                "loss_history": result.loss_history,
                "seconds": result.seconds,
            }
            if args.include_images:
                entry["original_images"] = result.original_images
                entry["perturbed_images"] = result.perturbed_images
            attacks.append(entry)
        models[key] = {
            "label": explainer.models[key].label,
            "retraining": summary.results[0].retraining,
            "success_rate": summary.success_rate,
            "n_attacked": len(summary.results),
            "test_indices": per_model[key],
            "seconds": summary.seconds,
            "attacks": attacks,
        }
    payload = {
        "dataset": explainer.dataset.name,
        "classes": list(names),
        "test_indices": indices,
        "pick": "given" if requested is not None else args.pick,
        "budget": config.budget,
        "step_size": config.step_size,
        "steps": config.steps,
        "n_perturb": config.n_perturb,
        "retrain_every_step": config.retrain_every_step,
        "seconds": time.perf_counter() - start,
        "models": models,
    }
    emit(payload, args, _report)
    return 0


def _report(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['dataset']}: perturbing the "
        f"{payload['n_perturb']} most helpful training image(s) of each test image, L-infinity "
        f"budget {payload['budget']} pixel units, steps of {payload['step_size']}, at most "
        f"{payload['steps']} steps",
        "",
    ]
    for model in payload["models"].values():
        flipped = sum(a["flipped"] for a in model["attacks"])
        lines.append(
            f"{model['label']}: {flipped} of {model['n_attacked']} predictions flipped "
            f"({model['success_rate']:.0%}) in {model['seconds']:.1f} s"
        )
        lines.append(f"  retraining: {model['retraining']}")
        lines.append(
            f"    {'test#':>5}  {'before':>22}  {'after':>22}  {'steps':>5}  {'max|δ|':>6}  train#"
        )
        for a in model["attacks"]:
            classes = list(payload["classes"])
            before_p = a["probabilities_before"][classes.index(a["predicted_before"])]
            after_p = a["probabilities_after"][classes.index(a["predicted_after"])]
            before = f"{a['predicted_before']} ({before_p:.2f})"
            after = f"{a['predicted_after']} ({after_p:.2f})"
            mark = "flipped" if a["flipped"] else ""
            lines.append(
                f"    {a['test_index']:>5}  {before:>22}  {after:>22}  {a['steps_taken']:>5}  "
                f"{a['max_change']:>6}  {','.join(str(j) for j in a['train_indices'])}  {mark}"
            )
        lines.append("")
    lines.append(f"Took {payload['seconds']:.1f} s.")
    return "\n".join(lines)
