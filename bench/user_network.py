"""What "my own network and data" costs: the three models on an ImageFolder of 224x224 RGB JPEGs
with a resnet18 state dict, stage by stage, at a few sizes, extrapolated to 5,000 images.

    python -m bench.user_network                  # n = 500 and 1000 images, results to bench/results
    python -m bench.user_network --sizes 300      # a quick look

Each size gets a fresh ImageFolder (demo garments upscaled to 224x224 and tinted, so they are RGB
photos to the loader; 90% train, 10% test, two classes), a resnet18 with random weights (the
weights do not change the cost) saved as a state dict, and an empty cache. The command line's
path is timed: open the dataset, prepare the explainer (pixels, EfficientNet-Lite0 features, the
RBF SVM, λ selection and fit of both logistic regressions, your network's features, engines), then
explain one test image and verify it with k = 30.

Both wall time and the process's CPU time (user + system, all threads) are recorded per stage;
on a shared machine the wall time depends on the load (reported), the CPU time much less. The
extrapolation to 5,000 images scales each stage's CPU time by its complexity in n (stated in the
table) from the largest size measured; on an otherwise idle 2-core machine the wall time is about
the CPU time divided by the cores the stage keeps busy (2 for the network and matrix work).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from bench.common import write_results
from core.data import load_demo, open_dataset
from core.explainer import Explainer, ExplainerConfig
from core.store import ArtifactStore
from core.user_network import NetworkSpec, load_network
from core.validation import verify

SIZE = 224
TARGET = 5000
#: How each stage's cost grows with the number of images n (used to extrapolate), and why.
SCALING = {
    "open the dataset": (1.0, "decode every JPEG: linear"),
    "load the network": (0.0, "once, whatever n"),
    "pixels (+ first backbone batch)": (1.0, "n x H x W x 3 float64: linear"),
    "EfficientNet-Lite0 features": (1.0, "one forward pass per image: linear"),
    "RBF SVM on pixels": (2.0, "n^2 x 150,528 kernel (n^3 Cholesky small next to it at 5k)"),
    "logistic regression: λ and fit": (1.0, "Newton on 1280-d features: linear in n"),
    "your network's features": (1.0, "one resnet18 forward pass per image: linear"),
    "your network's last layer: λ and fit": (1.0, "Newton on 512-d features: linear in n"),
    "influence engines": (1.0, "Hessians d^2 n and self-influence: linear in n"),
    "explain one test image": (2.0, "the SVM's kernel features and scores: n^2"),
    "verify, RBF SVM (k = 30)": (2.0, "30 retrains with n-d CG on the n x n factor: n^2"),
    "verify, logistic regression (k = 30)": (1.0, "30 retrains on 1280-d features: linear"),
    "verify, your network's last layer (k = 30)": (1.0, "30 retrains on 512-d features: linear"),
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_dataset(root: Path, n: int) -> Path:
    """Two demo classes upscaled to 224x224 RGB JPEGs with a random tint per image."""
    demo = load_demo()
    rng = np.random.default_rng(0)
    n_test = max(2, n // 10) // 2
    n_train = n // 2 - n_test
    for c, name in enumerate(("T-shirt_top", "Shirt")):
        label = demo.class_names.index(("T-shirt/top", "Shirt")[c])
        for split, count in (("train", n_train), ("test", n_test)):
            rows = np.flatnonzero(getattr(demo, f"{split}_labels") == label)
            images = getattr(demo, f"{split}_images")
            target = root / split / name
            target.mkdir(parents=True)
            for i in range(count):
                grey = images[rows[i % len(rows)]][..., 0].astype(np.float32)
                tint = rng.uniform(0.6, 1.0, size=3)
                rgb = (255 - grey[..., None] * tint).clip(0, 255).astype(np.uint8)
                picture = Image.fromarray(rgb).resize((SIZE, SIZE), Image.BILINEAR)
                picture.save(target / f"{i:05d}.jpg", quality=90)
    return root


def measure(n: int, work: Path) -> dict[str, tuple[float, float]]:
    """Stage -> (wall seconds, CPU seconds) for one size."""
    data = write_dataset(work / f"data{n}", n)
    torch.manual_seed(0)
    weights = work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).eval().state_dict(), weights)
    times: dict[str, tuple[float, float]] = {}

    def timed(stage, function):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = function()
        times[stage] = (time.perf_counter() - wall, cpu_seconds() - cpu)
        return result

    dataset = timed("open the dataset", lambda: open_dataset(data, image_size=(SIZE, SIZE)))
    spec = NetworkSpec("resnet18", weights=str(weights))
    timed("load the network", lambda: load_network(spec))  # cached for the explainer
    config = ExplainerConfig(network=spec)
    explainer = Explainer(dataset, config, store=ArtifactStore(work / f"cache{n}"))
    marks: list[tuple[str, float, float]] = []

    def progress(stage, done, total):
        marks.append((stage, time.perf_counter(), cpu_seconds()))

    start = (time.perf_counter(), cpu_seconds())
    explainer.prepare(progress)
    end = (time.perf_counter(), cpu_seconds())
    times.update(_stages(marks, start, end))
    timed("explain one test image", lambda: explainer.explain(test_index=0, k=10))
    names = {
        "svm": "RBF SVM",
        "logreg": "logistic regression",
        "network": "your network's last layer",
    }
    for key, fitted in explainer.models.items():
        inputs, label = fitted.test_inputs[:1], explainer.test_labels[:1]
        timed(
            f"verify, {names[key]} (k = 30)",
            lambda f=fitted, x=inputs, y=label: verify(f.engine, x, y, k=30),
        )
    times["n_train"] = (float(explainer.n_train), 0.0)
    # The process's peak so far; sizes run in increasing order, so this is the peak of this size.
    times["peak memory"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 0.0)
    return times


def _group(stage: str) -> str:
    if stage.startswith("EfficientNet"):
        return "EfficientNet-Lite0 features"
    if stage.startswith("your network"):
        return "your network's features"
    if stage.startswith("Fitting the RBF"):
        return "RBF SVM on pixels"
    if "your network's last layer" in stage:
        return "your network's last layer: λ and fit"
    if "logistic regression" in stage:
        return "logistic regression: λ and fit"
    if stage.startswith("Preparing influence"):
        return "influence engines"
    return stage


def _stages(marks, start, end) -> dict[str, tuple[float, float]]:
    """Attribute the time between progress calls to the stage reported at the end of it; the
    time before the first call is the pixel transform (the only work without progress) and the
    first batch of backbone features."""
    out: dict[str, tuple[float, float]] = {}
    previous_wall, previous_cpu = start
    first = True
    for stage, wall, cpu in [*marks, ("influence engines", *end)]:
        group = "pixels (+ first backbone batch)" if first else _group(stage)
        first = False
        old = out.get(group, (0.0, 0.0))
        out[group] = (old[0] + wall - previous_wall, old[1] + cpu - previous_cpu)
        previous_wall, previous_cpu = wall, cpu
    return out


def _extrapolate(cpu: dict[int, float], exponent: float) -> float:
    """CPU seconds at TARGET images from a + b·n^exponent through the two largest sizes (a fixed
    cost plus the part that grows), or b·n^exponent through the one size measured."""
    sizes = sorted(cpu)
    if exponent == 0:
        return cpu[sizes[-1]]
    if len(sizes) == 1:
        return cpu[sizes[0]] * (TARGET / sizes[0]) ** exponent
    n1, n2 = sizes[-2:]
    slope = max(cpu[n2] - cpu[n1], 0.0) / (n2**exponent - n1**exponent)
    fixed = max(cpu[n2] - slope * n2**exponent, 0.0)
    return fixed + slope * TARGET**exponent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000", help="numbers of images, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as work:
        for n in sizes:
            results[n] = measure(n, Path(work))
            loads.append(os.getloadavg()[0])
            print(n, {k: tuple(round(x, 1) for x in v) for k, v in results[n].items()}, flush=True)
    largest = max(sizes)
    lines = [
        f"Images: demo garments upscaled to {SIZE}x{SIZE} RGB JPEGs, two classes, 90% train. "
        f"Network: resnet18 state dict (--network resnet18 --network-weights), input {SIZE}. "
        f"1-minute load average before and after each size: {', '.join(f'{x:.1f}' for x in loads)} "
        "(2 cores, shared with other work: wall times are inflated by about the load over 2).",
        "",
        "| stage | "
        + " | ".join(f"n = {n}: wall s / CPU s" for n in sizes)
        + f" | growth in n | n = {TARGET}, CPU s (extrapolated) |",
        "|---|" + "---|" * (len(sizes) + 2),
    ]
    total = 0.0
    for stage, (exponent, why) in SCALING.items():
        cells = []
        for n in sizes:
            wall, cpu = results[n].get(stage, (0.0, 0.0))
            cells.append(f"{wall:.1f} / {cpu:.1f}")
        extrapolated = _extrapolate(
            {n: results[n].get(stage, (0.0, 0.0))[1] for n in sizes}, exponent
        )
        total += extrapolated
        lines.append(
            f"| {stage} | {' | '.join(cells)} | n^{exponent:g}: {why} | {extrapolated:,.0f} |"
        )
    memory = {n: results[n]["peak memory"][0] for n in sizes}
    lines += [
        f"| **total** | {' | '.join('' for _ in sizes)} | | **{total:,.0f}** (≈ {total / 60:.0f} CPU "
        "minutes) |",
        f"| peak resident memory, GB | {' | '.join(f'{memory[n]:.1f}' for n in sizes)} | n^1: "
        "float64 pixels and the kernel's temporaries | "
        f"{_extrapolate(memory, 1.0):.1f} GB |",
        "",
        f"Extrapolated by the growth in the table: cost = a + b·n^e through the two largest sizes "
        f"(through the origin from n = {largest} with one size). On an idle 2-core machine "
        f"the wall time lies between the CPU time over 2 (≈ {total / 120:.0f} minutes, both cores "
        f"busy throughout, as in the forward passes and matrix products) and the CPU time "
        f"(≈ {total / 60:.0f} minutes, the single-threaded parts such as decoding). Memory is "
        "dominated by the pixel SVM's float64 pixels (n x 150,528 x 8 bytes, 5.4 GB for 4,500 "
        "training images) and the kernel's temporaries. Later runs start from the cache "
        "(features and λ), as the dashboard does.",
    ]
    path = write_results(
        "user_network", "Your own network and data: cost by stage", "\n".join(lines)
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
