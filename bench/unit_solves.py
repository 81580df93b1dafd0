"""How an explanation in the class basis gets S'(φ_t ⊗ e): two triangular solves with the factor,
or one pass over the kept inverse (``core.influence.inverse_times_units``), for a few test
points at once.

Usage: ``python -m bench.unit_solves [--d 1280] [--classes 10] [--tests 1,4,16,64] [--repeats 5]``

A synthetic SPD matrix of the class basis's size (d·(C - 1) square, C - 1 of the d-wide unit
columns per test point); prints the median seconds of each way, the largest relative
difference between them, the machine's measured memory bandwidth and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from core.influence import inverse_times_units, unit_columns
from core.linalg import cholesky_inverse, cholesky_solve, memory_bandwidth


def median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--tests", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    h = args.classes - 1
    size = args.d * h
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(size, 2000, dtype=torch.float64, generator=generator)
    matrix = spread @ spread.T / 2000
    matrix.diagonal().add_(0.5)
    del spread
    factor = torch.linalg.cholesky(matrix)
    inverse = cholesky_inverse(factor)  # as the engine keeps it (row-major, mirrored)
    del matrix
    print(
        f"d = {args.d}, {args.classes} classes: S' is {size:,} square "
        f"({8 * size * size / 2**30:.2f} GiB); memory bandwidth "
        f"{memory_bandwidth():.1f} GB/s; load average {os.getloadavg()[0]:.1f}"
    )
    print("| test points | solves s | inverse s | ratio | largest relative difference |")
    print("|---|---|---|---|---|")
    for m in (int(t) for t in args.tests.split(",")):
        features = torch.randn(m, args.d, dtype=torch.float64, generator=generator)
        solved = cholesky_solve(factor, unit_columns(features, h))
        read = inverse_times_units(inverse, features, h)
        gap = float(((solved - read).norm(dim=0) / solved.norm(dim=0)).max())
        t_solve = median_seconds(
            lambda f=features: cholesky_solve(factor, unit_columns(f, h)), args.repeats
        )
        t_read = median_seconds(lambda f=features: inverse_times_units(inverse, f, h), args.repeats)
        print(f"| {m} | {t_solve:.3f} | {t_read:.3f} | {t_solve / t_read:.1f}x | {gap:.1e} |")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
