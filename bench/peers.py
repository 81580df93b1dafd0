"""Our influence engine against the libraries people would use instead, on the same problem.

Usage: ``python -m bench.peers [--repeats 3] [--large-n 5000] [--methods a,b] [--timeout 600]``

Problems (binary logistic regression, no intercept, float64, θ̂ from our Newton fit to
‖∇R‖ ≤ 1e-10, the peers get the same θ̂ as a state dict):

- **demo**: the bundled demo's default pair with the explainer's own features (EfficientNet-Lite0,
  1280-d), n = 1000, λ as the explainer chose it by cross-validation; 100 test images (seeded).
- **synthetic**: the same shape with more rows: n = ``--large-n`` points in 1280-d drawn from a
  Gaussian per class with the demo features' class means and pooled covariance; same λ.

Every method computes the influence of every training point on the 100 test losses (true labels).
Each run is its own child process (same process group), so it starts with the problem loaded and
a warm-up on a small slice done, and its peak resident memory (VmHWM after a reset) is its own;
rounds alternate the order of the methods. Reported: median wall time, peak memory above the loaded
problem, maximum relative error against our exact first-order scores (max |peer - ours| over a test
point's row, divided by that row's max |ours|, worst row), and leave-one-out Pearson over each
method's own top 50 (by |score|) for a few test points, retrained exactly by our Newton solver.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from bench.common import (
    current_rss_bytes,
    markdown_table,
    peak_rss_bytes,
    reset_peak_rss,
    run_child,
    write_results,
)

#: Methods not run on the larger problem, and why (their demo rows show what they cost).
SKIP_ON_LARGER = {
    "captum-arnoldi-default": "about 40 s on the demo, not accurate",
    "captum-arnoldi-full": "over 200 s on the demo, not accurate",
    "pydvl-arnoldi": "about 90 s on the demo",
    "dattri-cg": "about 70 s and 1 GiB on the demo",
    "dattri-lissa": "ran out of memory on the demo (killed at 19.7 GB resident)",
}

#: Methods not run at all, and why (their earlier runs are recorded in bench/RESULTS.md's notes).
SKIP_ALWAYS = {
    "dattri-lissa": (
        "float32 throughout, so it cannot reach an error below 1e-6; on the demo one run was "
        "killed at 19.7 GB resident, the next did not finish in 600 s"
    ),
}

#: Short names of our methods in the FLOP-limit tables.
METHOD_LABELS = {
    "ours-exact": "ours exact, first order",
    "ours-exact-primal": "ours exact, primal form forced, first order",
    "ours-exact-corrected": "ours exact, Newton-corrected",
}

# A run slower than this is not repeated (its single time is reported as such).
REPEAT_ONLY_UNDER_SECONDS = 30.0


@dataclass
class Problem:
    name: str
    description: str
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    theta: np.ndarray
    l2: float

    def save(self, path: Path, hints: dict[str, float]) -> None:
        np.savez(
            path,
            X=self.X,
            y=self.y,
            X_test=self.X_test,
            y_test=self.y_test,
            theta=self.theta,
            l2=self.l2,
            hints=json.dumps(hints),
        )


def demo_problem(n_test: int, seed: int) -> tuple[Problem, object]:
    from core.data import load_demo
    from core.explainer import Explainer

    explainer = Explainer(load_demo()).prepare()
    fitted = explainer.models["logreg"]
    model = fitted.model
    rows = np.sort(np.random.default_rng(seed).choice(explainer.n_test, n_test, replace=False))
    problem = Problem(
        name="demo",
        description=(
            f"bundled demo, {explainer.class_names[0]} vs {explainer.class_names[1]}: "
            f"{fitted.features_label}, n = {model.n_train_}, λ = {model.l2:g} (chosen by the "
            f"explainer's 3-fold CV), {n_test} test images"
        ),
        X=model.features_.numpy(),
        y=model.labels_.numpy(),
        X_test=fitted.test_inputs[rows].numpy(),
        y_test=explainer.test_labels[rows],
        theta=model.theta_.numpy(),
        l2=float(model.l2),
    )
    return problem, model


def synthetic_problem(demo: Problem, n: int, n_test: int, seed: int) -> tuple[Problem, object]:
    from core.models import LogisticRegression

    rng = np.random.default_rng(seed)
    X, y = demo.X, demo.y
    means = np.stack([X[y == c].mean(0) for c in (0, 1)])
    centred = X - means[y]
    cov = centred.T @ centred / (len(X) - 2)
    # The demo covariance has rank <= n - 2 < d; a small ridge makes it a proper Gaussian.
    cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))
    chol = np.linalg.cholesky(cov)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, count)
        return means[labels] + rng.standard_normal((count, len(cov))) @ chol.T, labels

    X_train, y_train = draw(n)
    X_test, y_test = draw(n_test)
    model = LogisticRegression(l2=demo.l2).fit(X_train, y_train)
    problem = Problem(
        name="synthetic",
        description=(
            f"synthetic, same shape: n = {n} Gaussian points in {X.shape[1]}-d (the demo "
            f"features' class means and pooled covariance), λ = {demo.l2:g}, {n_test} test points; "
            f"test accuracy {model.accuracy(X_test, y_test):.3f}"
        ),
        X=X_train,
        y=y_train,
        X_test=X_test,
        y_test=y_test,
        theta=model.theta_.numpy(),
        l2=demo.l2,
    )
    return problem, model


# ----------------------------------------------------------------------------- worker
def worker(key: str, problem_path: str, out_path: str) -> None:
    """Run one method once in this process and print its time and peak memory as JSON."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from bench import peer_methods

    if key in SKIP_ALWAYS:
        print(f"skipped: {SKIP_ALWAYS[key]}", file=sys.stderr)
        sys.exit(3)
    if Path(problem_path).stem != "demo" and key in SKIP_ON_LARGER:
        print(
            f"skipped on the larger problem to keep the run under an hour: {SKIP_ON_LARGER[key]}",
            file=sys.stderr,
        )
        sys.exit(3)
    data = np.load(problem_path)
    peer_methods.HINTS.update(json.loads(str(data["hints"])))
    X = torch.as_tensor(data["X"])
    y = torch.as_tensor(data["y"])
    Xt = torch.as_tensor(data["X_test"])
    yt = torch.as_tensor(data["y_test"])
    theta = torch.as_tensor(data["theta"])
    l2 = float(data["l2"])
    method = peer_methods.METHODS_BY_KEY[key]
    # Warm-up on a small slice (200 points, 4 tests, the first 32 features): imports, lazy
    # initialisation and first-call costs of the library, without paying for a full-size run.
    method.run(X[:200, :32], y[:200], Xt[:4, :32], yt[:4], theta[:32], l2)
    gc.collect()
    reset_peak_rss()
    baseline = current_rss_bytes()
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    scores = method.run(X, y, Xt, yt, theta, l2)
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_start
    peak = peak_rss_bytes()
    np.save(out_path, np.asarray(scores, dtype=np.float64))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_bytes": peak - baseline,
                "baseline": baseline,
                "stages": peer_methods.LAST_STAGES,
            }
        )
    )


