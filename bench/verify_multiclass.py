"""Influence against leave-one-out retraining with every class of the bundled demo.

Usage: ``python -m bench.verify_multiclass [--cache-dir DIR] [--k 30] [--classes all]``

Prepares ``Explainer(demo, ExplainerConfig(classes=...))`` with the defaults and picks 10 test
images that sample the hard cases, for each model in turn: its most confident correct
prediction, its correct prediction nearest the decision boundary (lowest top probability), its
most confident mistake, then random images (seeded) until there are 10. It then runs
exactly what ``python -m core verify --classes all --test-indices I1,...,I10 --k 30 --json`` runs
(:meth:`core.explainer.Explainer.verify_many`: for each test image and model, retrain without each
of the top k training images by |score|, to ‖∇R‖ <= 1e-11, true labels) and reports Spearman,
Pearson and the slope of actual against predicted, per image and as the distribution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.common import RESULTS_DIR, markdown_table, write_results


def hard_cases(explainer, count: int = 10, seed: int = 0) -> dict[int, str]:
    """Test indices -> why each was picked (see the module docstring)."""
    chosen: dict[int, str] = {}
    labels = explainer.test_labels
    for key in explainer.models:
        proba = explainer.test_probabilities(key)
        predicted, top = proba.argmax(1), proba.max(1)
        right = np.flatnonzero(predicted == labels)
        wrong = np.flatnonzero(predicted != labels)
        for rows, order, why in (
            (right, -top[right], "confident"),
            (right, top[right], "near the boundary"),
            (wrong, -top[wrong], "misclassified, confident"),
        ):
            added = 0
            for i in rows[np.argsort(order, kind="stable")]:
                if len(chosen) >= count:
                    break
                if int(i) not in chosen:
                    chosen[int(i)] = f"{key}: {why} (p = {top[i]:.3f})"
                    added += 1
                if added == 1:
                    break
    rng = np.random.default_rng(seed)
    for i in rng.permutation(len(labels)):
        if len(chosen) >= count:
            break
        chosen.setdefault(int(i), "random")
    return chosen


def main() -> None:
    from core.data import open_dataset
    from core.explainer import Explainer, ExplainerConfig
    from core.store import ArtifactStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--classes", default="all")
    args = parser.parse_args()
    classes = "all" if args.classes == "all" else tuple(int(c) for c in args.classes.split(","))
    demo = open_dataset("demo")
    explainer = Explainer(
        demo, ExplainerConfig(classes=classes), store=ArtifactStore(args.cache_dir)
    ).prepare()
    picked = hard_cases(explainer)
    indices = list(picked)
    results = explainer.verify_many(indices, k=args.k)
    rows, per_model = [], {}
    default = "corrected"
    for key, fitted in explainer.models.items():
        proba = explainer.test_probabilities(key)
        for i, verification in zip(indices, results[key], strict=True):
            a = verification.agreement[default]
            first = verification.agreement["first_order"]
            per_model.setdefault(key, []).append(a)
            rows.append(
                [
                    fitted.label,
                    i,
                    picked[i],
                    explainer.class_names[int(explainer.test_labels[i])],
                    explainer.class_names[int(proba[i].argmax())],
                    f"{a.spearman:.4f}",
                    f"{a.pearson:.4f}",
                    f"{a.slope:.3f}",
                    f"{first.spearman:.4f} / {first.slope:.3f}",
                    "" if verification.converged else "NOT CONVERGED",
                ]
            )
    summary = []
    for key, agreements in per_model.items():
        spearman = np.array([a.spearman for a in agreements])
        slope = np.array([a.slope for a in agreements])
        pearson = np.array([a.pearson for a in agreements])
        ok = int(np.sum((spearman >= 0.99) & (slope >= 0.9) & (slope <= 1.1)))
        summary.append(
            [
                explainer.models[key].label,
                f"{np.median(spearman):.4f} [{spearman.min():.4f}, {spearman.max():.4f}]",
                f"{np.median(pearson):.4f} [{pearson.min():.4f}, {pearson.max():.4f}]",
                f"{np.median(slope):.3f} [{slope.min():.3f}, {slope.max():.3f}]",
                f"{ok} / {len(agreements)}",
            ]
        )
    accuracy = {k: s.test_accuracy for k, s in explainer.summaries().items()}
    command = (
        f"python -m core verify --classes {args.classes} --test-indices "
        f"{','.join(map(str, indices))} --k {args.k} --json"
    )
    body = "\n".join(
        [
            f"{explainer.dataset.name}: n = {explainer.n_train}, {len(explainer.class_names)} "
            f"classes, explainer defaults; test accuracy "
            + ", ".join(f"{explainer.models[k].label} {v:.3f}" for k, v in accuracy.items())
            + ".",
            "",
            f"Same computation as `{command}`. Default estimate (Newton-corrected); the "
            "criterion is Spearman >= 0.99 and slope within 0.9-1.1.",
            "",
            "### Distribution over the 10 test images: median [min, max]",
            "",
            markdown_table(
                ["model", "Spearman", "Pearson", "slope", "meet the criterion"], summary
            ),
            "",
            "### Per test image",
            "",
            markdown_table(
                [
                    "model",
                    "test index",
                    "picked as",
                    "true",
                    "predicted",
                    "Spearman",
                    "Pearson",
                    "slope",
                    "first order: Spearman / slope",
                    "",
                ],
                rows,
            ),
        ]
    )
    payload = {
        "command": command,
        "indices": picked,
        "results": {
            key: [
                {e: a.as_dict() for e, a in v.agreement.items()} | {"converged": v.converged}
                for v in results[key]
            ]
            for key in results
        },
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "verify_multiclass.json").write_text(json.dumps(payload, indent=1))
    path = write_results("verify_multiclass", "Leave-one-out check, every demo class", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
