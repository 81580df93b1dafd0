"""Featurizer throughput on this machine (not part of the test run).

Usage: ``python -m bench.features [--images 1200] [--batch-size 64] [--backbone efficientnet-lite0]``

Feeds 28x28 grayscale uint8 images (Fashion-MNIST-sized), which the ImageNet backbones upsample to
their input size, so the cost is that of full-resolution inference. Prints images/s and the total time,
with the load average before and after, because a busy machine changes the result a lot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.features import get_featurizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=28, help="side of the square input images")
    args = parser.parse_args()

    featurizer = get_featurizer(args.backbone)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, args.size, args.size, 1), dtype=np.uint8)

    started = time.perf_counter()
    featurizer.transform(images[:2])  # load weights and warm up oneDNN kernels
    warmup = time.perf_counter() - started

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    featurizer.transform(images, batch_size=args.batch_size)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    print(f"backbone          {featurizer.label}")
    print(f"torch threads     {torch.get_num_threads()} (cpu count {os.cpu_count()})")
    print(f"load + warm-up    {warmup:.2f} s")
    print(f"images            {args.images} of {args.size}x{args.size}x1, batch {args.batch_size}")
    print(f"total             {elapsed:.1f} s")
    print(f"throughput        {args.images / elapsed:.1f} images/s")
    print(f"load average      {load_before:.2f} before, {load_after:.2f} after")


if __name__ == "__main__":
    main()