def _cpu_seconds() -> float:
    """CPU time of this process so far, every thread (user + system): on a shared machine it
    grows with the work done, not with the time other processes take the cores away."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(key: str, problem_path: Path, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as handle:
        out = handle.name
    done, error = run_child(["bench.peers", "--worker", key, str(problem_path), out], timeout)
    if error is not None:
        if done is None:
            return {"error": error}
        return {"error": f"{'not run' if done.returncode == 3 else 'failed'}: {error}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["scores"] = np.load(out)
    os.unlink(out)
    return result


# ----------------------------------------------------------------------------- metrics
def max_relative_error(scores: np.ndarray, reference: np.ndarray) -> float:
    scale = np.abs(reference).max(axis=1)
    return float((np.abs(scores - reference).max(axis=1) / scale).max())


def median_spearman(scores: np.ndarray, reference: np.ndarray) -> float:
    return float(
        np.median([stats.spearmanr(a, b).statistic for a, b in zip(scores, reference, strict=True)])
    )


def loo_pearsons(
    model, problem: Problem, results: dict[str, np.ndarray], tests: np.ndarray, k: int
) -> dict[str, list[float]]:
    """Pearson of each method's scores with actual leave-one-out changes, over its own top k."""
    from core.influence import ExactSolver
    from core.validation import loo_retrain

    chosen = {
        key: [np.argsort(-np.abs(scores[t]), kind="stable")[:k] for t in tests]
        for key, scores in results.items()
    }
    union = np.unique(np.concatenate([np.concatenate(v) for v in chosen.values()]))
    retrained = loo_retrain(
        model,
        union,
        problem.X_test[tests],
        problem.y_test[tests],
        preconditioner=ExactSolver(model).inverse_hvp,
    )
    row = {int(j): i for i, j in enumerate(union)}
    out = {}
    for key, per_test in chosen.items():
        values = []
        for position, (t, indices) in enumerate(zip(tests, per_test, strict=True)):
            actual = retrained.actual[[row[int(j)] for j in indices], position]
            values.append(float(np.corrcoef(results[key][t, indices], actual)[0, 1]))
        out[key] = values
    return out


