"""Featurizer throughput on this machine (not part of the test run).

Usage: ``python -m bench.features [--images 1200] [--batch-sizes 4,8,16,64] [--input-sizes 224]
[--heap on|off|both] [--repeats 2] [--backbone efficientnet-lite0]``

Feeds the bundled demo's 28x28 grayscale training images (Fashion-MNIST), which the ImageNet
backbones upsample to their input size, so the cost is that of full-resolution inference. For every
batch size, input size and way of allocating the activations (``--heap``: from malloc's heap
while featurising, as the featurizer does, or mapped and unmapped per allocation, glibc's default
for large ones; see ``core.allocator.activations_from_the_heap``) (interleaved, ``--repeats`` rounds, so that a change in the machine's
load hits every setting alike) it prints the wall and CPU time per image, the load average, and
the largest difference of the features from the first batch size's at the same input size (0 means
bit-identical).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import load_demo
from core.features import get_featurizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batch-sizes", default="4,8,16,64")
    parser.add_argument("--input-sizes", default="224")
    parser.add_argument("--heap", choices=("on", "off", "both"), default="on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    images = load_demo().train_images[: args.images]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    input_sizes = [int(s) for s in args.input_sizes.split(",")]
    featurizers = {
        size: get_featurizer(args.backbone, **({} if size == 224 else {"input_size": size}))
        for size in input_sizes
    }
    started = time.perf_counter()
    for featurizer in featurizers.values():
        featurizer.transform(images[:2])  # load weights and warm up oneDNN kernels
    warmup = time.perf_counter() - started

    heaps = {"on": [True], "off": [False], "both": [True, False]}[args.heap]
    settings = [(s, b, h) for s in input_sizes for b in batch_sizes for h in heaps]
    walls: dict[tuple[int, int, bool], list[float]] = {s: [] for s in settings}
    cpus: dict[tuple[int, int, bool], list[float]] = {s: [] for s in settings}
    loads: list[float] = []
    differences: dict[tuple[int, int, bool], float] = {}
    reference: dict[int, np.ndarray] = {}
    for _ in range(args.repeats):
        for size, batch, heap in settings:
            featurizer = featurizers[size]
            featurizer.reuses_activations = heap
            loads.append(os.getloadavg()[0])
            cpu, start = time.process_time(), time.perf_counter()
            features = featurizer.transform(images, batch_size=batch)
            walls[size, batch, heap].append(time.perf_counter() - start)
            cpus[size, batch, heap].append(time.process_time() - cpu)
            first = reference.setdefault(size, features)
            differences[size, batch, heap] = float(np.abs(features - first).max())

    print(f"backbone          {featurizers[input_sizes[0]].label}")
    print(f"torch threads     {torch.get_num_threads()} (cpu count {os.cpu_count()})")
    print(f"load + warm-up    {warmup:.2f} s")
    print(f"images            {len(images)} of 28x28x1 (demo training images)")
    print(f"load average      {min(loads):.2f}-{max(loads):.2f} (1 min) while timing")
    print("input  batch  heap  wall ms/image (median)  CPU ms/image (median)  max |diff| vs first")
    for key in settings:
        size, batch, heap = key
        wall = statistics.median(walls[key]) / len(images) * 1000
        cpu = statistics.median(cpus[key]) / len(images) * 1000
        print(
            f"{size:5d}  {batch:5d}  {'on ' if heap else 'off'}  {wall:21.1f}  {cpu:21.1f}  "
            f"{differences[key]:.1e}"
        )


if __name__ == "__main__":
    main()
