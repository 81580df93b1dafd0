"""In-process against a local Dask cluster of 1 and 2 workers, from 60k to 600k training points.

Usage::

    python -m bench.scale_cluster [--sizes 60000,120000,300000,600000] [--modes in-process,1,2]
        [--classes 2,10] [--full-up-to 120000] [--full-classes 2]
        [--solver exact] [--budget 2400] [--out scale_cluster]

Data: synthetic 1280-d float32 features (the width of EfficientNet-Lite0's), labels from a random
linear model with Gumbel noise, binary or 10-class; L2 logistic regression, λ = 1e-3. Features are
made per shard by a seeded generator (on the workers for the cluster, concatenated in this process
for the in-process run, as float64 as the explainer holds them), and their making is not timed.

For every (classes, n, mode):

- **passes** (every size): a gradient pass (objective and gradient at θ), one Hessian pass
  (binary only: 10 classes need 55 blocks of n·d² each), a Hessian-vector-product pass, a
  scoring pass (first-order scores of every training point for one test image); the gradient,
  HVP and scoring passes are timed as the median of three after a first call (on the cluster
  a first call was up to 1.7 s slower, once per kind of pass; the cause is not pinned down);
- **full stages** (n up to ``--full-up-to``, within ``--budget`` seconds per configuration):
  fit (Newton to ‖∇R‖ <= 1e-10; Newton-CG for 10 classes), factorise (the exact solver: the
  Hessian, for 10 classes in the class basis, d·(C - 1) = 11,520 square, its blocks summed over
  the shards on the cluster, and its Cholesky factor on the driver), corrected precompute
  (the per-point quadratic forms, for 10 classes from the inverse of the class basis's matrix,
  which each worker receives once; self-influence), one test image (s_test, all n scores, top
  10), 100 test images (top 10 each, never the 100 x n matrix on the cluster), leave-one-out
  k = 10 (one test image; tasks on the cluster); the Newton-corrected estimate throughout.
  ``--solver cg`` runs the 10-class configurations with the CG solver instead (first-order
  estimate, no factorisation), what the cluster uses past a dense Hessian's size.

Peak resident memory per stage: the driver (this process, which also hosts the local cluster's
scheduler) and each worker (VmHWM, reset before each stage). Physical limits beside the
timings: memory bandwidth and float64 GEMM speed measured here with 1 thread (one worker) and
all threads (in-process), the bytes a scoring pass must read (float32 shards on the cluster,
float64 in-process) and the FLOPs of a Hessian pass (2·n·d²).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import (
    RESULTS_DIR,
    markdown_table,
    peak_rss_bytes,
    reset_peak_rss,
    write_results,
)
from core.linalg import STRIP

D = 1280
L2 = 1e-3
SEED = 0
GIB = 2**30
ROWS_PER_SHARD = 50_000
TEST_POINTS = 100
#: Timed repeats of a cheap pass after its first call (the median is reported).
PASS_REPEATS = 3


# ----------------------------------------------------------------------------- data
def synthetic_shard(index: int, rows: int, d: int, n_classes: int, seed: int) -> tuple[Any, Any]:
    """Shard ``index``: (rows, d) float32 features and labels of a random linear model."""
    weights = np.random.default_rng(seed).standard_normal((d, n_classes))
    rng = np.random.default_rng([seed, 1 + index])
    X = rng.standard_normal((rows, d), dtype=np.float32) * np.float32(3.0 / math.sqrt(d))
    logits = X @ weights + rng.gumbel(size=(rows, n_classes))
    return X, logits.argmax(1)


def shard_sizes(n: int, n_workers: int) -> list[int]:
    k = max(4 * n_workers, math.ceil(n / ROWS_PER_SHARD))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [int(b - a) for a, b in itertools.pairwise(bounds)]


def test_points(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    X, y = synthetic_shard(10**6, TEST_POINTS, D, n_classes, SEED)
    return X.astype(np.float64), y


# ----------------------------------------------------------------------------- physics
def measure_machine() -> dict[str, float]:
    """Memory bandwidth (GB/s, reading a 1 GiB float32 array) and float64 GEMM speed (GFLOP/s),
    with one thread (a worker) and with torch's default threads (in-process)."""
    out = {}
    default_threads = torch.get_num_threads()
    array = torch.ones(GIB // 4, dtype=torch.float32)
    a = torch.randn(2048, 2048, dtype=torch.float64)
    for label, threads in (("1 thread", 1), (f"{default_threads} threads", default_threads)):
        torch.set_num_threads(threads)
        array.sum()  # warm
        times = []
        for _ in range(3):
            start = time.perf_counter()
            array.sum()
            times.append(time.perf_counter() - start)
        out[f"bandwidth GB/s, {label}"] = array.numel() * 4 / min(times) / 1e9
        a @ a
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        out[f"GEMM GFLOP/s, {label}"] = 2 * 2048**3 / min(times) / 1e9
    torch.set_num_threads(default_threads)
    return out


# ----------------------------------------------------------------------------- memory
class Memory:
    """Peak resident memory of the driver and of each worker over a stage (VmHWM)."""

    def __init__(self, client: Any | None) -> None:
        self.client = client

    def reset(self) -> None:
        reset_peak_rss()
        if self.client is not None:
            self.client.run(reset_peak_rss)

    def peaks(self) -> tuple[float, list[float]]:
        driver = peak_rss_bytes() / GIB
        if self.client is None:
            return driver, []
        workers = self.client.run(peak_rss_bytes)
        return driver, [workers[w] / GIB for w in sorted(workers)]


# ----------------------------------------------------------------------------- one configuration
class Config:
    def __init__(
        self, n: int, n_classes: int, mode: str, budget: float, full: bool, solver: str = "exact"
    ) -> None:
        self.n, self.n_classes, self.mode, self.budget, self.full = n, n_classes, mode, budget, full
        self.solver = solver
        self.start = time.perf_counter()
        self.stages: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.budget

    def run(self, name: str, memory: Memory, fn: Callable[[], Any], repeat: int = 1) -> Any:
        """Time ``fn``. With ``repeat`` > 1 (a pass), the first call is recorded apart
        (``first_seconds``: on the cluster it was up to 1.7 s slower than the next ones) and
        ``seconds`` is the median of ``repeat`` more."""
        if self.over_budget():
            self.stages[name] = {"skipped": "budget"}
            return None
        memory.reset()
        load = os.getloadavg()[0]
        times = []
        for _ in range(1 + repeat if repeat > 1 else 1):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times[1:])) if repeat > 1 else times[0]
        driver, workers = memory.peaks()
        self.stages[name] = {
            "seconds": seconds,
            "driver_gib": driver,
            "worker_gib": workers,
            "load": load,
        }
        if repeat > 1:
            self.stages[name]["first_seconds"] = times[0]
        print(
            f"  {name}: {seconds:.2f} s"
            + (f" (first {times[0]:.2f} s)" if repeat > 1 else "")
            + f", driver {driver:.2f} GiB, workers "
            f"{', '.join(f'{w:.2f}' for w in workers) or '-'} GiB (load {load:.1f})",
            flush=True,
        )
        return result