# ----------------------------------------------------------------------------- driver
def benchmark(problem: Problem, model, methods, args, workdir: Path) -> tuple[str, dict]:
    from core.influence import CGSolver, InfluenceEngine
    from core.linalg import gemm_rate, memory_bandwidth

    # The machine's limits now, in this run: what every dense step of ours is set against.
    limits = {"gemm_gflops": gemm_rate(), "bandwidth_gbs": memory_bandwidth()}
    engine = InfluenceEngine(model)
    reference = engine.influence_scores(problem.X_test, problem.y_test, estimate="first_order")
    cg = CGSolver(model, tol=1e-10)
    cg.inverse_hvp(engine.test_gradients(problem.X_test, problem.y_test).T)
    hints = {"cg_iterations": cg.last_iterations}
    path = workdir / f"{problem.name}.npz"
    problem.save(path, hints)

    times: dict[str, list[float]] = {m.key: [] for m in methods}
    cpu: dict[str, list[float]] = {m.key: [] for m in methods}
    peaks: dict[str, list[float]] = {m.key: [] for m in methods}
    stages: dict[str, list[list[dict]]] = {m.key: [] for m in methods}
    scores: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    for repeat in range(args.repeats):
        order = methods if repeat % 2 == 0 else methods[::-1]
        for method in order:
            if method.key in errors:
                continue
            if times[method.key] and times[method.key][0] > REPEAT_ONLY_UNDER_SECONDS:
                continue
            result = run_worker(method.key, path, args.timeout)
            if "error" in result:
                errors[method.key] = result["error"]
                print(f"[{problem.name}] {method.key}: {result['error']}", flush=True)
                continue
            times[method.key].append(result["seconds"])
            cpu[method.key].append(result["cpu_seconds"])
            peaks[method.key].append(result["peak_bytes"])
            if result.get("stages"):
                stages[method.key].append(result["stages"])
            scores.setdefault(method.key, result["scores"])
            print(
                f"[{problem.name}] round {repeat + 1} {method.key}: {result['seconds']:.3f} s "
                f"(CPU {result['cpu_seconds']:.3f} s), peak +{result['peak_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )

    tests = np.arange(min(args.loo_tests, len(problem.y_test)))
    pearsons = loo_pearsons(model, problem, scores, tests, args.k) if scores else {}
    ours_time = statistics.median(times["ours-exact"]) if times.get("ours-exact") else None
    ours_cpu = statistics.median(cpu["ours-exact"]) if cpu.get("ours-exact") else None

    rows = []
    summary = {}
    for method in methods:
        key = method.key
        if key not in scores:
            rows.append(
                [method.library, method.label, method.quantity, errors.get(key, "not run")]
                + [""] * 8
            )
            continue
        seconds = statistics.median(times[key])
        error = max_relative_error(scores[key], reference)
        spearman = median_spearman(scores[key], reference)
        pearson = pearsons.get(key, [])
        ratio = seconds / ours_time if ours_time else float("nan")
        cpu_seconds = statistics.median(cpu[key])
        cpu_ratio = cpu_seconds / ours_cpu if ours_cpu else float("nan")
        summary[key] = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "cpu_ratio": cpu_ratio,
            "runs": len(times[key]),
            "error": error,
            "ratio": ratio,
            "peak_mib": statistics.median(peaks[key]) / 2**20,
            "loo_pearson": pearson,
        }
        error_cell = "(other quantity)" if method.quantity != "first order" else f"{error:.1e}"
        rows.append(
            [
                method.library,
                method.label,
                method.quantity,
                f"{seconds:.3g}" + ("" if len(times[key]) > 1 else " (1 run)"),
                f"{ratio:.3g}x",
                f"{cpu_seconds:.3g}",
                f"{cpu_ratio:.3g}x",
                f"{statistics.median(peaks[key]) / 2**20:.0f}",
                error_cell,
                f"{spearman:.4f}",
                " / ".join(f"{p:.3f}" for p in pearson),
            ]
        )
    headers = [
        "library",
        "method and settings",
        "quantity",
        "time s (median)",
        "time / ours exact",
        "CPU s (median)",
        "CPU / ours exact",
        "peak MiB",
        "max rel. error vs ours exact",
        "Spearman vs ours exact (median row)",
        f"LOO Pearson, own top {args.k}, test points {', '.join(str(int(t)) for t in tests)}",
    ]
    limits_after = {"gemm_gflops": gemm_rate(), "bandwidth_gbs": memory_bandwidth()}
    text = f"### {problem.description}\n\n" + markdown_table(headers, rows) + "\n"
    text += (
        f"\nMachine limits measured in this run, before and after this problem's methods: float64 "
        f"GEMM {limits['gemm_gflops']:.0f} and {limits_after['gemm_gflops']:.0f} GFLOP/s "
        f"(`core.linalg.gemm_rate`), memory bandwidth {limits['bandwidth_gbs']:.1f} and "
        f"{limits_after['bandwidth_gbs']:.1f} GB/s (`core.linalg.memory_bandwidth`, a 256 MiB "
        "copy). The limit of each step below uses the better of the two.\n"
    )
    best = {k: max(limits[k], limits_after[k]) for k in limits}
    for key in ("ours-exact", "ours-exact-primal", "ours-exact-corrected"):
        if stages.get(key) and key in summary:
            table, limit = flop_limit_table(
                stages[key], times[key], best, problem, METHOD_LABELS.get(key, key)
            )
            summary[key]["limit_seconds"] = limit
            summary[key]["stages"] = stage_summary(stages[key])
            text += "\n" + table
    summary["_limits"] = best
    if "ours-exact" in summary and summary["ours-exact"].get("stages"):
        text += "\n" + kernel_section(path, summary, best, args.timeout)
    return text, summary


