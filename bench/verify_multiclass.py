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


ESTIMATE_NAMES = {
    "margin": "exact in the margin",
    "corrected": "Newton-corrected",
    "first_order": "first order",
}


def payload_results(results: dict) -> dict[str, list[dict]]:
    """Model key -> per test image, each estimate's agreement as a dict, and ``converged``."""
    return {
        key: [
            {e: a.as_dict() for e, a in v.agreement.items()} | {"converged": v.converged}
            for v in verifications
        ]
        for key, verifications in results.items()
    }


def distribution(
    results: dict[str, list[dict]], labels: dict[str, str], defaults: dict[str, str]
) -> list[str]:
    """Markdown lines: per model and estimate (the default first), median [min, max] of Spearman,
    Pearson and slope over the test images, and how many meet the criterion."""
    summary = []
    for key, per_image in results.items():
        estimates = [defaults[key]] + [e for e in ESTIMATE_NAMES if e != defaults[key]]
        for estimate in estimates:
            if estimate not in per_image[0]:
                continue
            values = {
                m: np.array([r[estimate][m] for r in per_image])
                for m in ("spearman", "pearson", "slope")
            }
            spearman, slope = values["spearman"], values["slope"]
            ok = int(np.sum((spearman >= 0.99) & (slope >= 0.9) & (slope <= 1.1)))
            summary.append(
                [
                    labels[key],
                    ESTIMATE_NAMES[estimate] + (" (default)" if estimate == defaults[key] else ""),
                    *(
                        f"{np.median(v):.{3 if m == 'slope' else 4}f} "
                        f"[{v.min():.{3 if m == 'slope' else 4}f}, "
                        f"{v.max():.{3 if m == 'slope' else 4}f}]"
                        for m, v in values.items()
                    ),
                    f"{ok} / {len(per_image)}",
                    "yes" if all(r["converged"] for r in per_image) else "NO",
                ]
            )
    return [
        f"### Distribution over the {len(next(iter(results.values())))} test images: "
        "median [min, max]",
        "",
        markdown_table(
            [
                "model",
                "estimate",
                "Spearman",
                "Pearson",
                "slope",
                "meet the criterion",
                "every retrain converged",
            ],
            summary,
        ),
    ]


def main() -> None:
    from core.data import open_dataset
    from core.explainer import Explainer, ExplainerConfig
    from core.store import ArtifactStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--classes", default="all")
    parser.add_argument(
        "--summarise",
        type=Path,
        metavar="JSON",
        help="print the distribution table of a saved run (its verify_multiclass.json) and stop",
    )
    args = parser.parse_args()
    if args.summarise is not None:
        saved = json.loads(args.summarise.read_text())
        keys = list(saved["results"])
        labels = saved.get("labels", {k: k for k in keys})
        # Runs saved before the defaults were recorded used each engine's default of that time
        # for their table; today's default for these models is exact in the margin.
        defaults = saved.get("defaults", {k: "margin" for k in keys})
        print("\n".join(distribution(saved["results"], labels, defaults)))
        return
    classes = "all" if args.classes == "all" else tuple(int(c) for c in args.classes.split(","))
    demo = open_dataset("demo")
    explainer = Explainer(
        demo, ExplainerConfig(classes=classes), store=ArtifactStore(args.cache_dir)
    ).prepare()
    picked = hard_cases(explainer)
    indices = list(picked)
    results = explainer.verify_many(indices, k=args.k)
    rows, per_model = [], {}
    for key, fitted in explainer.models.items():
        default = fitted.engine.default_estimate
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
    labels = {key: fitted.label for key, fitted in explainer.models.items()}
    defaults = {key: fitted.engine.default_estimate for key, fitted in explainer.models.items()}
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
            f"Same computation as `{command}`. Each model's default estimate ("
            + ", ".join(f"{labels[k]}: {ESTIMATE_NAMES[e]}" for k, e in defaults.items())
            + "); the criterion is Spearman >= 0.99 and slope within 0.9-1.1.",
            "",
            *distribution(payload_results(results), labels, defaults),
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
        "labels": labels,
        "defaults": defaults,
        "results": payload_results(results),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "verify_multiclass.json").write_text(json.dumps(payload, indent=1))
    path = write_results("verify_multiclass", "Leave-one-out check, every demo class", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
