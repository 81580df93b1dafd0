"""Each dense step of our exact first-order path against the fastest library kernel for its shape.

`python -m bench.peers` sets every step against the machine's large-matrix GEMM rate and memory
bandwidth. Small matrices on two cores do not reach that rate in any library, so this sets each
step against what the libraries on this machine actually do for the same shapes, each kernel
timed alone: torch's (MKL) and scipy's (OpenBLAS, which has a true syrk). A step near its
fastest kernel wastes nothing of ours; what remains above the FLOP limit is the kernels'.

Run by `bench.peers` in a child process of its own, on the problem file it writes:

    python -m bench.kernel_limits PROBLEM.npz OUT.json

Everything is warm, medians of ``REPEATS`` rounds: in each, ours end to end, then every kernel
with inputs of the problem's shapes (random values: these kernels' times do not depend on them).
OpenBLAS's threads spin for a while after each of its calls, so every OpenBLAS kernel is followed
by a pause of ``SETTLE`` before the next one is timed.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import markdown_table, run_child

REPEATS = 15

#: Seconds to wait after an OpenBLAS kernel: its threads spin for about a tenth of a second
#: after each call (OPENBLAS_THREAD_TIMEOUT's default, 2^28 cycles) and would slow the next one.
SETTLE = 0.3

DUAL = {
    "gram": "Gram matrix ΦΦᵀ (n x n), lower triangle",
    "matrix": "dual matrix M = λ'I + UᵀU",
    "factor": "Cholesky factor of M (n·r x n·r)",
    "solves": "triangular solves with M",
    "back": "Gram matrix times weights",
}
PRIMAL = {
    "gram": "Hessian H, symmetric rank-k updates",
    "factor": "Cholesky factor of H (p x p)",
    "solves": "triangular solves with L",
}
PRODUCT = "training features times vectors"


@dataclass(frozen=True)
class Kernel:
    step: str  # the step's name in the solver's log
    label: str
    run: Callable[[], object]
    openblas: bool = False
    #: Its output as the whole result the step needs (tests check it against ``expected``).
    full: Callable[[object], np.ndarray] = np.asarray


def _symmetric_from_upper(out: object) -> np.ndarray:
    upper = np.triu(np.asarray(out))
    return upper + np.triu(upper, 1).T


def _lower_factor(out: object) -> np.ndarray:
    return np.tril(np.asarray(out[0]))  # (factor, info), from torch and LAPACK alike


def spd(size: int, generator: torch.Generator) -> torch.Tensor:
    """A well-conditioned symmetric positive definite matrix of ``size``."""
    a = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return a @ a.T / size + torch.eye(size, dtype=torch.float64)


def _dual_matrix(a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """diag(a) G diag(a) + λ'I, as the dual form forms it (λ' = 0.1)."""
    out = torch.outer(a, a).mul_(gram)
    out.diagonal().add_(0.1)
    return out


def kernels(n: int, d: int, m: int) -> tuple[list[Kernel], dict[str, Callable[[], object]]]:
    """The library kernels for each step of our exact first-order path at these shapes, and
    for each step what its kernels must compute (for the tests: a kernel that computed something
    else would make the comparison meaningless)."""
    from scipy.linalg import blas, lapack

    from core.linalg import row_gram, weighted_gram

    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    vectors = torch.randn(d, m, generator=g, dtype=torch.float64)
    # numpy views of the same memory; .T of a C-ordered array is Fortran-ordered, which scipy
    # hands to BLAS without a copy.
    rows = features.numpy()
    dual = n < d
    names = DUAL if dual else PRIMAL
    size = n if dual else d
    matrix = spd(size, g)
    factor = torch.linalg.cholesky(matrix)
    lapack_matrix = np.asfortranarray(matrix.numpy())
    columns = torch.randn(size, m, generator=g, dtype=torch.float64)
    out = [
        Kernel(
            names["factor"],
            "torch (MKL potrf)",
            lambda: torch.linalg.cholesky_ex(matrix),
            full=_lower_factor,
        ),
        Kernel(
            names["factor"],
            "OpenBLAS potrf (scipy)",
            lambda: lapack.dpotrf(lapack_matrix, lower=1, clean=0),
            openblas=True,
            full=_lower_factor,
        ),
        Kernel(
            names["solves"],
            "torch (two MKL trsm)",
            lambda: torch.linalg.solve_triangular(
                factor.mT, torch.linalg.solve_triangular(factor, columns, upper=False), upper=True
            ),
        ),
        Kernel(PRODUCT, "torch (one GEMM)", lambda: features @ vectors),
    ]
    if dual:
        a = torch.rand(n, generator=g, dtype=torch.float64)
        out += [
            Kernel(names["gram"], "torch, our strips alone (row_gram)", lambda: row_gram(features)),
            Kernel(
                names["gram"], "torch, the full product (one GEMM)", lambda: features @ features.T
            ),
            Kernel(
                names["gram"],
                "OpenBLAS syrk (scipy dsyrk)",
                lambda: blas.dsyrk(1.0, rows.T, trans=1),
                openblas=True,
                full=_symmetric_from_upper,
            ),
            Kernel(
                names["matrix"],
                "torch, the same elementwise product",
                lambda: _dual_matrix(a, matrix),
            ),
            Kernel(names["back"], "torch (one GEMM)", lambda: matrix @ columns),
        ]
        expected = {
            names["gram"]: lambda: features @ features.T,
            names["matrix"]: lambda: (
                a[:, None] * matrix * a[None, :] + 0.1 * torch.eye(n, dtype=torch.float64)
            ),
            names["back"]: lambda: matrix @ columns,
        }
    else:
        root = weights.sqrt().numpy()
        out += [
            Kernel(
                names["gram"],
                "torch, our strips alone (weighted_gram)",
                lambda: weighted_gram(features, weights),
            ),
            Kernel(
                names["gram"],
                "torch, the full product (one GEMM)",
                lambda: (features * weights[:, None]).T @ features,
            ),
            Kernel(
                names["gram"],
                "OpenBLAS syrk of the weighted rows (scipy dsyrk)",
                lambda: blas.dsyrk(1.0, (rows * root[:, None]).T),
                openblas=True,
                full=_symmetric_from_upper,
            ),
        ]
        expected = {names["gram"]: lambda: features.T @ (features * weights[:, None])}
    expected[names["factor"]] = lambda: torch.linalg.cholesky(matrix)
    expected[names["solves"]] = lambda: torch.linalg.solve(matrix, columns)
    expected[PRODUCT] = lambda: features @ vectors
    return out, expected


def measure(data: np.lib.npyio.NpzFile) -> dict:
    """Ours end to end and every kernel, in ``REPEATS`` rounds that alternate their order (a
    change of the machine's speed during the run then touches all of them alike); medians, ms."""
    from bench import peer_methods

    ours = peer_methods.METHODS_BY_KEY["ours-exact"].run
    args = [data[k] for k in ("X", "y", "X_test", "y_test", "theta")] + [float(data["l2"])]
    n, d = data["X"].shape
    entries, _ = kernels(n, d, data["X_test"].shape[0])
    total: list[float] = []
    steps: dict[str, list[float]] = {}
    times: dict[tuple[str, str], list[float]] = {(k.step, k.label): [] for k in entries}

    def ours_once() -> None:
        start = time.perf_counter()
        ours(*args)
        total.append(time.perf_counter() - start)
        for stage in peer_methods.LAST_STAGES:
            steps.setdefault(stage["name"], []).append(stage["seconds"])

    for kernel in entries:  # warm-up
        kernel.run()
    ours(*args)
    time.sleep(SETTLE)
    for repeat in range(REPEATS):
        order = entries if repeat % 2 == 0 else entries[::-1]
        ours_once()
        for kernel in order:
            start = time.perf_counter()
            kernel.run()
            times[(kernel.step, kernel.label)].append(time.perf_counter() - start)
            if kernel.openblas:
                time.sleep(SETTLE)
    grouped: dict[str, dict[str, float]] = {}
    for (step, label), values in times.items():
        grouped.setdefault(step, {})[label] = statistics.median(values) * 1e3
    return {
        "total_ms": statistics.median(total) * 1e3,
        "steps_ms": {k: statistics.median(v) * 1e3 for k, v in steps.items()},
        "kernels_ms": grouped,
    }


def run(problem_path: Path, timeout: float) -> dict:
    """This module on ``problem_path`` in a child process; its JSON, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.json"
        _, error = run_child(["bench.kernel_limits", str(problem_path), str(out)], timeout)
        if error is not None:
            return {"error": error}
        return json.loads(out.read_text())


def table(
    result: dict, stages: list[dict], limits: dict, peer: tuple[str, float] | None
) -> tuple[str, float]:
    """The Markdown comparison, and our warm total with every step at its fastest kernel (s).

    Args:
        result: what :func:`main` wrote.
        stages: our steps with their flops and bytes (``bench.peers.stage_summary``).
        limits: the machine's GEMM rate and bandwidth in this run.
        peer: the fastest accurate peer's label and median time (s), if any.
    """
    gemm, bandwidth = limits["gemm_gflops"] * 1e9, limits["bandwidth_gbs"] * 1e9
    work = {stage["name"]: stage for stage in stages}
    rows = []
    saving = 0.0
    for name, ours in result["steps_ms"].items():
        alternatives = result["kernels_ms"].get(name, {})
        stage = work.get(name)
        limit = (
            max(stage["flops"] / gemm, stage["bytes"] / bandwidth) * 1e3 if stage else float("nan")
        )
        if alternatives:
            label, fastest = min(alternatives.items(), key=lambda item: item[1])
            saving += max(0.0, ours - fastest)
            others = "; ".join(f"{k} {v:.1f}" for k, v in alternatives.items() if k != label)
            rows.append(
                [
                    name,
                    f"{ours:.1f}",
                    f"{label}: {fastest:.1f}",
                    others or "",
                    f"{ours / fastest:.2f}x",
                    f"{limit:.1f}",
                    f"{fastest / limit:.1f}x",
                ]
            )
        else:
            rows.append([name, f"{ours:.1f}", "", "", "", f"{limit:.1f}", ""])
    total = result["total_ms"]
    bound = total - saving
    rows.append(
        [
            "**total, end to end**",
            f"**{total:.1f}**",
            f"every step at its fastest kernel: **{bound:.1f}**",
            "",
            f"{total / bound:.2f}x",
            "",
            "",
        ]
    )
    headers = [
        "step",
        "ours, warm ms (median)",
        "fastest kernel for this shape, alone: ms",
        "other kernels, ms",
        "ours / fastest kernel",
        "FLOP limit ms",
        "fastest kernel / FLOP limit",
    ]
    text = (
        f"Our steps against the libraries' kernels for the same shapes (`bench.kernel_limits`, "
        f"warm, medians of {REPEATS}, in a process of its own):\n\n"
        + markdown_table(headers, rows)
        + "\n"
    )
    if peer is not None:
        label, seconds = peer
        text += (
            f"\nWith every step at its fastest kernel our warm time would be {bound:.1f} ms, and "
            f"{label} ({seconds:.3g} s) {seconds * 1e3 / bound:.2f}x it: "
            + (
                "the 10x goal is out of reach of these kernels on this machine.\n"
                if seconds * 1e3 / bound < 10
                else "within reach of these kernels.\n"
            )
        )
    return text, bound / 1e3


def main() -> None:
    problem_path, out_path = sys.argv[1:3]
    result = measure(np.load(problem_path))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
