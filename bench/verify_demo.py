"""Leave-one-out accuracy of both estimates on the bundled demo, over random test images.

Usage: ``python -m bench.verify_demo [--tests 10] [--k 50] [--classes T-shirt/top,Shirt]``

Builds the default explainer (both models on the demo pair), retrains without each of the top k
training images (by |corrected score|) of each of N random test images (true labels), and reports
the distribution of Pearson, Spearman and slope for the Newton-corrected and first-order estimates.
Same numbers as ``influence verify --test-indices ... --k 50 --json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import markdown_table, write_results
from core.commands.common import StageBars, parse_classes
from core.data import load_demo
from core.explainer import Explainer, ExplainerConfig
from core.labels import ESTIMATE_DESCRIPTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--classes", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    explainer = Explainer(load_demo(), ExplainerConfig(classes=parse_classes(args.classes)))
    explainer.prepare(StageBars(True))
    prepared = time.perf_counter() - start
    indices = np.sort(
        np.random.default_rng(args.seed).choice(explainer.n_test, args.tests, replace=False)
    )
    start = time.perf_counter()
    results = explainer.verify_many(indices, k=args.k, progress=StageBars(True))
    seconds = time.perf_counter() - start

    summary_rows, detail_rows = [], []
    for key, verifications in results.items():
        label = explainer.models[key].label
        for estimate in ("corrected", "first_order"):
            stats = {
                s: np.array([getattr(v.agreement[estimate], s) for v in verifications])
                for s in ("pearson", "spearman", "slope")
            }
            summary_rows.append(
                [
                    label,
                    ESTIMATE_DESCRIPTIONS[estimate],
                    *(
                        f"{np.median(stats[s]):.3f} [{stats[s].min():.3f}, {stats[s].max():.3f}]"
                        for s in ("pearson", "spearman", "slope")
                    ),
                    f"{np.mean((stats['spearman'] >= 0.99) & (np.abs(stats['slope'] - 1) <= 0.1)):.0%}",
                ]
            )
        for index, v in zip(indices, verifications, strict=True):
            c, f = v.agreement["corrected"], v.agreement["first_order"]
            detail_rows.append(
                [
                    label,
                    int(index),
                    explainer.class_names[int(explainer.test_labels[index])],
                    f"{c.pearson:.3f} / {c.spearman:.3f} / {c.slope:.3f}",
                    f"{f.pearson:.3f} / {f.spearman:.3f} / {f.slope:.3f}",
                ]
            )
    summaries = explainer.summaries()
    accuracy = ", ".join(
        f"{s.label}: test accuracy {s.test_accuracy:.3f}" for s in summaries.values()
    )
    body = (
        f"{explainer.dataset.name}; {accuracy}. {args.tests} random test images (seed {args.seed}): "
        f"{', '.join(map(str, indices))}; top {args.k} training images by |corrected score| "
        f"retrained for each (true labels). Preparing took {prepared:.0f} s, retraining "
        f"{seconds:.0f} s.\n\n"
        "Median [min, max] over the test images:\n\n"
        + markdown_table(
            [
                "model",
                "estimate",
                "Pearson",
                "Spearman",
                "slope",
                "Spearman ≥ 0.99 and slope 0.9–1.1",
            ],
            summary_rows,
        )
        + "\n\nPer test image (Pearson / Spearman / slope):\n\n"
        + markdown_table(
            ["model", "test image", "true label", "corrected", "first order"], detail_rows
        )
    )
    print(write_results("verify_demo", "Leave-one-out check on the demo", body))


if __name__ == "__main__":
    main()
