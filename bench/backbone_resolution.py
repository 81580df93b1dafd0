"""The backbone's input resolution: test accuracy of the logistic regression and cost, per size.

Usage: ``python -m bench.backbone_resolution [--sizes 224,192,160,128,112,96]
[--pairs 'T-shirt/top,Shirt;Pullover,Coat;Sneaker,Ankle boot'] [--timing-repeats 2]``

The demo's 28x28 images are resized to the backbone's input size before EfficientNet-Lite0 sees
them (224x224 by default, the release's). A smaller input costs fewer operations; whether it also
costs accuracy is measured here, for each class pair, exactly as the explainer builds the model:

- **Training**: the bundled demo's training images of the pair (500 per class), features at the
  given input size, λ chosen by the selection rule of :mod:`core.selection` (3 x 5-fold
  cross-validation, one-standard-error rule), Newton to ‖∇R‖ <= 1e-10.
- **Test**: every test image of the pair in the full Fashion-MNIST test set (1,000 per class;
  the demo's 100 per class are among them), so that a difference of one or two points is not
  lost in the noise of 200 images. Accuracy with its 95% Wilson interval, mean log-loss, and,
  against 224x224, the images only one of the two gets right and McNemar's exact p-value (a
  paired test: both are evaluated on the same images). The demo's own 200 test images' accuracy
  is given too (what README quotes).
- **Cost**: the default pair's 1,200 demo images (train and test) featurised at each size, wall
  and CPU time per image (batches of the featurizer's default size), sizes interleaved over
  ``--timing-repeats`` rounds so that a change in the machine's load hits each alike, with the
  load average.

Features are kept in the artifact cache (``INFLUENCE_CACHE_DIR``), so a rerun only refits.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
from scipy.stats import binomtest

from bench.common import markdown_table, write_results
from core.data import Dataset, load_demo, open_dataset
from core.features import cached_features, get_featurizer
from core.models import LogisticRegression
from core.selection import SelectionConfig, select_l2
from core.store import ArtifactStore

DEFAULT_PAIRS = "T-shirt/top,Shirt;Pullover,Coat;Sneaker,Ankle boot"
DEFAULT_SIZE = 224


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def featurizer_at(size: int):
    return get_featurizer(
        "efficientnet-lite0", **({} if size == DEFAULT_SIZE else {"input_size": size})
    )


def features(store: ArtifactStore, size: int, data: Dataset, split: str, tag: str) -> np.ndarray:
    images = getattr(data, f"{split}_images")
    return cached_features(
        store,
        featurizer_at(size),
        images,
        dataset_hash=data.content_hash,
        part=f"resolution-study/{tag}/{split}",
    ).astype(np.float64)


def pair_rows(store: ArtifactStore, pair: list[str], sizes: list[int]) -> list[dict]:
    demo = load_demo().select_classes(pair)
    full = open_dataset("fashion-mnist").select_classes(pair)
    demo_test_ids = set(demo.test_ids.tolist())
    in_demo = np.array([i in demo_test_ids for i in full.test_ids.tolist()])
    tag = "-".join(name.replace("/", "_") for name in pair)
    rows = []
    for size in sizes:
        start = time.perf_counter()
        train = features(store, size, demo, "train", tag)
        test = features(store, size, full, "test", tag)
        curve = select_l2(train, demo.train_labels, SelectionConfig())
        model = LogisticRegression(l2=curve.chosen).fit(train, demo.train_labels)
        predictions = model.predict(test)
        correct = predictions == full.test_labels
        rows.append(
            {
                "size": size,
                "l2": curve.chosen,
                "correct": correct,
                "accuracy": float(correct.mean()),
                "log_loss": float(model.loss(test, full.test_labels).mean()),
                "demo_accuracy": float(correct[in_demo].mean()),
                "gradient_norm": model.fit_info_.gradient_norm,
                "seconds": time.perf_counter() - start,
            }
        )
        print(pair, size, {k: v for k, v in rows[-1].items() if k != "correct"}, flush=True)
    return rows


def timing(sizes: list[int], repeats: int) -> dict[int, dict[str, float]]:
    demo = load_demo().select_classes(["T-shirt/top", "Shirt"])
    images = np.concatenate([demo.train_images, demo.test_images])
    featurizers = {size: featurizer_at(size) for size in sizes}
    for featurizer in featurizers.values():
        featurizer.transform(images[:8])  # load the weights, warm up the kernels
    walls: dict[int, list[float]] = {size: [] for size in sizes}
    cpus: dict[int, list[float]] = {size: [] for size in sizes}
    loads = []
    for _ in range(repeats):
        for size in sizes:
            loads.append(os.getloadavg()[0])
            cpu, start = time.process_time(), time.perf_counter()
            featurizers[size].transform(images)
            walls[size].append(time.perf_counter() - start)
            cpus[size].append(time.process_time() - cpu)
    return {
        size: {
            "wall_ms": statistics.median(walls[size]) / len(images) * 1000,
            "cpu_ms": statistics.median(cpus[size]) / len(images) * 1000,
            "images": len(images),
            "load_min": min(loads),
            "load_max": max(loads),
        }
        for size in sizes
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,192,160,128,112,96")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS)
    parser.add_argument("--timing-repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sizes = [int(s) for s in args.sizes.split(",")]
    if DEFAULT_SIZE not in sizes:
        sizes.insert(0, DEFAULT_SIZE)
    pairs = [pair.split(",") for pair in args.pairs.split(";")]
    store = ArtifactStore()
    load_before = os.getloadavg()[0]
    results = {tuple(pair): pair_rows(store, pair, sizes) for pair in pairs}
    costs = timing(sizes, args.timing_repeats)

    table = []
    for pair, rows in results.items():
        reference = next(r for r in rows if r["size"] == DEFAULT_SIZE)
        for row in rows:
            n = len(row["correct"])
            low, high = wilson(int(row["correct"].sum()), n)
            only_this = int((row["correct"] & ~reference["correct"]).sum())
            only_default = int((~row["correct"] & reference["correct"]).sum())
            if row["size"] == DEFAULT_SIZE:
                paired = "(reference)"
            else:
                p = (
                    binomtest(only_this, only_this + only_default, 0.5).pvalue
                    if (only_this + only_default)
                    else 1.0
                )
                paired = f"{only_this} / {only_default} (p = {p:.2g})"
            table.append(
                [
                    " vs ".join(pair),
                    f"{row['size']}x{row['size']}",
                    f"{row['l2']:g}",
                    f"{row['accuracy']:.4f} [{low:.3f}, {high:.3f}]",
                    f"{row['log_loss']:.4f}",
                    paired,
                    f"{row['demo_accuracy']:.3f}",
                    f"{row['gradient_norm']:.0e}",
                ]
            )
    cost_rows = [
        [
            f"{size}x{size}",
            f"{costs[size]['wall_ms']:.1f}",
            f"{costs[size]['cpu_ms']:.1f}",
            f"{costs[size]['cpu_ms'] / costs[DEFAULT_SIZE]['cpu_ms']:.2f}",
            f"{costs[size]['wall_ms'] * costs[size]['images'] / 1000:.1f}",
        ]
        for size in sizes
    ]
    some = costs[sizes[0]]
    body = (
        __doc__.split("\n\n", 2)[2].strip()
        + f"\n\nLoad average (1-minute) at the start {load_before:.2f}; while timing "
        f"{some['load_min']:.2f}-{some['load_max']:.2f}.\n\n"
        + markdown_table(
            [
                "pair",
                "input",
                "λ chosen",
                "test accuracy [95% CI] (2,000 images)",
                "test log-loss",
                "right only here / only at 224 (McNemar)",
                "demo test accuracy (200)",
                "‖∇R‖",
            ],
            table,
        )
        + "\n\nCost of featurising the default pair's demo images "
        f"({some['images']}, T-shirt/top vs Shirt), median of {args.timing_repeats}:\n\n"
        + markdown_table(
            ["input", "wall ms / image", "CPU ms / image", "CPU vs 224", "wall s for all"],
            cost_rows,
        )
        + "\n"
    )
    print(
        write_results("backbone_resolution", "Backbone input resolution: accuracy and cost", body)
    )


if __name__ == "__main__":
    main()
