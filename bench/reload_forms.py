"""A preparation from a warm cache: which stages a new process repeats.

Usage: ``python -m bench.reload_forms CACHE_DIR`` — run it twice with the same (at first empty)
directory. It prepares the bundled demo with every class (n = 5,000, 10 classes) on the
stand-in features of :mod:`bench.full_fashion_mnist` and prints the preparation's time and the
engines' two dense stages: each model's Hessian and factor (always rebuilt) and the
Newton-corrected forms Q_j with self-influence (read from the cache by the second process).
"""

from __future__ import annotations

import os
import sys
import time

from bench.full_fashion_mnist import StageClock, register_stand_in


def main() -> None:
    from core.data import open_dataset
    from core.explainer import Explainer, ExplainerConfig
    from core.store import ArtifactStore

    dataset = open_dataset("demo")
    backbone = register_stand_in()
    clock = StageClock()
    start = time.perf_counter()
    config = ExplainerConfig(classes="all", backbone=backbone)
    Explainer(dataset, config, store=ArtifactStore(sys.argv[1])).prepare(clock)
    print(f"prepare {time.perf_counter() - start:.1f} s, load {os.getloadavg()[0]:.2f}")
    for stage in clock.order:
        if "Hessian" in stage or "Newton-corrected" in stage:
            print(f"  {clock.seconds(stage):6.1f}  {stage}")


if __name__ == "__main__":
    main()