def measure(
    cfg: Config,
    memory: Memory,
    fit: Callable[[bool], Any],
    make_engine: Callable[..., Any],
    top_tens: Callable[[Any, np.ndarray, np.ndarray, str], Any],
    loo: Callable[[Any, np.ndarray, np.ndarray, str], Any],
) -> None:
    """Every stage once the data is in place, the same on both paths.

    Args:
        fit: fits the logistic regression to ‖∇R‖ <= 1e-10 (True) or only sets its state for
            the passes (False).
        make_engine: the engine class (in-process or sharded), called as (model, solver).
        top_tens: the top 10 of each of the given test points under an estimate.
        loo: leave-one-out k = 10 for the given test point under an estimate.
    """
    from core.backend.explainer import neighbour_distance
    from core.influence import SolverConfig

    X_test, y_test = test_points(cfg.n_classes)
    binary = cfg.n_classes == 2
    exact = binary or cfg.solver == "exact"
    solver = SolverConfig() if exact else SolverConfig(method="cg")
    model = cfg.run("fit", memory, lambda: fit(True)) if cfg.full else fit(False)
    if model is None:
        return
    cfg.stages.setdefault("fit", {})["iterations"] = model.fit_info_.iterations
    theta = model.theta_
    v = torch.randn(model.n_params_, dtype=torch.float64)
    cfg.run("gradient pass", memory, lambda: model._objective_terms(theta)[:2], PASS_REPEATS)
    if binary:
        cfg.run("Hessian pass", memory, lambda: model.hessian())
    cfg.run("HVP pass", memory, lambda: model.hvp(v), PASS_REPEATS)
    if cfg.full:
        engine = cfg.run(
            "factorise" if exact else "solver", memory, lambda: make_engine(model, solver)
        )
        if engine is None:
            return
        s = engine.inverse_hvp_test(X_test[:1], y_test[:1])
    else:
        # A score pass needs only some s_test: one CG iteration's engine and a random vector.
        engine = make_engine(model, SolverConfig(method="cg", cg_max_iter=1, cg_tol=0.99))
        s = torch.randn(1, model.n_params_, dtype=torch.float64)
    cfg.run(
        "score pass",
        memory,
        lambda: engine.scores_from_stest(s, estimate="first_order"),
        PASS_REPEATS,
    )
    # The explanation's other pass over the training rows: one test image's distance to each
    # and its familiarity (the k-th nearest), as Explainer.explain asks for them.
    neighbours = neighbour_distance(model, X_test, seed=SEED)
    point = model.transform(X_test[:1])
    cfg.run("familiarity pass", memory, lambda: neighbours.query(point), PASS_REPEATS)
    if not cfg.full:
        return
    estimate = "corrected" if exact else "first_order"
    if exact:
        cfg.run("corrected precompute", memory, lambda: engine.self_influence("corrected"))
    # Median of repeats after a first call (shown in brackets), which pays one-time costs.
    cfg.run(
        "1 test image",
        memory,
        lambda: top_tens(engine, X_test[:1], y_test[:1], estimate),
        PASS_REPEATS,
    )
    if exact:  # the explainer's default estimate, exact in the margin
        cfg.run(
            "1 test image, margin",
            memory,
            lambda: top_tens(engine, X_test[:1], y_test[:1], "margin"),
            PASS_REPEATS,
        )
    cfg.run(
        f"{TEST_POINTS} test images", memory, lambda: top_tens(engine, X_test, y_test, estimate)
    )
    cfg.run("LOO k=10", memory, lambda: loo(engine, X_test[:1], y_test[:1], estimate))