def kernel_section(path: Path, summary: dict, limits: dict, timeout: float) -> str:
    """Our steps against the libraries' own kernels for their shapes (:mod:`bench.kernel_limits`),
    and what the goal's ratio would be with every step at its fastest kernel."""
    from bench import kernel_limits

    result = kernel_limits.run(path, timeout)
    if "error" in result:
        return f"Kernels for these shapes not measured: {result['error']}\n"
    fastest = _fastest_accurate(summary)
    peer = (fastest, summary[fastest]["seconds"]) if fastest else None
    text, bound = kernel_limits.table(result, summary["ours-exact"]["stages"], limits, peer)
    summary["ours-exact"]["kernel_bound_seconds"] = bound
    summary["ours-exact"]["warm_seconds"] = result["total_ms"] / 1e3
    return text


def stage_summary(runs: list[list[dict]]) -> list[dict]:
    """Each step's median time over the runs, with its flops and bytes (the same every run)."""
    return [
        {**run_stages[0], "seconds": statistics.median(s["seconds"] for s in run_stages)}
        for run_stages in zip(*runs, strict=True)
    ]


def flop_limit_table(
    runs: list[list[dict]], totals: list[float], limits: dict, problem: Problem, label: str
) -> tuple[str, float]:
    """Every dense step of one of our methods next to the least time the machine allows for it:
    its flops at the measured GEMM rate or its bytes at the measured bandwidth, whichever is
    longer. Returns the Markdown and the total of the limits (seconds)."""
    gemm, bandwidth = limits["gemm_gflops"] * 1e9, limits["bandwidth_gbs"] * 1e9
    rows = []
    limit_total = 0.0
    measured_dense = 0.0
    for stage in stage_summary(runs):
        compute, memory = stage["flops"] / gemm, stage["bytes"] / bandwidth
        limit = max(compute, memory)
        limit_total += limit
        measured_dense += stage["seconds"]
        rows.append(
            [
                stage["name"],
                f"{stage['flops'] / 1e9:.3g}",
                f"{stage['bytes'] / 1e6:.3g}",
                f"{stage['seconds'] * 1e3:.1f}",
                f"{compute * 1e3:.1f}",
                f"{memory * 1e3:.1f}",
                "FLOPs" if compute >= memory else "memory",
                f"{stage['seconds'] / limit:.1f}x" if limit > 0 else "",
            ]
        )
    total = statistics.median(totals)
    # What is not a dense step: the fit at θ̂ (a finiteness check of X and the loss derivatives,
    # O(n·d)), the test points' features and derivatives, forming the (m, n) scores. Its floor
    # is reading X twice and writing the scores once.
    n, d = problem.X.shape
    m = problem.X_test.shape[0]
    rest_bytes = 8 * (2 * n * d + 2 * m * n)
    rest_limit = rest_bytes / bandwidth
    limit_total += rest_limit
    rest = total - measured_dense
    rows.append(
        [
            "rest: fit at θ̂ (finiteness check, loss derivatives), test features, forming scores",
            "",
            f"{rest_bytes / 1e6:.3g}",
            f"{rest * 1e3:.1f}",
            "",
            f"{rest_limit * 1e3:.1f}",
            "memory",
            f"{rest / rest_limit:.1f}x",
        ]
    )
    rows.append(
        [
            "**total**",
            "",
            "",
            f"**{total * 1e3:.1f}**",
            "",
            "",
            "",
            f"**{total / limit_total:.1f}x** (limit {limit_total * 1e3:.1f} ms)",
        ]
    )
    headers = [
        "step",
        "GFLOP",
        "MB moved (least)",
        "measured ms (median)",
        "at GEMM rate ms",
        "at bandwidth ms",
        "bound by",
        "measured / limit",
    ]
    text = (
        f"FLOP limit of **{label}** ({len(runs)} runs; each dense step timed inside the solver, "
        "`core.linalg.StageCost`; 'limit' = the longer of the GEMM-rate and bandwidth times):\n\n"
        + markdown_table(headers, rows)
        + "\n"
    )
    return text, limit_total


