"""How well the third model's influence matches retraining, by training-set size.

    python -m bench.network_accuracy                       # 150, 250, 400 training images per class
    python -m bench.network_accuracy --per-class 150 --test 10

The recipe of ``tests/core/test_network_cli.py``: a torchvision resnet18 with three outputs,
trained 20 Adam steps of 16 images on 32x32 demo garments (Pullover, Shirt, T-shirt/top, 400 per
class; BatchNorm statistics then set by one pass), saved as a state dict. For each size the real
explainer is built on T-shirt/top vs Shirt with that many training images per class
(``ExplainerConfig(network=...)``: λ by the explainer's selection, the head's weights as the
start, refitted to convergence), and every one of the first ``--test`` test images of each class
is verified: the network model's top 30 training images by |score| are each removed and the layer
retrained to tolerance, and the Newton-corrected estimate is compared with the actual change.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from bench.common import write_results
from core.data import load_demo, open_dataset
from core.explainer import Explainer, ExplainerConfig
from core.store import ArtifactStore
from core.user_network import NetworkSpec
from core.validation import verify

FOLDERS = {"Pullover": "Pullover", "Shirt": "Shirt", "T-shirt_top": "T-shirt/top"}
SIZE, POOL = 32, 400


def write_image_folder(root: Path, train: int, test: int) -> Path:
    demo = load_demo()
    for split, count in (("train", train), ("test", test)):
        labels, images = getattr(demo, f"{split}_labels"), getattr(demo, f"{split}_images")
        for folder, name in FOLDERS.items():
            target = root / split / folder
            target.mkdir(parents=True)
            rows = np.flatnonzero(labels == demo.class_names.index(name))[:count]
            for i, row in enumerate(rows):
                Image.fromarray(images[row][..., 0]).save(target / f"{i:03d}.png")
    return root


def train_network(dataset, path: Path) -> None:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.tensor(dataset.train_images, dtype=torch.float32).permute(0, 3, 1, 2)
    x = (x.expand(-1, 3, -1, -1) / 255.0 - mean) / std
    y = torch.tensor(dataset.train_labels)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(20):
        batch = torch.randint(0, len(x), (16,))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(x)
    torch.save(model.eval().state_dict(), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", default="150,250,400", help="training images per class")
    parser.add_argument("--test", type=int, default=20, help="test images per class verified")
    args = parser.parse_args()
    sizes = [int(s) for s in args.per_class.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        pool = open_dataset(
            write_image_folder(root / "pool", POOL, args.test), image_size=(SIZE,) * 2
        )
        train_network(pool, root / "net.pt")
        spec = NetworkSpec("resnet18", weights=str(root / "net.pt"), input_size=SIZE)
        for per_class in sizes:
            data = write_image_folder(root / f"data{per_class}", per_class, args.test)
            dataset = open_dataset(data, image_size=(SIZE, SIZE))
            config = ExplainerConfig(classes=("T-shirt_top", "Shirt"), network=spec)
            explainer = Explainer(dataset, config, store=ArtifactStore(root / "cache")).prepare()
            fitted = explainer.models["network"]
            summary = explainer.summaries()["network"]
            results = verify(fitted.engine, fitted.test_inputs, explainer.test_labels, k=30)
            spearman = np.array([r.agreement["corrected"].spearman for r in results])
            slope = np.array([r.agreement["corrected"].slope for r in results])
            passing = int(np.sum((spearman >= 0.99) & (slope >= 0.9) & (slope <= 1.1)))
            rows.append(
                f"| {explainer.n_train} | {summary.hyperparameters['l2']:g} | "
                f"{summary.test_accuracy:.3f} | {summary.original_head.agreement:.3f} | "
                f"{np.median(spearman):.3f} [{spearman.min():.3f}, {spearman.max():.3f}] | "
                f"{np.median(slope):.3f} [{slope.min():.3f}, {slope.max():.3f}] | "
                f"{passing} of {len(results)} |"
            )
            print(rows[-1], flush=True)
    body = "\n".join(
        [
            f"Third model (your network's last layer, resnet18 features, 512-d + bias) on "
            f"T-shirt/top vs Shirt at {SIZE}x{SIZE}; every one of the {2 * args.test} test images "
            "verified with k = 30, Newton-corrected estimate (the default). Median [min, max].",
            "",
            "| n_train | λ (chosen) | refit test accuracy | agreement with the head | Spearman "
            "| slope | Spearman ≥ 0.99 and slope in [0.9, 1.1] |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(
        write_results(
            "network_accuracy", "Your network's last layer against retraining", body
        ).read_text()
    )


if __name__ == "__main__":
    main()
