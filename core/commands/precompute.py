"""``influence precompute``: prepare features and every model, and report their accuracy."""

from __future__ import annotations

import argparse
from typing import Any

from core.commands.common import (
    add_common_options,
    build_explainer,
    emit,
    network_report,
    to_jsonable,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "precompute",
        help="compute and cache features, fit every model, print their accuracy",
        description="Compute (or read from the cache) the backbone features of the chosen "
        "classes, fit the RBF SVM on pixels and the logistic regression on backbone features, "
        "and report every model's accuracy. Later commands and the dashboard start from the cache.",
    )
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    explainer = build_explainer(args)
    payload = {
        "dataset": explainer.dataset.name,
        "classes": list(explainer.class_names),
        "n_train": explainer.n_train,
        "n_test": explainer.n_test,
        "seconds": explainer.seconds,
        "models": {
            key: {
                **to_jsonable(summary),
                # With the rule in words; mean and standard error per λ for a plot.
                "lambda_curve": None
                if summary.lambda_curve is None
                else summary.lambda_curve.as_dict(),
            }
            for key, summary in explainer.summaries().items()
        },
        # Why the scores may be inaccurate (e.g. LiSSA too short); also printed on stderr.
        "warnings": list(explainer.warnings),
        # The user's network (--network): what it is, its preprocessing, and how its refitted
        # last layer agrees with its own head; None without one.
        "network": network_report(explainer),
    }
    emit(payload, args, _report)
    return 0


def _report(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['dataset']}: {payload['n_train']} training and {payload['n_test']} test images "
        f"(prepared in {payload['seconds']:.1f} s)",
        "",
    ]
    for summary in payload["models"].values():
        hyper = ", ".join(f"{k}={v:g}" for k, v in summary["hyperparameters"].items())
        lines.append(f"{summary['label']}")
        lines.append(f"  features:        {summary['features']}")
        lines.append(
            f"  accuracy:        test {summary['test_accuracy']:.3f}, "
            f"train {summary['train_accuracy']:.3f}"
        )
        lines.append(f"  hyperparameters: {hyper}")
        curve = summary["lambda_curve"]
        if curve is not None:
            lines.append(f"  λ chosen by:     {curve['rule']}")
            name = "log-loss" if curve["criterion"] == "log_loss" else "accuracy"
            lines.append(f"    {'λ':>8}  {name + ' ± s.e.':>20}  {'accuracy':>8}")
            for g, m, e, a in zip(
                curve["grid"], curve["mean"], curve["stderr"], curve["accuracy"], strict=True
            ):
                mark = "  <- chosen" if g == curve["chosen"] else ""
                lines.append(f"    {g:>8g}  {m:>11.4f} ± {e:<6.4f}  {a:>8.3f}{mark}")
        lines.append(
            f"  fit:             {summary['iterations']} Newton steps, gradient norm "
            f"{summary['gradient_norm']:.1e}, {summary['fit_seconds']:.2f} s"
        )
        network = payload["network"]
        if network is not None and network["label"] == summary["label"]:
            refit = network["refitted_head"]
            lines.append(
                f"  your network:    {network['architecture']}, {network['file']} (sha256 "
                f"{network['sha256'][:12]}), {network['n_classes']} classes, final layer "
                f"{network['head']}"
            )
            lines.append(f"  preprocessing:   {network['preprocessing']['description']}")
            lines.append(
                f"  vs your head:    the refit agrees with it on "
                f"{refit['agreement_with_your_head']:.1%} of {refit['n_test']} test images (its "
                f"accuracy {refit['your_head_test_accuracy']:.3f}); parameters moved by "
                f"{refit['relative_parameter_change']:.1%}"
            )
        lines.append("")
    if payload["network"] is not None:
        lines.append(payload["network"]["what_is_explained"])
    return "\n".join(lines)