def _peers(summary: dict) -> dict[str, dict]:
    return {k: v for k, v in summary.items() if not k.startswith(("ours", "_"))}


def _fastest_accurate(summary: dict) -> str | None:
    accurate = {k: v for k, v in _peers(summary).items() if v["error"] < 1e-6}
    return min(accurate, key=lambda k: accurate[k]["seconds"]) if accurate else None


def headline(summary: dict, problem: str) -> str:
    ours = summary.get("ours-exact")
    if not ours:
        return ""
    lines = [f"**{problem}**: ours exact {ours['seconds']:.3g} s."]
    fastest = _fastest_accurate(summary)
    if fastest:
        ratio = summary[fastest]["ratio"]
        verdict = "met" if ratio >= 10 else "missed"
        lines.append(
            f"Fastest peer at equal accuracy (error < 1e-6): {fastest}, "
            f"{summary[fastest]['seconds']:.3g} s = {ratio:.3g}x ours (goal >= 10x: {verdict})."
        )
    else:
        lines.append("No peer reached a relative error below 1e-6.")
    inexact = {k: v for k, v in _peers(summary).items() if v["error"] >= 1e-6}
    if inexact:
        fastest_inexact = min(inexact, key=lambda key: inexact[key]["seconds"])
        lines.append(
            f"Fastest less accurate peer: {fastest_inexact}, {inexact[fastest_inexact]['ratio']:.3g}x "
            f"ours, with error {inexact[fastest_inexact]['error']:.2g}."
        )
    return " ".join(lines)