def run_in_process(cfg: Config) -> None:
    from core.influence import InfluenceEngine, top_k
    from core.models import LogisticRegression
    from core.validation import verify

    sizes = shard_sizes(cfg.n, 1)
    parts = [synthetic_shard(i, s, D, cfg.n_classes, SEED) for i, s in enumerate(sizes)]
    X = np.concatenate([p[0] for p in parts]).astype(np.float64)
    y = np.concatenate([p[1] for p in parts])
    del parts
    measure(
        cfg,
        Memory(None),
        lambda full: LogisticRegression(l2=L2, **({} if full else {"tol": 1e6})).fit(X, y),
        InfluenceEngine,
        lambda engine, X_t, y_t, estimate: [
            top_k(row, 10) for row in engine.influence_scores(X_t, y_t, estimate=estimate)
        ],
        lambda engine, X_t, y_t, estimate: verify(engine, X_t, y_t, k=10, select_by=estimate),
    )


def run_cluster(cfg: Config, workers: int) -> None:
    from core.backend.cluster import connect
    from core.backend.engine import ShardedInfluenceEngine
    from core.backend.models import ShardedLogisticRegression
    from core.backend.shards import ShardedData

    with connect(f"local:{workers}", timeout=300) as cluster:
        runner = cluster.runner
        data = ShardedData.from_generator(
            runner, synthetic_shard, shard_sizes(cfg.n, workers), D, cfg.n_classes, SEED
        )
        cfg.notes.append(f"{data.n_shards} shards")
        # The fixed cost of one scheduler round trip (a task that does nothing), which every
        # pass pays a few times: median of 20.
        trips = []
        for _ in range(20):
            start = time.perf_counter()
            cluster.client.submit(int, 1, pure=False).result()
            trips.append(time.perf_counter() - start)
        cfg.stages["round trip"] = {
            "seconds": float(np.median(trips)),
            "driver_gib": 0.0,
            "worker_gib": [],
        }
        measure(
            cfg,
            Memory(cluster.client),
            lambda full: ShardedLogisticRegression(l2=L2, **({} if full else {"tol": 1e6})).fit(
                data
            ),
            ShardedInfluenceEngine,
            lambda engine, X_t, y_t, estimate: engine.top_k_scores(X_t, y_t, 10, estimate=estimate),
            lambda engine, X_t, y_t, estimate: engine.verify(X_t, y_t, k=10, select_by=estimate),
        )


