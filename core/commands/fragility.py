"""``influence fragility``: how far influence can be trusted for small CNNs (Basu, Pope & Feizi 2021).

Runs the grid (architecture x weight decay x solver, plus the convex models as reference rows),
writes a results file and prints the table in the shape of the paper's Table 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from core.commands.common import ProgressBar, add_output_options, emit
from core.data import open_dataset
from core.fragility import (
    FRAGILITY_SOLVERS,
    FragilityConfig,
    FragilityResults,
    results_to_dict,
    run_fragility,
    save_results,
    solver_comparison,
)
from core.networks import Architecture

DEFAULT_OUTPUT = Path("fragility-results.json")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, e.g. 1,2,3; got {text!r}"
        ) from None
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, e.g. 1e-3,0; got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def _solver_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in FRAGILITY_SOLVERS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"solvers are {', '.join(FRAGILITY_SOLVERS)} separated by commas; got {text!r}"
        )
    return values


def _class_list(text: str) -> tuple[int | str, ...]:
    if text.strip() == "all":
        return ("all",)
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if len(values) < 2:
        raise argparse.ArgumentTypeError(
            f"give at least two classes separated by commas (names or indices), or 'all'; "
            f"got {text!r}"
        )
    return tuple(int(v) if v.isdigit() else v for v in values)


def register(subparsers: Any) -> None:
    """Add the ``fragility`` subcommand."""
    parser = subparsers.add_parser(
        "fragility",
        help="measure where influence breaks for small CNNs (depth, width, weight decay, solver)",
        description=(
            "Train a family of small CNNs on two classes of the demo data with and without weight "
            "decay, compute first-order influence with the exact Hessian, CG and LiSSA (damped by "
            "|most negative eigenvalue| + margin), and compare with retraining without each "
            "top-k point (Basu, Pope & Feizi 2021). Convex models are the reference rows. Prints "
            "Pearson / Spearman per model, test point and weight decay, and writes a results file."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny grid (a minute or two) instead of the full one"
    )
    parser.add_argument(
        "--dataset", default="demo", help="'demo' (default), 'fashion-mnist' or a dataset directory"
    )
    parser.add_argument(
        "--classes",
        type=_class_list,
        default=None,
        help="class names or indices separated by commas (default 0,6: T-shirt/top vs Shirt), "
        "or 'all' for every class",
    )
    parser.add_argument("--n-train", type=int, default=None, help="training images (balanced)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="side the images are pooled to (default 14)"
    )
    parser.add_argument(
        "--depths", type=_int_list, default=None, help="conv depths of the depth series, e.g. 1,2,3"
    )
    parser.add_argument(
        "--widths",
        type=_int_list,
        default=None,
        help="channel widths of the width series, e.g. 4,8,16",
    )
    parser.add_argument(
        "--base-depth", type=int, default=2, help="depth of the width series (default 2)"
    )
    parser.add_argument(
        "--base-width", type=int, default=8, help="width of the depth series (default 8)"
    )
    parser.add_argument(
        "--weight-decays", type=_float_list, default=None, help="λ values, e.g. 1e-3,0"
    )
    parser.add_argument(
        "--solvers", type=_solver_list, default=None, help="any of exact,cg,lissa (default all)"
    )
    parser.add_argument("--no-convex", action="store_true", help="leave out the convex rows")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")
    parser.add_argument("--top-k", type=int, default=None, help="points retrained per test point")
    parser.add_argument("--seeds", type=int, default=None, help="retraining minibatch orders")
    parser.add_argument(
        "--retrain-fraction", type=float, default=None, help="retraining length / training length"
    )
    parser.add_argument("--lissa-depth", type=int, default=None, help="LiSSA recursion depth")
    parser.add_argument(
        "--exact-max-params",
        type=int,
        default=None,
        help="largest network given the full exact Hessian (larger: last layer only)",
    )
    parser.add_argument(
        "--damping-margin", type=float, default=None, help="δ = max(0, -λ_min) + margin"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: small ops are fastest single-threaded on a busy machine)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"results file to write (default {DEFAULT_OUTPUT})",
    )
    add_output_options(parser)
    parser.set_defaults(handler=run)


def build_config(args: argparse.Namespace) -> FragilityConfig:
    """The study the options describe (``--quick`` or the full grid, with overrides)."""
    config = FragilityConfig.quick() if args.quick else FragilityConfig()
    top: dict[str, Any] = {}
    if args.classes is not None:
        top["classes"] = args.classes
    if args.n_train is not None:
        top["n_train"] = args.n_train
    if args.image_size is not None:
        top["image_size"] = args.image_size
    if args.depths is not None or args.widths is not None:
        architectures = [Architecture(d, args.base_width) for d in args.depths or ()]
        architectures += [Architecture(args.base_depth, w) for w in args.widths or ()]
        top["architectures"] = tuple(dict.fromkeys(architectures))
    if args.weight_decays is not None:
        top["weight_decays"] = args.weight_decays
    if args.no_convex:
        top["convex_models"] = ()
    training = _replace(config.training, epochs=args.epochs)
    ground_truth = _replace(
        config.ground_truth,
        top_k=args.top_k,
        seeds=args.seeds,
        retrain_fraction=args.retrain_fraction,
    )
    influence = _replace(
        config.influence,
        solvers=args.solvers,
        lissa_depth=args.lissa_depth,
        exact_max_params=args.exact_max_params,
        damping_margin=args.damping_margin,
    )
    return dataclasses.replace(
        config, training=training, ground_truth=ground_truth, influence=influence, **top
    )


def _replace(obj: Any, **changes: Any) -> Any:
    given = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


def _command_line(args: argparse.Namespace) -> str:
    parts = ["influence fragility"]
    if args.quick:
        parts.append("--quick")
    for flag in (
        "dataset", "classes", "n_train", "image_size", "depths", "widths", "weight_decays",
        "solvers", "epochs", "top_k", "seeds", "retrain_fraction", "lissa_depth",
        "exact_max_params", "damping_margin", "threads",
    ):  # fmt: skip
        value = getattr(args, flag)
        if value is None or (flag == "dataset" and value == "demo"):
            continue
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append(f"--{flag.replace('_', '-')} {value}")
    if args.no_convex:
        parts.append("--no-convex")
    parts.append(f"--output {args.output}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        print("influence fragility: error: --threads must be >= 1", file=sys.stderr)
        return 2
    config = build_config(args)
    dataset = open_dataset(args.dataset, image_size=(28, 28))
    bar = ProgressBar("fragility", enabled=not args.quiet)

    def progress(done: int, total: int, stage: str) -> None:
        bar.label = stage if len(stage) <= 60 else stage[:57] + "..."
        bar(done, total)

    results = run_fragility(
        config, progress, dataset=dataset, command=_command_line(args), threads=args.threads
    )
    bar(1, 1)
    path = save_results(results, args.output)
    table = results.table()
    payload = {
        "results_file": str(path),
        "table": {"columns": list(table.column_labels()), "rows": table.to_records()},
        "results": results_to_dict(results),
    }
    emit(payload, args, lambda _: report(results, path))
    return 0


def report(results: FragilityResults, path: Path) -> str:
    """The human-readable report: the table, the curvature and damping, solver costs."""
    config = results.config
    lines = [
        f"Influence vs retraining on {results.dataset}: {results.n_train} training images, "
        f"{results.n_test} test images, {config.image_size}x{config.image_size} pixels.",
        "Cells: Pearson / Spearman of the first-order influence score against the actual change in "
        f"test loss after retraining without each of the top {config.ground_truth.top_k} points "
        "by |score|.",
        "",
        results.table().to_text(),
        "",
        "Curvature and damping (δ = max(0, -λ_min) + "
        f"{config.influence.damping_margin:g}; the CNN rows' solvers share it):",
    ]
    for s in results.settings:
        if s.skipped:
            lines.append(f"  {s.label}, λ={s.weight_decay:g}: skipped — {s.skipped}")
            continue
        spectra = ", ".join(
            f"{c.scope}: λ_min {c.smallest_eigenvalue:.3g}, λ_max {c.largest_eigenvalue:.3g}"
            f" ({c.method}{'' if c.negative_eigenvalues < 0 else f', {c.negative_eigenvalues} < 0'})"
            for c in s.curvature
        )
        dampings = ", ".join(f"{r.label} {r.damping:.3g}" for r in s.solvers)
        gt = s.ground_truth
        reliability = ""
        if gt is not None and gt.seeds > 1:
            reliability = "; seed-to-seed Pearson " + "/".join(f"{v:.3f}" for v in gt.seed_pearson)
        lines.append(
            f"  {s.label}, λ={s.weight_decay:g}: {s.n_params} params, test accuracy "
            f"{s.test_accuracy:.3f}, {spectra}; damping {dampings}{reliability}; "
            f"{s.seconds:.0f}s"
        )
    comparisons = solver_comparison(results)
    if comparisons:
        lines += ["", "LiSSA against the reference solver (scores over all training points):"]
        for c in comparisons:
            lines.append(
                f"  {c.label}, λ={c.weight_decay:g}, {c.test_point}: score Pearson "
                f"{c.score_pearson:.3f}, inverse-HVP error {c.relative_error:.2g}; "
                f"vs retraining {c.pearson:.2f} (ref {c.reference_pearson:.2f}); "
                f"{c.seconds:.1f}s vs {c.reference_seconds:.1f}s"
            )
    lines += [
        "",
        f"Wrote {path} ({time.strftime('%H:%M:%S')}); total {results.seconds / 60:.1f} min with "
        f"{results.torch_threads} torch thread(s).",
    ]
    return "\n".join(lines)
