"""Switching the explained classes on the bundled demo: a new subset, then back to one seen before.

Usage: ``python -m bench.switch_classes --cache-dir DIR [--pairs 0,2;1,7;5,9] [--repeats 2]``

The cache directory must hold the demo's backbone features (any command on the demo with that
``--cache-dir``, e.g. ``python -m core precompute --classes all --cache-dir DIR``, computes them).
For each subset the script copies only the feature artifacts into a fresh store, so the subset is
"not seen before" (no fitted parameters, no λ selection cached), and times
``Explainer(demo, ExplainerConfig(classes=subset)).prepare()`` stage by stage: what the dashboard
waits for when a user picks classes it has not prepared. Then it prepares the same subset again
in a new Explainer on the same store ("seen before": fitted parameters and λ read from the cache,
Newton warm-started, engines rebuilt). The dashboard keeps prepared explainers in memory as
well, which makes switching back to one of them immediate; this measures the case it has
evicted. Every timing is printed with the load average at the time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import markdown_table, write_results
from bench.full_fashion_mnist import StageClock

DEFAULT_SUBSETS = "0,2;1,7;5,9;3,4,6"


def prepare_once(dataset, classes: tuple[int, ...], store) -> tuple[float, StageClock, object]:
    from core.explainer import Explainer, ExplainerConfig

    clock = StageClock()
    start = time.perf_counter()
    explainer = Explainer(dataset, ExplainerConfig(classes=classes), store=store).prepare(clock)
    return time.perf_counter() - start, clock, explainer


def main() -> None:
    from core.data import open_dataset
    from core.explainer import Explainer, ExplainerConfig
    from core.store import SECRET_FILENAME, ArtifactStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--subsets", default=DEFAULT_SUBSETS, help="';'-separated class lists")
    parser.add_argument("--repeats", type=int, default=2, help="'seen before' repeats")
    args = parser.parse_args()
    demo = open_dataset("demo")
    source = ArtifactStore(args.cache_dir)
    probe = Explainer(demo, ExplainerConfig(classes="all"), store=source).cost()
    if probe.uncached_images:
        raise SystemExit(
            f"{probe.uncached_images} demo images have no cached features in {source.root}; run "
            f"`python -m core precompute --classes all --cache-dir {source.root}` first."
        )
    rows, stage_rows = [], []
    for text in args.subsets.split(";"):
        classes = tuple(int(c) for c in text.split(","))
        with tempfile.TemporaryDirectory() as scratch:
            for path in source.root.glob("features-*.artifact"):
                shutil.copy2(path, scratch)
            # The artifacts are authenticated under the source store's key: bring it along.
            shutil.copy2(source.root / SECRET_FILENAME, scratch)
            store = ArtifactStore(scratch)
            load_new = os.getloadavg()[0]
            new_s, clock, explainer = prepare_once(demo, classes, store)
            names = " vs ".join(explainer.class_names)
            for stage in clock.order:
                stage_rows.append([names, stage, f"{clock.seconds(stage):.2f}"])
            again = []
            loads = []
            for _ in range(args.repeats):
                loads.append(os.getloadavg()[0])
                again.append(prepare_once(demo, classes, store)[0])
            rows.append(
                [
                    names,
                    explainer.n_train,
                    f"{new_s:.1f}",
                    f"{load_new:.1f}",
                    f"{statistics.median(again):.2f}",
                    f"{statistics.median(loads):.1f}",
                ]
            )
            print(rows[-1], flush=True)
    body = "\n".join(
        [
            "Bundled demo (500 training and 100 test images per class), backbone features "
            'cached, explainer defaults. "New": a fresh store holding only the features (no '
            'fitted parameters or λ selection). "Seen before": a new Explainer on the same '
            "store afterwards (median of the repeats). Load: 1-minute load average when the "
            "preparation started (2 cores).",
            "",
            markdown_table(
                ["classes", "n train", "new: s", "load", "seen before: s", "load"],
                rows,
            ),
            "",
            "Stages of the new preparations (seconds between the stage's first and last "
            "progress report):",
            "",
            markdown_table(["classes", "stage", "s"], stage_rows),
        ]
    )
    path = write_results("switch_classes", "Switching classes on the demo", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