def side_by_side(summaries: dict[str, dict]) -> str:
    """The goal on every problem in one table: ours, its FLOP limit, the fastest accurate peer."""
    names = list(summaries)
    rows: list[list[str]] = []

    def row(label: str, cell) -> None:
        rows.append([label] + [cell(summaries[name]) for name in names])

    def ours(summary: dict, field: str, fmt: str = "{:.3g}") -> str:
        value = summary.get("ours-exact", {}).get(field)
        return fmt.format(value) if value is not None else "n/a"

    def peer_cell(summary: dict) -> str:
        fastest = _fastest_accurate(summary)
        if not fastest:
            return "none below 1e-6"
        return f"{fastest}, {summary[fastest]['seconds']:.3g} s"

    def ratio_cell(summary: dict) -> str:
        fastest = _fastest_accurate(summary)
        if not fastest:
            return "n/a"
        ratio = summary[fastest]["ratio"]
        return f"**{ratio:.3g}x** ({'met' if ratio >= 10 else 'missed'})"

    def bound_ratio_cell(summary: dict) -> str:
        fastest = _fastest_accurate(summary)
        bound = summary.get("ours-exact", {}).get("kernel_bound_seconds")
        if not fastest or not bound:
            return "n/a"
        return f"{summary[fastest]['seconds'] / bound:.3g}x"

    def worst_stage(summary: dict) -> str:
        stages = summary.get("ours-exact", {}).get("stages")
        if not stages:
            return "n/a"
        limits = summary["_limits"]
        gemm, bandwidth = limits["gemm_gflops"] * 1e9, limits["bandwidth_gbs"] * 1e9

        def over(stage: dict) -> float:
            return stage["seconds"] - max(stage["flops"] / gemm, stage["bytes"] / bandwidth)

        stage = max(stages, key=over)
        limit = max(stage["flops"] / gemm, stage["bytes"] / bandwidth)
        return (
            f"{stage['name']}: {stage['seconds'] * 1e3:.1f} ms, "
            f"{stage['seconds'] / limit:.1f}x its limit"
        )

    row("ours exact, first order: s (median)", lambda s: ours(s, "seconds"))
    row(
        "its limit: every step at the measured GEMM rate or bandwidth, s",
        lambda s: ours(s, "limit_seconds"),
    )
    row(
        "ours / its limit",
        lambda s: (
            f"{s['ours-exact']['seconds'] / s['ours-exact']['limit_seconds']:.1f}x"
            if s.get("ours-exact", {}).get("limit_seconds")
            else "n/a"
        ),
    )
    row("step furthest above its limit (ms over it)", worst_stage)
    row("fastest peer with error < 1e-6", peer_cell)
    row("that peer's time / ours (goal >= 10x)", ratio_cell)
    row(
        "that peer's CPU time / ours (both threads; what the load does not change)",
        lambda s: f"{s[_fastest_accurate(s)]['cpu_ratio']:.3g}x" if _fastest_accurate(s) else "n/a",
    )
    row("ours again, warm in one process (kernel comparison): s", lambda s: ours(s, "warm_seconds"))
    row(
        "the same with every step at the fastest library kernel for its shape, s",
        lambda s: ours(s, "kernel_bound_seconds"),
    )
    row("that peer's time / it (the most these kernels allow)", bound_ratio_cell)
    row(
        "machine: f64 GEMM GFLOP/s, bandwidth GB/s",
        lambda s: f"{s['_limits']['gemm_gflops']:.0f}, {s['_limits']['bandwidth_gbs']:.1f}",
    )
    return markdown_table(["", *names], rows) + "\n"


