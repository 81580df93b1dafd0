"""Newton-CG forcing terms side by side: the fits of λ's hold-out selection and the final fit.

Usage: ``python -m bench.newton_forcing [--n 25000] [--lambdas 0.1,0.01,0.001,0.0001]
[--rules sqrt,adaptive] [--name newton_forcing]``

On n seeded rows of the full Fashion-MNIST (the Debian package ``dataset-fashion-mnist``) with
the stand-in features of ``bench.full_fashion_mnist`` (a fixed random ReLU projection, 1280-d,
ten classes, p = 12,800), it runs what the explainer runs at that size: the fold fits along the
λ grid from the largest down (tolerance 1e-8, warm starts, one shared sampled-curvature
preconditioner) on four fifths of the rows, then the final fit on all of them at the smallest λ
from the fold's θ. Once with each forcing rule: "sqrt", min(0.1, √‖∇R‖) at every step (the
rule before), and "adaptive", :func:`core.models._newton_forcing`. Prints, per fit, the
Newton steps, conjugate-gradient iterations and seconds, and the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bench.common import write_results
from bench.full_fashion_mnist import register_stand_in
from core import features as feature_registry
from core import models
from core.data import open_dataset
from core.models import LogisticRegression, SampledCurvature
from core.selection import FOLD_TOL


def sqrt_rule(gradient_norm: float, previous: object, tol: float) -> float:
    return min(0.1, gradient_norm**0.5)


def run_path(X: torch.Tensor, y: np.ndarray, lambdas: list[float], seed: int) -> list[dict]:
    n = len(y)
    held = np.random.default_rng(seed).permutation(n)[: n // 5]
    keep = np.setdiff1d(np.arange(n), held)
    rows = []
    theta, curvature = None, SampledCurvature(seed=seed)
    for l2 in lambdas:
        start = time.perf_counter()
        model = LogisticRegression(l2=l2, tol=FOLD_TOL).fit(
            X[keep], y[keep], theta0=theta, curvature=curvature
        )
        theta = model.theta_
        rows.append(_row(f"fold λ={l2:g}, n={len(keep)}", model, start))
    start = time.perf_counter()
    final = LogisticRegression(l2=lambdas[-1]).fit(X, y, theta0=theta)
    rows.append(_row(f"final λ={lambdas[-1]:g}, n={n}", final, start))
    return rows


def _row(name: str, model: LogisticRegression, start: float) -> dict:
    info = model.fit_info_
    return {
        "fit": name,
        "newton": info.iterations,
        "cg": info.cg_iterations,
        "seconds": time.perf_counter() - start,
        "gradient": info.gradient_norm,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25_000)
    parser.add_argument("--lambdas", default="0.1,0.01,0.001,0.0001")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rules", default="sqrt,adaptive", help="which of sqrt, adaptive to run, in order"
    )
    parser.add_argument("--name", default="newton_forcing", help="results file name")
    args = parser.parse_args()
    rules = {"sqrt": sqrt_rule, "adaptive": models._newton_forcing}
    chosen = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not chosen or any(r not in rules for r in chosen):
        parser.error(f"--rules: choose from {', '.join(rules)}; got {args.rules!r}")
    lambdas = [float(v) for v in args.lambdas.split(",")]
    dataset = open_dataset("fashion-mnist")
    featurizer = feature_registry._REGISTRY[register_stand_in()]()
    rows = np.random.default_rng(args.seed).permutation(len(dataset.train_labels))[: args.n]
    X = featurizer.torch_forward(torch.as_tensor(dataset.train_images[rows])).double()
    y = dataset.train_labels[rows]
    adaptive = models._newton_forcing
    lines = [
        f"n = {args.n}, {torch.get_num_threads()} threads, λ path {lambdas}",
        "",
        "| rule | fit | Newton steps | CG iterations | seconds | final ‖∇R‖ | load |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for name in chosen:
        rule = rules[name]
        models._newton_forcing = rule
        try:
            results = run_path(X, y, lambdas, args.seed)
        finally:
            models._newton_forcing = adaptive
        rows = [
            f"| {name} | {r['fit']} | {r['newton']} | {r['cg']} | {r['seconds']:.1f} | "
            f"{r['gradient']:.1e} | {r['load']:.1f} |"
            for r in results
        ]
        total = sum(r["seconds"] for r in results)
        rows.append(
            f"| {name} | total | {sum(r['newton'] for r in results)} | "
            f"{sum(r['cg'] for r in results)} | {total:.1f} | | |"
        )
        print("\n".join(rows))
        lines += rows
    write_results(
        args.name, "Newton-CG forcing terms side by side", "\n".join(lines), "newton_forcing"
    )


if __name__ == "__main__":
    main()
