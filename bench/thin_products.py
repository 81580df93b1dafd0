"""Xᵀ T for a tall X and a thin T, as ``X.T @ T`` and as ``(T.T @ X).T``: why
:func:`core.linalg.t_times` picks the second for 2 to :data:`~core.linalg.THIN_COLUMNS` columns;
and X V for a thin V, as ``X @ V`` and as ``(V.T @ X.T).T``: why :func:`core.linalg.times_thin`
takes the second (the training features against an explanation's solutions).

Usage: ``python -m bench.thin_products [--n 48000] [--d 1280] [--columns 1,2,5,10,16,30,100]``

Best of 3 per form and column count, float64, this process's threads; the load average is
printed beside each row (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from core.linalg import THIN_COLUMNS, t_times, times_thin


def best_of(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48_000)
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--columns", default="1,2,5,10,16,30,100")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(args.n, args.d, dtype=torch.float64, generator=generator)
    print(
        f"n = {args.n}, d = {args.d}, {torch.get_num_threads()} threads, THIN_COLUMNS = "
        f"{THIN_COLUMNS}"
    )
    print("columns | X.T @ T s | (T.T @ X).T s | t_times s | load")
    for k in (int(c) for c in args.columns.split(",")):
        T = torch.randn(args.n, k, dtype=torch.float64, generator=generator)
        plain = best_of(lambda T=T: X.T @ T)
        swapped = best_of(lambda T=T: (T.T @ X).T)
        chosen = best_of(lambda T=T: t_times(X, T))
        print(f"{k} | {plain:.3f} | {swapped:.3f} | {chosen:.3f} | {os.getloadavg()[0]:.1f}")
    print("columns | X @ V s | (V.T @ X.T).T s | times_thin s | load")
    for k in (int(c) for c in args.columns.split(",")):
        V = torch.randn(args.d, k, dtype=torch.float64, generator=generator)
        plain = best_of(lambda V=V: X @ V)
        swapped = best_of(lambda V=V: (V.T @ X.T).T)
        chosen = best_of(lambda V=V: times_thin(X, V))
        print(f"{k} | {plain:.3f} | {swapped:.3f} | {chosen:.3f} | {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
