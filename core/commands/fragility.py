"""``influence fragility``: how far influence can be trusted for networks (Basu, Pope & Feizi 2021).

Runs the grid (network x weight decay x solver x repeat, plus the convex models as reference
rows), writes a results file and prints the table in the shape of the study's Table 1, the noise
floor and the study's numbers next to ours. Long runs keep every finished cell in a progress file
next to the output and continue from it when started again.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from core.commands.common import ProgressBar, add_output_options, emit
from core.data import open_dataset
from core.errors import InfluenceExplorerError
from core.fragility import (
    FRAGILITY_SOLVERS,
    TEST_POINT_LABELS,
    FragilityConfig,
    FragilityResults,
    SettingResult,
    load_results,
    noise_floor,
    progress_path,
    results_from_progress,
    results_to_dict,
    run_fragility,
    save_results,
    solver_comparison,
    study_comparison,
)
from core.fragility.codec import load_progress
from core.networks import Architecture

DEFAULT_OUTPUT = Path("fragility-results.json")

#: --architectures names; "cnn-dD-wW", "resnetD" and "resnetD-wW" are parsed too.
ARCHITECTURE_NAMES = {
    "lenet": Architecture.lenet5(),
    "lenet5": Architecture.lenet5(),
    "resnet": Architecture.resnet(8, 8),
}
_CNN = re.compile(r"cnn-d(\d+)-w(\d+)$")
_RESNET = re.compile(r"resnet(\d+)(?:-w(\d+))?$")


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


def parse_architecture(name: str) -> Architecture:
    """An --architectures entry: lenet, resnet (ResNet-8 w8), resnetD[-wW], cnn-dD-wW.

    Raises:
        argparse.ArgumentTypeError: an unknown name.
        InfluenceExplorerError: a known form with impossible numbers (e.g. resnet9).
    """
    key = name.strip().lower()
    if key in ARCHITECTURE_NAMES:
        return ARCHITECTURE_NAMES[key]
    if match := _CNN.match(key):
        return Architecture(int(match[1]), int(match[2]))
    if match := _RESNET.match(key):
        return Architecture.resnet(int(match[1]), int(match[2] or 8))
    raise argparse.ArgumentTypeError(
        f"unknown architecture {name!r}: use lenet, resnet, resnetD[-wW] (e.g. resnet14-w4) "
        "or cnn-dD-wW (e.g. cnn-d2-w8)"
    )


def _architecture_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("give at least one architecture")
    for value in values:
        try:
            parse_architecture(value)
        except InfluenceExplorerError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return values


def register(subparsers: Any) -> None:
    """Add the ``fragility`` subcommand."""
    parser = subparsers.add_parser(
        "fragility",
        help="measure where influence breaks for networks (depth, width, architecture, weight "
        "decay, solver) against retraining, with the noise floor",
        description=(
            "Train networks (small CNNs, LeNet-5, a ResNet without BatchNorm) on two classes of "
            "the demo data with and without weight decay, compute first-order influence with the "
            "exact Hessian, CG and LiSSA (damped by |most negative eigenvalue| + margin), and "
            "compare with retraining without each top-k point, over several minibatch orders "
            "(Basu, Pope & Feizi 2021). Convex models are the reference rows. Prints Pearson / "
            "Spearman per model, test point and weight decay next to the best agreement "
            "retraining noise allows, and writes a results file. Every finished cell is kept in "
            "OUTPUT.progress; run the same command again to continue a stopped run."
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
    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--architectures",
        type=_architecture_list,
        default=None,
        help="networks separated by commas: lenet, resnet (ResNet-8 w8), resnetD[-wW], "
        "cnn-dD-wW (default: the full grid's)",
    )
    grid.add_argument(
        "--depths", type=_int_list, default=None, help="conv depths of a small-CNN depth series"
    )
    grid.add_argument(
        "--widths", type=_int_list, default=None, help="channel widths of a small-CNN width series"
    )
    grid.add_argument(
        "--base-depth", type=int, default=2, help="depth of the width series (default 2)"
    )
    grid.add_argument(
        "--base-width", type=int, default=8, help="width of the depth series (default 8)"
    )
    grid.add_argument(
        "--weight-decays", type=_float_list, default=None, help="λ values, e.g. 1e-3,0"
    )
    grid.add_argument("--no-convex", action="store_true", help="leave out the convex rows")
    grid.add_argument(
        "--repeats", type=int, default=None, help="runs of each network cell from other seeds"
    )
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument(
        "--solvers", type=_solver_list, default=None, help="any of exact,cg,lissa (default all)"
    )
    protocol.add_argument("--epochs", type=int, default=None, help="training epochs")
    protocol.add_argument("--top-k", type=int, default=None, help="points retrained per test point")
    protocol.add_argument("--seeds", type=int, default=None, help="retraining minibatch orders")
    protocol.add_argument(
        "--noise-seeds",
        type=int,
        default=None,
        help="further retrainings with nothing removed, for the noise floor",
    )
    protocol.add_argument(
        "--retrain-fraction", type=float, default=None, help="retraining length / training length"
    )
    protocol.add_argument(
        "--retrain-learning-rate",
        type=float,
        default=None,
        help="peak learning rate of the retraining (default: the grid's)",
    )
    protocol.add_argument("--lissa-depth", type=int, default=None, help="LiSSA recursion depth")
    protocol.add_argument(
        "--exact-max-params",
        type=int,
        default=None,
        help="largest network given the full exact Hessian (larger: last layer only)",
    )
    protocol.add_argument(
        "--damping-margin", type=float, default=None, help="δ = max(0, -λ_min) + margin"
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: small ops are fastest single-threaded on a busy machine)",
    )
    run.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"results file to write (default {DEFAULT_OUTPUT}); finished cells are kept in "
        "OUTPUT.progress until the grid is done",
    )
    run.add_argument(
        "--restart", action="store_true", help="discard OUTPUT.progress and start the grid over"
    )
    run.add_argument(
        "--partial",
        action="store_true",
        help="do not run: write OUTPUT for the grid the other options describe from the cells "
        "OUTPUT.progress holds, the rest marked 'not run'",
    )
    run.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="RESULTS",
        help="do not run: print the report of an existing results file",
    )
    run.add_argument(
        "--markdown", action="store_true", help="the report's tables as Markdown (for docs)"
    )
    add_output_options(parser)
    parser.set_defaults(handler=run_command)


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
    if args.depths is not None or args.widths is not None or args.architectures is not None:
        architectures = [Architecture(d, args.base_width) for d in args.depths or ()]
        architectures += [Architecture(args.base_depth, w) for w in args.widths or ()]
        architectures += [parse_architecture(a) for a in args.architectures or ()]
        top["architectures"] = tuple(dict.fromkeys(architectures))
    if args.weight_decays is not None:
        top["weight_decays"] = args.weight_decays
    if args.no_convex:
        top["convex_models"] = ()
    if args.repeats is not None:
        top["repeats"] = args.repeats
    training = _replace(config.training, epochs=args.epochs)
    ground_truth = _replace(
        config.ground_truth,
        top_k=args.top_k,
        seeds=args.seeds,
        noise_seeds=args.noise_seeds,
        retrain_fraction=args.retrain_fraction,
        learning_rate=args.retrain_learning_rate,
    )
    solver = _replace(
        config.influence.solver, lissa_depth=args.lissa_depth, damping_margin=args.damping_margin
    )
    influence = _replace(
        config.influence,
        solvers=args.solvers,
        exact_max_params=args.exact_max_params,
        solver=solver if solver is not config.influence.solver else None,
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
        "dataset", "classes", "n_train", "image_size", "architectures", "depths", "widths",
        "weight_decays", "repeats", "solvers", "epochs", "top_k", "seeds", "noise_seeds",
        "retrain_fraction", "retrain_learning_rate", "lissa_depth", "exact_max_params", "damping_margin", "threads",
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


def run_command(args: argparse.Namespace) -> int:
    if args.report is not None:
        results = load_results(args.report)
        _emit(results, args.report, args)
        return 0
    progress_file = progress_path(args.output)
    if args.partial:
        results = results_from_progress(progress_file, build_config(args))
        # The results hold the grid this command describes, gathered from runs that may each
        # have covered part of it: it is this command that says what they are.
        results = dataclasses.replace(
            results, command=_command_line(args) + " --partial", torch_threads=args.threads
        )
        path = save_results(results, args.output)
        _emit(results, path, args)
        return 0
    if args.threads < 1:
        print("influence fragility: error: --threads must be >= 1", file=sys.stderr)
        return 2
    config = build_config(args)
    dataset = open_dataset(args.dataset, image_size=(28, 28))
    if args.restart:
        progress_file.unlink(missing_ok=True)
    bar = ProgressBar("fragility", enabled=not args.quiet)
    interactive = sys.stderr.isatty()
    last_stage = [""]

    def progress(done: int, total: int, stage: str) -> None:
        bar.label = stage if len(stage) <= 60 else stage[:57] + "..."
        bar(done, total)
        # A log file (a run in the background) gets one line per stage instead of a bar.
        name = stage.split(", seed")[0].split(", ")[-1] if not interactive else ""
        if name and name != last_stage[0] and not args.quiet:
            last_stage[0] = name
            print(f"{time.strftime('%H:%M:%S')} {stage}", file=sys.stderr, flush=True)

    def on_cell(result: SettingResult, index: int, total: int) -> None:
        if not args.quiet:
            print(f"[{index + 1}/{total}] {_cell_line(result)}", file=sys.stderr, flush=True)

    results = run_fragility(
        config,
        progress,
        dataset=dataset,
        command=_command_line(args),
        threads=args.threads,
        progress_file=progress_file,
        on_cell=on_cell,
    )
    bar(1, 1)
    path = save_results(results, args.output)
    # The results file now holds every cell of this grid; the progress file goes unless it also
    # keeps cells of other grids (a narrowed or extended run) that the results do not have.
    kept = load_progress(progress_file)
    grid = {cell.key for cell in results.config.cells()}
    if kept is not None and {key for key, _ in kept.cells} <= grid:
        progress_file.unlink(missing_ok=True)
    elif kept is not None and not args.quiet:
        print(
            f"Kept {progress_file}: it also holds cells of other grids with this protocol.",
            file=sys.stderr,
        )
    _emit(results, path, args)
    return 0


def _cell_line(s: SettingResult) -> str:
    head = f"{s.label}, λ={s.weight_decay:g}, repeat {s.repeat}"
    if s.skipped:
        return f"{head}: skipped — {s.skipped}"
    cells = []
    for r in s.solvers:
        pairs = " ".join(f"{p.pearson:.2f}/{p.spearman:.2f}" for p in r.points) or "failed"
        cells.append(f"{r.label} {pairs}")
    return f"{head}: {'; '.join(cells)} ({s.seconds:.0f} s)"


def _emit(results: FragilityResults, path: Path, args: argparse.Namespace) -> None:
    table = results.table()
    payload = {
        "results_file": str(path),
        "complete": results.complete,
        "missing": list(results.missing),
        "table": {"columns": list(table.column_labels()), "rows": table.to_records()},
        "noise_floor": [
            dataclasses.asdict(r) | {"verdict": r.verdict} for r in noise_floor(results)
        ],
        "study": [dataclasses.asdict(c) for c in study_comparison(results)],
        "results": results_to_dict(results),
    }
    if args.markdown and not args.json:
        sys.stdout.write(markdown_report(results) + "\n")
        return
    emit(payload, args, lambda _: report(results, path))


def report(results: FragilityResults, path: Path) -> str:
    """The human-readable report: the table, the noise floor, the study's numbers, the
    curvature and damping, solver costs."""
    config = results.config
    lines = [
        f"Influence vs retraining on {results.dataset}: {results.n_train} training images, "
        f"{results.n_test} test images, {config.image_size}x{config.image_size} pixels.",
        "Cells: Pearson / Spearman of the first-order influence score against the actual change in "
        f"test loss after retraining without each of the top {config.ground_truth.top_k} points "
        f"by |score|, mean over {config.repeats} repeat(s).",
        "",
        results.table().to_text(),
    ]
    if results.missing:
        lines += ["", f"Not run ({len(results.missing)} cells): " + "; ".join(results.missing)]
    floor = noise_floor(results)
    if floor:
        lines += [
            "",
            "Noise floor (full-network CG and LiSSA; ceiling = best Pearson retraining noise "
            "allows; chance = std of the test loss over retrainings with nothing removed):",
        ]
        for r in floor:
            lines.append(
                f"  {r.label}, λ={r.weight_decay:g}, {r.test_point}, {r.solver}: "
                f"{r.pearson:.2f}/{r.spearman:.2f} ceiling {r.pearson_ceiling:.2f}, "
                f"{r.verdict} ({r.within_noise}/{r.repeats}); chance {r.chance_std:.2g} vs "
                f"effects {r.effect_rms:.2g}"
            )
    lines += ["", "The study's numbers next to ours (high-loss test point, CG):"]
    for c in study_comparison(results):
        s = c.study
        lines.append(
            f"  {s.network} ({s.dataset}, {'wd' if s.weight_decay else 'no wd'}): study "
            f"{_pair(s.pearson, s.spearman)}; {c.label} {_pair(c.cg_pearson, c.cg_spearman)} "
            f"-> {c.reading}"
        )
    lines += [
        "",
        "Curvature and damping (δ = max(0, -λ_min) + "
        f"{config.influence.damping_margin:g}; the network rows' solvers share it):",
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
            f"  {s.label}, λ={s.weight_decay:g}, repeat {s.repeat}: {s.n_params} params, test "
            f"accuracy {s.test_accuracy:.3f}, {spectra}; damping {dampings}{reliability}; "
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
    load = "/".join(f"{v:.1f}" for v in results.load_average) or "unknown"
    lines += [
        "",
        f"Wrote {path} ({time.strftime('%H:%M:%S')}); total {results.seconds / 60:.1f} min with "
        f"{results.torch_threads} torch thread(s); load average at the end {load}.",
    ]
    return "\n".join(lines)


def _pair(pearson: float, spearman: float) -> str:
    text = [f"{v:.2f}" if math.isfinite(v) else "—" for v in (pearson, spearman)]
    return " / ".join(text)


def _range(span: tuple[float, float]) -> str:
    low, high = span
    if not (math.isfinite(low) and math.isfinite(high)):
        return "—"
    return f"{low:.2f}" if abs(high - low) < 0.005 else f"{low:.2f}–{high:.2f}"


def markdown_report(results: FragilityResults) -> str:
    """The tables of docs/fragility.md, generated from a results file."""
    out = ["### Pearson / Spearman against retraining (≤ ceiling; ✓ within noise)", ""]
    out.append(results.table().to_markdown(noise=True))
    out += [
        "",
        "### The noise floor",
        "",
        "| network | λ | test point | solver | Pearson (range) | Spearman (range) | ceiling | "
        "floor | per-seed Pearson | verdict | chance std | effect rms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in noise_floor(results):
        out.append(
            f"| {r.label} | {r.weight_decay:g} | {TEST_POINT_LABELS[r.test_point].split()[0]} "
            f"| {r.solver} | {r.pearson:.2f} ({_range(r.pearson_range)}) | {r.spearman:.2f} "
            f"({_range(r.spearman_range)}) | {r.pearson_ceiling:.2f} | {r.pearson_floor:.2f} "
            f"| {_range(r.seed_pearson_range)} | {r.verdict} "
            f"({r.within_noise}/{r.repeats}) | {r.chance_std:.2g} | {r.effect_rms:.2g} |"
        )
    out += [
        "",
        "### The study's numbers next to ours",
        "",
        "| study: network (data, λ) | study P / S | ours | CG P / S (range) | LiSSA P / S | "
        "last layer P / S | ceiling | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in study_comparison(results):
        s = c.study
        out.append(
            f"| {s.network} ({s.dataset}, {s.weight_decay:g}) | {_pair(s.pearson, s.spearman)} "
            f"| {c.label} | {_pair(c.cg_pearson, c.cg_spearman)} ({_range(c.cg_pearson_range)} / "
            f"{_range(c.cg_spearman_range)}) | {_pair(c.lissa_pearson, c.lissa_spearman)} | "
            f"{_pair(c.last_layer_pearson, c.last_layer_spearman)} | {c.pearson_ceiling:.2f} | "
            f"{c.reading} |"
        )
    return "\n".join(out)


__all__ = ["build_config", "markdown_report", "parse_architecture", "register", "report"]
