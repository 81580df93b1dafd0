"""Every estimate against leave-one-out retraining, on three class pairs of the bundled demo and on
test images stratified by each model's margin.

Usage: ``python -m bench.verify_demo [--pairs 'A,B;C,D'] [--per-stratum 3] [--k 50] [--seed 0]
[--extra 'T-shirt/top,Shirt:0,55;Sneaker,Ankle boot:0,150'] [--logreg-l2 L --name NAME]``

For each pair, the default explainer (every model; the logistic regression's λ by the rule of
core.selection). For each model, its test images are split by the margin m = ±(output) of the true
class (binary models): **confident** (m ≥ 1, beyond the SVM's margin, where the smooth hinge is
nearly exponential), **near the boundary** (0 ≤ m < 1) and **wrong** (m < 0). From each stratum the
most extreme image (largest m, smallest m, most negative m) and ``per-stratum - 1`` seeded random
ones are verified, plus the named extras: retrain without each of the top k training images by
|score| of the default estimate, and compare every estimate on the same points (Pearson, Spearman,
the slope through the origin Σxy/Σx², and a fitted line's slope for comparison). Same numbers as
``influence verify --test-indices ... --json``. ``--logreg-l2`` fixes the logistic regression's λ
instead (a stress test; write it under another ``--name``).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from bench.common import markdown_table, write_results
from core.commands.common import ProgressBar, StageBars
from core.data import load_demo
from core.explainer import Explainer, ExplainerConfig
from core.labels import ESTIMATE_DESCRIPTIONS
from core.validation import verify

DEFAULT_PAIRS = "T-shirt/top,Shirt;Pullover,Coat;Sneaker,Ankle boot"
#: Test images where the linearised estimates were found to fail (slopes 1.13-2.76).
DEFAULT_EXTRA = "T-shirt/top,Shirt:0,55;Sneaker,Ankle boot:0,150"
STRATA = ("confident", "near boundary", "wrong")


def margins(fitted, labels: np.ndarray) -> np.ndarray:
    """Margin of the true class for each test image: (2y - 1)·s for one-output binary models,
    s_y - max_{c≠y} s_c otherwise. Returns: (n_test,)."""
    model = fitted.model
    outputs = model.scores(model.transform(fitted.test_inputs)).numpy()
    if outputs.shape[1] == 1:
        return (2 * labels - 1) * outputs[:, 0]
    own = outputs[np.arange(len(labels)), labels]
    others = outputs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return own - others.max(axis=1)


def stratum_of(m: float) -> str:
    return "confident" if m >= 1 else ("near boundary" if m >= 0 else "wrong")


def pick(m: np.ndarray, per_stratum: int, rng: np.random.Generator) -> dict[int, str]:
    """Test images to verify: per stratum the most extreme one and per_stratum - 1 random ones."""
    chosen: dict[int, str] = {}
    for name in STRATA:
        rows = np.flatnonzero([stratum_of(v) == name for v in m])
        if rows.size == 0:
            continue
        extreme = {
            "confident": rows[np.argmax(m[rows])],
            "near boundary": rows[np.argmin(m[rows])],
            "wrong": rows[np.argmin(m[rows])],
        }[name]
        chosen[int(extreme)] = name
        others = np.setdiff1d(rows, [extreme])
        for i in rng.choice(others, min(per_stratum - 1, others.size), replace=False):
            chosen[int(i)] = name
    return chosen


def cell(values: np.ndarray) -> str:
    return f"{np.median(values):.3f} [{values.min():.3f}, {values.max():.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="class pairs separated by ';'")
    parser.add_argument("--per-stratum", type=int, default=3)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--extra", default=DEFAULT_EXTRA, help="'pair:i,j;pair:k' test images always verified"
    )
    parser.add_argument(
        "--logreg-l2", type=float, default=None, help="fix λ instead of choosing it"
    )
    parser.add_argument("--name", default="verify_demo", help="results file bench/results/NAME.md")
    parser.add_argument(
        "--models", default=None, help="model keys to check, comma-separated (default: all)"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    extra: dict[str, list[int]] = defaultdict(list)
    for item in filter(None, args.extra.split(";")):
        pair, indices = item.split(":")
        extra[pair] += [int(i) for i in indices.split(",")]

    start, cpu_start = time.perf_counter(), time.process_time()
    dataset = load_demo()
    records = []  # one per (pair, model, test image)
    models_seen: dict[str, str] = {}
    context = []
    for pair_text in args.pairs.split(";"):
        pair = tuple(pair_text.split(","))
        explainer = Explainer(dataset, ExplainerConfig(classes=pair, logreg_l2=args.logreg_l2))
        explainer.prepare(StageBars(not args.quiet))
        summaries = explainer.summaries()
        context.append(
            f"- {' vs '.join(pair)}: "
            + "; ".join(
                f"{s.label}: test accuracy {s.test_accuracy:.3f}, "
                + ", ".join(f"{k} = {v:g}" for k, v in s.hyperparameters.items())
                for s in summaries.values()
            )
        )
        labels = explainer.test_labels
        for key, fitted in explainer.models.items():
            if args.models is not None and key not in args.models.split(","):
                continue
            models_seen[key] = fitted.label
            m = margins(fitted, labels)
            rng = np.random.default_rng([args.seed, len(records)])
            chosen = pick(m, args.per_stratum, rng)
            for i in extra.get(pair_text, []):
                chosen.setdefault(int(i), stratum_of(m[i]))
            indices = sorted(chosen)
            losses = fitted.model.loss(fitted.test_inputs[indices], labels[indices])
            counts = {name: int(sum(stratum_of(v) == name for v in m)) for name in STRATA}
            context.append(
                f"  - {fitted.label}: test images confident / near boundary / wrong: "
                + " / ".join(f"{counts[s]} ({counts[s] / len(m):.0%})" for s in STRATA)
            )
            results = verify(
                fitted.engine,
                fitted.test_inputs[indices],
                labels[indices],
                k=args.k,
                progress=ProgressBar(f"{pair_text[:12]} {key}", enabled=not args.quiet),
            )
            for i, loss, result in zip(indices, losses, results, strict=True):
                records.append(
                    {
                        "pair": " vs ".join(pair),
                        "key": key,
                        "model": fitted.label,
                        "test": i,
                        "stratum": chosen[i],
                        "margin": float(m[i]),
                        "loss": float(loss),
                        "agreement": result.agreement,
                        "converged": result.converged,
                    }
                )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    estimates = list(records[0]["agreement"])

    def stat(rows, estimate, name):
        return np.array([getattr(r["agreement"][estimate], name) for r in rows])

    def meets(rows, estimate):
        spearman, slope = stat(rows, estimate, "spearman"), stat(rows, estimate, "slope")
        return (spearman >= 0.99) & (np.abs(slope - 1) <= 0.1)

    summary_rows, strata_rows, worst_rows, detail_rows = [], [], [], []
    for key, label in models_seen.items():
        mine = [r for r in records if r["key"] == key]
        for estimate in estimates:
            ok = meets(mine, estimate)
            summary_rows.append(
                [
                    label,
                    ESTIMATE_DESCRIPTIONS[estimate],
                    *(cell(stat(mine, estimate, s)) for s in ("pearson", "spearman", "slope")),
                    cell(stat(mine, estimate, "affine_slope")),
                    f"{ok.sum()} / {len(mine)}",
                ]
            )
            for name in STRATA:
                rows = [r for r in mine if r["stratum"] == name]
                if rows:
                    strata_rows.append(
                        [
                            label,
                            ESTIMATE_DESCRIPTIONS[estimate],
                            name,
                            str(len(rows)),
                            cell(stat(rows, estimate, "spearman")),
                            cell(stat(rows, estimate, "slope")),
                            f"{meets(rows, estimate).sum()} / {len(rows)}",
                        ]
                    )
            slopes = stat(mine, estimate, "slope")
            spearmans = stat(mine, estimate, "spearman")
            worst_slope = mine[int(np.argmax(np.abs(slopes - 1)))]
            worst_rank = mine[int(np.argmin(spearmans))]
            worst_rows.append(
                [
                    label,
                    ESTIMATE_DESCRIPTIONS[estimate],
                    f"{worst_slope['pair']} test {worst_slope['test']} ({worst_slope['stratum']}, "
                    f"margin {worst_slope['margin']:+.2f}): "
                    f"{worst_slope['agreement'][estimate].slope:.3f}",
                    f"{worst_rank['pair']} test {worst_rank['test']} ({worst_rank['stratum']}, "
                    f"margin {worst_rank['margin']:+.2f}): "
                    f"{worst_rank['agreement'][estimate].spearman:.3f}",
                ]
            )
        for r in mine:
            detail_rows.append(
                [
                    r["pair"],
                    label,
                    str(r["test"]),
                    r["stratum"],
                    f"{r['margin']:+.2f}",
                    f"{r['loss']:.1e}",
                    *(
                        f"{a.pearson:.3f} / {a.spearman:.3f} / {a.slope:.3f}"
                        for a in (r["agreement"][e] for e in estimates)
                    ),
                    "yes" if r["converged"] else "**no**",
                ]
            )
    body = (
        f"Bundled demo, {len(records)} (pair, model, test image) checks: per model and pair, "
        f"{args.per_stratum} test images per margin stratum (the most extreme one and "
        f"{args.per_stratum - 1} random, seed {args.seed}) plus the named ones "
        f"({args.extra or 'none'}); the top {args.k} training images by |score| of the default "
        f"estimate retrained for each, true labels. Slope: least squares through the origin, "
        f"Σ predicted·actual / Σ predicted² (1 = predicted ≈ actual); 'fitted line': the slope of "
        f"a least-squares line with an intercept. Took {seconds:.0f} s in all (preparing "
        f"included; {cpu:.0f} s of CPU time over the 2 threads, which the wall time exceeds as "
        "much as the machine is shared: see the load average above).\n\n"
        + "\n".join(context)
        + "\n\nMedian [min, max] over every test image tried:\n\n"
        + markdown_table(
            [
                "model",
                "estimate",
                "Pearson",
                "Spearman",
                "slope (through 0)",
                "fitted line's slope",
                "Spearman ≥ 0.99 and slope 0.9–1.1",
            ],
            summary_rows,
        )
        + "\n\nBy margin stratum:\n\n"
        + markdown_table(
            ["model", "estimate", "stratum", "images", "Spearman", "slope", "both criteria"],
            strata_rows,
        )
        + "\n\nWorst cases:\n\n"
        + markdown_table(
            ["model", "estimate", "slope furthest from 1", "lowest Spearman"], worst_rows
        )
        + "\n\nPer test image (Pearson / Spearman / slope through 0):\n\n"
        + markdown_table(
            [
                "pair",
                "model",
                "test image",
                "stratum",
                "margin",
                "test loss",
                *(ESTIMATE_DESCRIPTIONS[e] for e in estimates),
                "converged",
            ],
            detail_rows,
        )
    )
    title = "Leave-one-out check on the demo"
    if args.logreg_l2 is not None:
        title += f" (logistic regression's λ fixed at {args.logreg_l2:g})"
    print(write_results(args.name, title, body, module="verify_demo"))


if __name__ == "__main__":
    main()
