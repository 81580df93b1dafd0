"""How the RBF SVM's γ and smooth-hinge temperature trade accuracy against influence accuracy.

Usage: ``python -m bench.svm_settings [--classes T-shirt/top,Shirt] [--tests 6] [--k 50]``

For each (γ, t) on the bundled demo's pair: test accuracy, then leave-one-out retraining of the top
k points (by |corrected score|) for a few random test images, reporting the Newton-corrected and the
first-order estimates' Pearson, Spearman and slope (median and worst over the test images). This is
the measurement behind KernelSVM's default temperature.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import markdown_table, write_results
from core.data import load_demo
from core.features import PixelFeaturizer
from core.influence import InfluenceEngine
from core.models import KernelSVM
from core.validation import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="T-shirt/top,Shirt")
    parser.add_argument("--tests", type=int, default=6)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--gammas", default="paper,1e-3,3e-3,1e-2")
    parser.add_argument("--temperatures", default="0.1,0.01,0.001")
    args = parser.parse_args()

    data = load_demo().select_classes(args.classes.split(","))
    pixels = PixelFeaturizer()
    X, y = pixels.transform(data.train_images), data.train_labels
    X_test, y_test = pixels.transform(data.test_images), data.test_labels
    tests = np.random.default_rng(0).choice(len(y_test), args.tests, replace=False)
    rows = []
    for gamma_text in args.gammas.split(","):
        gamma = None if gamma_text == "paper" else float(gamma_text)
        for t in (float(v) for v in args.temperatures.split(",")):
            start = time.perf_counter()
            model = KernelSVM(gamma=gamma, temperature=t).fit(X, y)
            fit_seconds = time.perf_counter() - start
            results = verify(InfluenceEngine(model), X_test[tests], y_test[tests], k=args.k)
            cells = []
            for estimate in ("corrected", "first_order"):
                for stat in ("pearson", "spearman", "slope"):
                    values = np.array([getattr(r.agreement[estimate], stat) for r in results])
                    worst = (
                        values[np.nanargmax(np.abs(values - 1))]
                        if stat == "slope"
                        else np.nanmin(values)
                    )
                    cells.append(f"{np.nanmedian(values):.3g} ({worst:.3g})")
            rows.append(
                [
                    f"{model.gamma_:.2g}" + (" (paper)" if gamma is None else ""),
                    t,
                    f"{model.accuracy(X_test, y_test):.3f}",
                    f"{model.accuracy(X, y):.3f}",
                    f"{fit_seconds:.1f}",
                    *cells,
                    f"{results[0].seconds:.0f}",
                ]
            )
            print(rows[-1], flush=True)
    headers = [
        "γ",
        "t",
        "test acc",
        "train acc",
        "fit s",
        "corrected Pearson",
        "corrected Spearman",
        "corrected slope",
        "first-order Pearson",
        "first-order Spearman",
        "first-order slope",
        "LOO s",
    ]
    body = (
        f"{data.name}, n = {len(y)}, {args.tests} random test images (seed 0), top {args.k} by "
        "|corrected score| retrained each. Cells: median (worst) over the test images; worst "
        "slope is the one farthest from 1.\n\n" + markdown_table(headers, rows)
    )
    print(write_results("svm_settings", "RBF SVM: γ and temperature", body))


if __name__ == "__main__":
    main()
