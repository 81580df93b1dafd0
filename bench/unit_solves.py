"""How the exact solver in the class basis applies S' = (H' + δI)⁻¹: two triangular solves with
the factor, or a product with the inverse it keeps once the Newton-corrected forms have formed
it (in the factor's place, so no more memory).

Usage: ``python -m bench.unit_solves [--d 1280] [--classes 10] [--tests 1,4,16,64]
[--columns 1,9,50] [--repeats 5]``

A synthetic SPD matrix of the class basis's size (d·(C - 1) square). Two kinds of right-hand
side: a test point's C - 1 unit columns φ_t ⊗ e (an explanation, ``project_units``; one pass
over S' by rows, ``core.influence.inverse_times_units``), and k general columns (s_test for k
test gradients, a retrain's preconditioner for k retrains at once: ``inverse_hvp``). Writes
``bench/results/unit_solves.md``: median seconds of each way, the largest relative difference
between their columns, the machine's measured memory bandwidth and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.common import markdown_table, write_results
from core.influence import inverse_times_units, unit_columns
from core.linalg import cholesky_inverse, cholesky_solve, memory_bandwidth, times_thin


def median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def largest_gap(solved: torch.Tensor, read: torch.Tensor) -> float:
    return float(((solved - read).norm(dim=0) / solved.norm(dim=0)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--tests", default="1,4,16,64")
    parser.add_argument("--columns", default="1,9,50")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    h = args.classes - 1
    size = args.d * h
    load_before = os.getloadavg()[0]
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(size, 2000, dtype=torch.float64, generator=generator)
    matrix = spread @ spread.T / 2000
    matrix.diagonal().add_(0.5)
    del spread
    factor = torch.linalg.cholesky(matrix)
    inverse = cholesky_inverse(factor)  # as the engine keeps it (row-major, mirrored)
    del matrix
    bandwidth = memory_bandwidth()
    units = []
    for m in (int(t) for t in args.tests.split(",")):
        features = torch.randn(m, args.d, dtype=torch.float64, generator=generator)
        gap = largest_gap(
            cholesky_solve(factor, unit_columns(features, h)),
            inverse_times_units(inverse, features, h),
        )
        t_solve = median_seconds(
            lambda f=features: cholesky_solve(factor, unit_columns(f, h)), args.repeats
        )
        t_read = median_seconds(lambda f=features: inverse_times_units(inverse, f, h), args.repeats)
        units.append(
            [m, f"{t_solve:.3f}", f"{t_read:.3f}", f"{t_solve / t_read:.1f}x", f"{gap:.1e}"]
        )
    general = []
    for k in (int(c) for c in args.columns.split(",")):
        columns = torch.randn(size, k, dtype=torch.float64, generator=generator)
        # As core.models.solve_in_class_basis reads it: (vᵀS')ᵀ.
        gap = largest_gap(cholesky_solve(factor, columns), times_thin(inverse, columns))
        t_solve = median_seconds(lambda c=columns: cholesky_solve(factor, c), args.repeats)
        t_read = median_seconds(lambda c=columns: times_thin(inverse, c), args.repeats)
        # The read's floor: S' once from memory.
        floor = 8 * size * size / (bandwidth * 1e9)
        general.append(
            [
                k,
                f"{t_solve:.3f}",
                f"{t_read:.3f}",
                f"{t_solve / t_read:.1f}x",
                f"{floor:.3f}",
                f"{gap:.1e}",
            ]
        )
    body = (
        f"d = {args.d}, {args.classes} classes: S' is {size:,} square "
        f"({8 * size * size / 2**30:.2f} GiB); memory bandwidth {bandwidth:.1f} GB/s; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; medians of "
        f"{args.repeats}.\n\n"
        "### A test point's unit columns (an explanation)\n\n"
        + markdown_table(
            ["test points", "solves s", "inverse s", "ratio", "largest relative difference"], units
        )
        + "\n\n### k general columns (s_test, a retrain's preconditioner)\n\n"
        + markdown_table(
            [
                "columns",
                "solves s",
                "inverse s",
                "ratio",
                "S' read once at the bandwidth, s",
                "largest relative difference",
            ],
            general,
        )
        + "\n"
    )
    print(body)
    write_results("unit_solves", "Solving with the factor or reading the kept inverse", body)


if __name__ == "__main__":
    main()
