"""Is the chosen λ stable? The selection rule run with five cross-validation seeds on three pairs.

Usage: ``python -m bench.lambda_selection [--pairs 'T-shirt/top,Shirt;Pullover,Coat;...']
[--seeds 0,1,2,3,4]``

For every model of the explainer whose λ is chosen by cross-validation (today the logistic
regression on the backbone's features), on each class pair of the bundled demo: the λ the rule of
:mod:`core.selection` chooses with each seed — an explainer prepared with ``ExplainerConfig(seed=s)``,
exactly what the app does, so the curves land in the artifact cache and a rerun reuses them — and
the whole curve (mean held-out log-loss ± standard error, and accuracy, per λ) for every seed. For
comparison, the rule used before (one 3-fold split, accuracy averaged per fold, the best mean wins
with ties to the larger λ) with the same seeds. The results file is rewritten after every pair.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import markdown_table, write_results
from core.commands.common import StageBars
from core.data import load_demo
from core.explainer import Explainer, ExplainerConfig
from core.models import LogisticRegression
from core.selection import LambdaCurve, SelectionConfig, stratified_folds

DEFAULT_PAIRS = "T-shirt/top,Shirt;Pullover,Coat;Sneaker,Ankle boot"


def previous_rule(features: np.ndarray, labels: np.ndarray, grid: tuple[float, ...], seed: int):
    """The rule before this one: one stratified 3-fold split, accuracy averaged over the folds
    (not the examples), the best mean chosen (rounded to 1e-10, ties to the larger λ).
    Returns: (chosen λ, mean accuracy per λ)."""
    folds = stratified_folds(labels, 3, np.random.default_rng(seed))
    accuracy = np.zeros(len(grid))
    for i, l2 in enumerate(grid):
        for fold in range(3):
            train, held = folds != fold, folds == fold
            model = LogisticRegression(l2=l2, tol=1e-8).fit(features[train], labels[train])
            accuracy[i] += model.accuracy(features[held], labels[held]) / 3
    best = max(range(len(grid)), key=lambda i: (round(float(accuracy[i]), 10), grid[i]))
    return grid[best], accuracy


def curve_rows(curve: LambdaCurve) -> list[list[str]]:
    return [
        [
            f"{g:g}",
            f"{m:.4f} ± {e:.4f}",
            f"{a:.4f}",
            ("best" if g == curve.best else "") + (" chosen" if g == curve.chosen else ""),
        ]
        for g, m, e, a in zip(curve.grid, curve.mean, curve.stderr, curve.accuracy, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="class pairs separated by ';'")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    start = time.perf_counter()
    summary, sections = [], []
    dataset = load_demo()
    pairs = args.pairs.split(";")
    for done, pair_text in enumerate(pairs, 1):
        pair = tuple(pair_text.split(","))
        explainers = {}
        for seed in seeds:
            explainers[seed] = Explainer(dataset, ExplainerConfig(classes=pair, seed=seed))
            explainers[seed].prepare(StageBars(not args.quiet))
        first = explainers[seeds[0]]
        for key, fitted in first.models.items():
            if fitted.lambda_curve is None:
                continue
            curves = {s: explainers[s].models[key].lambda_curve for s in seeds}
            features = fitted.model.features_.numpy()
            labels = first.train_labels
            old = {s: previous_rule(features, labels, fitted.lambda_curve.grid, s) for s in seeds}
            chosen = {s: c.chosen for s, c in curves.items()}
            stable = len(set(chosen.values())) == 1
            summary.append(
                [
                    " vs ".join(pair),
                    fitted.label,
                    ", ".join(f"{chosen[s]:g}" for s in seeds),
                    "yes" if stable else "**no**",
                    ", ".join(f"{old[s][0]:g}" for s in seeds),
                ]
            )
            lines = [f"### {' vs '.join(pair)}: {fitted.label}", ""]
            lines.append(f"Rule (seed {seeds[0]}): {curves[seeds[0]].rule}")
            lines.append("")
            for seed in seeds:
                lines.append(f"Seed {seed}: chosen λ = {curves[seed].chosen:g}")
                lines.append("")
                lines.append(
                    markdown_table(
                        ["λ", "held-out log-loss ± s.e.", "held-out accuracy", ""],
                        curve_rows(curves[seed]),
                    )
                )
                lines.append("")
            lines.append(
                "Previous rule (one 3-fold split, accuracy averaged per fold), accuracy per λ "
                "by seed:"
            )
            lines.append("")
            lines.append(
                markdown_table(
                    ["seed", *(f"λ = {g:g}" for g in fitted.lambda_curve.grid), "chosen"],
                    [[str(s), *(f"{a:.6f}" for a in old[s][1]), f"{old[s][0]:g}"] for s in seeds],
                )
            )
            sections.append("\n".join(lines))
        _write(args, seeds, summary, sections, time.perf_counter() - start, done, len(pairs))


def _write(args, seeds, summary, sections, seconds, done, total) -> None:
    config = SelectionConfig()
    status = "" if done == total else f" **Partial: {done} of {total} pairs so far.**"
    body = (
        f"Bundled demo, {len(seeds)} cross-validation seeds ({', '.join(map(str, seeds))}) per "
        f"pair. The rule: {config.repeats} x {config.folds}-fold stratified cross-validation, "
        "held-out log-loss averaged per example, the largest λ within one standard error of the "
        f"lowest mean (core.selection). Took {seconds:.0f} s (curves already in the artifact "
        f"cache are read, not recomputed).{status}\n\n"
        + markdown_table(
            [
                "pair",
                "model",
                "λ chosen, by seed",
                "same for every seed",
                "previous rule, by seed",
            ],
            summary,
        )
        + "\n\n"
        + "\n\n".join(sections)
    )
    print(write_results("lambda_selection", "Choosing λ: stability across seeds", body))


if __name__ == "__main__":
    main()
