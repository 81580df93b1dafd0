"""Xᵀ T for a tall X and a thin T, as ``X.T @ T`` and as ``(T.T @ X).T``: why
:func:`core.linalg.t_times` picks the second for 2 to :data:`~core.linalg.THIN_COLUMNS` columns;
and X V for a thin V, as ``X @ V`` and as ``(V.T @ X.T).T``: why :func:`core.linalg.times_thin`
takes the second (the training features against an explanation's solutions); and Xᵀ m(X V)
as those two whole products against :func:`core.linalg.through_rows`'s blocks of rows (the
Hessian-vector products of fitting).

Usage: ``python -m bench.thin_products [--n 48000] [--d 1280] [--columns 1,2,5,10,16,30,100]
[--through-rows 128,256,512,1024,4096]``

Best of 3 per form and column count, float64, this process's threads; the load average is
printed beside each row (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from core.linalg import THIN_COLUMNS, t_times, through_rows, times_thin


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
    parser.add_argument("--through-rows", default="128,256,512,1024,4096")
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
    # Xᵀ m(X V), a Hessian-vector product of fitting (m: a row-wise scaling standing in for
    # the loss's curvature): two whole products (X read twice from memory) against
    # through_rows's blocks of rows (each read once, kept in the cache for its second product).
    sizes = [int(r) for r in args.through_rows.split(",")]
    print(f"columns | two products s | {' | '.join(f'{r} rows s' for r in sizes)} | load")
    weights = torch.rand(args.n, 1, dtype=torch.float64, generator=generator)

    def middle(start: int, stop: int, s: torch.Tensor) -> torch.Tensor:
        return s * weights[start:stop]

    for k in (int(c) for c in args.columns.split(",")):
        V = torch.randn(args.d, k, dtype=torch.float64, generator=generator)
        reference = t_times(X, times_thin(X, V) * weights)
        two = best_of(lambda V=V: t_times(X, times_thin(X, V) * weights))
        blocked = []
        for r in sizes:
            got = through_rows(X, V, middle, rows=r)
            assert float((got - reference).abs().max()) <= 1e-10 * float(reference.abs().max())
            blocked.append(best_of(lambda V=V, r=r: through_rows(X, V, middle, rows=r)))
        cells = " | ".join(f"{b:.3f}" for b in blocked)
        print(f"{k} | {two:.3f} | {cells} | {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
