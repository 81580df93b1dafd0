"""Does the cheaper cross-validation plan choose the same λ? The demo's ten classes under the full
plan (3 repeats x 5 folds, 60 fits) and the one the cost now gives them (1 repeat x 3 folds,
12 fits), with several seeds.

Usage: ``python -m bench.lambda_plan [--classes all] [--seeds 0,1]``

The backbone's features of the chosen classes of the bundled demo (from the artifact cache when
there), then for each seed and plan :func:`core.selection.held_out_values` and the rule of
:mod:`core.selection` exactly as the explainer applies them: the chosen λ, the best λ, the mean
held-out log-loss ± standard error per λ, the fits' wall time and the load average. The explainer
itself uses one seed (its ``seed``, 0 by default); the other seeds show how stable each plan's
choice is.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import markdown_table, write_results
from core.data import load_demo
from core.explainer import Explainer, ExplainerConfig
from core.selection import SelectionConfig, curve_from_values, held_out_values, selection_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="all", help="'all' or class indices, e.g. 0,2,6")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    dataset = load_demo()
    names = dataset.class_names
    chosen = (
        tuple(range(len(names)))
        if args.classes == "all"
        else tuple(sorted(int(c) for c in args.classes.split(",")))
    )
    explainer = Explainer(dataset, ExplainerConfig(classes=chosen, models=("logreg",)))
    features = explainer._backbone_features("train")
    labels = explainer.train_labels
    n, d = features.shape
    classes = len(chosen)
    parameters = d * (1 if classes == 2 else classes)
    plans = {
        "full (3 x 5 folds)": SelectionConfig(),
        "by cost (1 x 3 folds)": SelectionConfig(folds=3, repeats=1),
    }
    given = selection_plan(n, parameters=parameters)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, plan in plans.items():
            plan = SelectionConfig(folds=plan.folds, repeats=plan.repeats, seed=seed)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            values = held_out_values(features, labels, plan)
            seconds = time.perf_counter() - start
            curve = curve_from_values(values, plan)
            rows.append(
                [
                    str(seed),
                    name,
                    str(plan.fits),
                    f"{curve.chosen:g}",
                    f"{curve.best:g}",
                    ", ".join(
                        f"{m:.4f} ± {e:.4f}" for m, e in zip(curve.mean, curve.stderr, strict=True)
                    ),
                    f"{seconds:.1f}",
                    f"{load:.2f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    label = "all ten classes" if len(chosen) == len(names) else ", ".join(names[c] for c in chosen)
    body = (
        f"The bundled demo, {label}: n = {n:,} training images, {d}-d backbone features, "
        f"{parameters:,} parameters. `selection_plan` gives this model "
        f"{given.repeats} x {given.folds} folds ({given.fits} fits).\n\n"
        + markdown_table(
            [
                "seed",
                "plan",
                "fits",
                "chosen λ",
                "best λ",
                "held-out log-loss per λ " + str(plans["full (3 x 5 folds)"].grid),
                "seconds",
                "load",
            ],
            rows,
        )
    )
    write_results("lambda_plan", "Cheaper cross-validation for many classes: the same λ?", body)


if __name__ == "__main__":
    main()