#: The module each peer library is imported as.
PEER_MODULES = {
    "captum": "captum",
    "pydvl": "pydvl",
    "dattri": "dattri",
    "kronfluence": "kronfluence",
}


def _peer_installed(library: str) -> bool:
    """Whether the peer behind a method's library label ("captum 0.9.0", "ours") is importable."""
    module = PEER_MODULES.get(library.split()[0])
    return module is None or importlib.util.find_spec(module) is not None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--large-n", type=int, default=5000)
    parser.add_argument("--loo-tests", type=int, default=3)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--methods", default=None, help="comma-separated keys (default: all)")
    parser.add_argument("--problems", default="demo,synthetic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bench.peer_methods import METHODS, METHODS_BY_KEY

    methods = (
        [METHODS_BY_KEY[k] for k in args.methods.split(",")] if args.methods else list(METHODS)
    )
    if "ours-exact" not in [m.key for m in methods]:
        methods.insert(0, METHODS_BY_KEY["ours-exact"])
    missing = sorted({m.library for m in methods if not _peer_installed(m.library)})
    if missing:
        sys.exit(
            f"bench.peers: {', '.join(missing)} not installed in this environment. The peers are "
            "benchmark-only and pyDVL 0.10 needs numpy < 2, so give them their own environment:\n"
            "  python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'\n"
            "  .venv-bench/bin/python -m bench.peers\n"
            "or time ours alone with --methods ours-exact,ours-exact-corrected,ours-cg."
        )
    load_before = os.getloadavg()
    sections, headlines = [], []
    summaries: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        demo, demo_model = demo_problem(args.tests, args.seed)
        problems = {"demo": (demo, demo_model)}
        if "synthetic" in args.problems:
            problems["synthetic"] = synthetic_problem(demo, args.large_n, args.tests, args.seed)
        for name in args.problems.split(","):
            problem, model = problems[name]
            text, summary = benchmark(problem, model, methods, args, Path(tmp))
            sections.append(text)
            headlines.append(headline(summary, problem.description.split(":")[0]))
            n_train = problem.X.shape[0]
            summaries[f"{name} (n = {n_train}, d = {problem.X.shape[1]})"] = summary
            print(text, flush=True)
    load_after = os.getloadavg()
    body = (
        __doc__.split("\n\n", 2)[2].strip()
        + "\n\n"
        + f"Load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1-minute). "
        + f"{args.repeats} rounds (runs over {REPEAT_ONLY_UNDER_SECONDS:.0f} s are not repeated).\n\n"
        + "## Headline\n\n"
        + side_by_side(summaries)
        + "\n"
        + "\n\n".join(h for h in headlines if h)
        + "\n\n## Results\n\n"
        + "\n".join(sections)
    )
    print(write_results("peers", "Influence engines compared", body))


if __name__ == "__main__":
    main()