# ----------------------------------------------------------------------------- report
STAGES = (
    "fit",
    "factorise",
    "solver",
    "corrected precompute",
    "1 test image",
    "1 test image, margin",
    f"{TEST_POINTS} test images",
    "LOO k=10",
)


def _cell(stage: dict[str, Any] | None, with_iterations: bool = False) -> str:
    if not stage:
        return "—"
    if "skipped" in stage:
        return f"not run ({stage['skipped']})"
    if "seconds" not in stage:
        return "—"
    text = f"{stage['seconds']:.3g}"
    if "first_seconds" in stage:
        text += f" (first {stage['first_seconds']:.3g})"
    if with_iterations and "iterations" in stage:
        text += f" ({stage['iterations']} it)"
    return text


def _peak(stage_map: dict[str, dict[str, Any]]) -> tuple[str, str]:
    timed = [s for name, s in stage_map.items() if "seconds" in s and name != "round trip"]
    if not timed:
        return "—", "—"
    driver = max(s["driver_gib"] for s in timed)
    workers = [max(w) for s in timed if (w := s["worker_gib"])]
    return f"{driver:.2f}", (f"{max(workers):.2f}" if workers else "—")


def report(
    records: list[dict[str, Any]], machine: dict[str, float], args: argparse.Namespace
) -> str:
    lines = [__doc__.split("Usage::")[0].strip(), ""]
    lines.append("## Physical limits measured here")
    lines.append("")
    lines.append(
        markdown_table(["quantity", "value"], [[k, f"{v:.1f}"] for k, v in machine.items()])
    )
    lines.append("")
    bw1 = machine["bandwidth GB/s, 1 thread"]
    bwn = next(v for k, v in machine.items() if k.startswith("bandwidth") and "1 thread" not in k)
    gf1 = machine["GEMM GFLOP/s, 1 thread"]
    gfn = next(v for k, v in machine.items() if k.startswith("GEMM") and "1 thread" not in k)
    for n_classes in sorted({r["classes"] for r in records}):
        rows = [r for r in records if r["classes"] == n_classes]
        lines.append(
            f"## {'Binary' if n_classes == 2 else f'{n_classes}-class'} logistic regression"
        )
        lines.append("")
        lines.append(
            "Full stages, seconds (peak resident GiB of the driver and of the largest worker over all stages; "
            f"one test image: median of {PASS_REPEATS} after a first call, shown in brackets):"
        )
        lines.append("")
        headers = [
            "n",
            "mode",
            *[s for s in STAGES if any(s in r["stages"] for r in rows)],
            "driver GiB",
            "worker GiB",
            "load",
        ]
        table = []
        for r in rows:
            if not r["full"]:
                continue
            stage_names = headers[2:-3]
            driver, worker = _peak(r["stages"])
            table.append(
                [
                    f"{r['n']:,}",
                    r["mode"],
                    *[_cell(r["stages"].get(s), s == "fit") for s in stage_names],
                    driver,
                    worker,
                    f"{r['load_before']:.1f}/{r['load_after']:.1f}",
                ]
            )
        lines.append(markdown_table(headers, table) if table else "(none run)")
        lines.append("")
        lines.append(
            "One pass over the training set, seconds, beside its physical floor (gradient, HVP, "
            f"score and familiarity passes: median of {PASS_REPEATS} after a first call, shown in "
            "brackets; the familiarity pass is one test image's distances to every training row "
            "and its k-th nearest, as an explanation asks for them):"
        )
        lines.append("")
        table = []
        for r in rows:
            workers = 0 if r["mode"] == "in-process" else int(r["mode"].split()[0])
            itemsize = 8 if workers == 0 else 4
            bandwidth = bwn if workers == 0 else bw1 * workers
            gflops = gfn if workers == 0 else gf1 * workers
            score_bytes = r["n"] * D * itemsize
            # In-process the Hessian is one symmetric product (its lower triangle in strips,
            # core.linalg.weighted_gram); each worker forms its shard's block by a general GEMM.
            hessian_flops = r["n"] * D * D * (1 + STRIP / D) if workers == 0 else 2 * r["n"] * D * D
            passes = r["stages"]
            table.append(
                [
                    f"{r['n']:,}",
                    r["mode"],
                    _cell(passes.get("round trip")),
                    _cell(passes.get("gradient pass")),
                    _cell(passes.get("HVP pass")),
                    _cell(passes.get("score pass")),
                    f"{score_bytes / 1e9:.2f} GB → {score_bytes / bandwidth / 1e9:.3g}",
                    _cell(passes.get("familiarity pass")),
                    _cell(passes.get("Hessian pass")) if n_classes == 2 else "—",
                    f"{hessian_flops / 1e12:.2f} TFLOP → {hessian_flops / gflops / 1e9:.3g}"
                    if n_classes == 2
                    else "—",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "n",
                    "mode",
                    "round trip",
                    "gradient pass",
                    "HVP pass",
                    "score pass",
                    "score pass floor (bytes read at the bandwidth)",
                    "familiarity pass (same floor)",
                    "Hessian pass",
                    "Hessian floor (FLOPs at the GEMM speed)",
                ],
                table,
            )
        )
        lines.append("")
    lines.append(
        f"Every measurement (seconds, peak GiB, load average per stage): [{args.out}.json]({args.out}.json)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="60000,120000,300000,600000")
    parser.add_argument("--modes", default="in-process,1,2")
    parser.add_argument("--classes", default="2,10")
    parser.add_argument("--full-up-to", type=int, default=120_000)
    parser.add_argument("--full-classes", default="2", help="classes whose full stages run")
    parser.add_argument("--budget", type=float, default=2400.0)
    parser.add_argument(
        "--solver", choices=("exact", "cg"), default="exact", help="the 10-class solver"
    )
    parser.add_argument("--skip", default="in-process@600000", help="mode@n pairs not run")
    parser.add_argument("--out", default="scale_cluster")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    classes = [int(c) for c in args.classes.split(",")]
    full_classes = {int(c) for c in args.full_classes.split(",") if c}
    skip = {tuple(s.split("@")) for s in args.skip.split(",") if s}
    machine = measure_machine()
    print(machine, flush=True)
    records_path = RESULTS_DIR / f"{args.out}.json"
    records: list[dict[str, Any]] = []
    for n_classes in classes:
        for n in sizes:
            for mode in modes:
                if (mode, str(n)) in skip:
                    continue
                full = n <= args.full_up_to and n_classes in full_classes
                label = (
                    "in-process"
                    if mode == "in-process"
                    else f"{mode} worker{'s' if mode != '1' else ''}"
                )
                print(
                    f"{n_classes} classes, n = {n}, {label}{' (full)' if full else ''}", flush=True
                )
                cfg = Config(n, n_classes, label, args.budget, full, args.solver)
                load_before = os.getloadavg()[0]
                try:
                    if mode == "in-process":
                        run_in_process(cfg)
                    else:
                        run_cluster(cfg, int(mode))
                except Exception as error:  # a failed configuration is a result too
                    cfg.notes.append(f"failed: {type(error).__name__}: {error}")
                    print("  failed:", error, flush=True)
                records.append(
                    {
                        "classes": n_classes,
                        "n": n,
                        "mode": label,
                        "full": full,
                        "solver": "exact" if n_classes == 2 else args.solver,
                        "stages": cfg.stages,
                        "notes": cfg.notes,
                        "load_before": load_before,
                        "load_after": os.getloadavg()[0],
                    }
                )
                records_path.write_text(json.dumps(records, indent=1, default=float))
    body = report(records, machine, args)
    path = write_results(
        args.out,
        "Scale on a Dask cluster: in-process against 1 and 2 local workers",
        body,
        module="scale_cluster",
    )
    print(path)


if __name__ == "__main__":
    main()
