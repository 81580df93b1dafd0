"""Your own network from the command line, end to end: train a small torchvision network, save its
state dict and a torch.export program, and explain and verify with each through the CLI.

The third model ("your network's last layer", refitted on the penultimate features) must match
leave-one-out retraining as the paper's models do: the default estimate (the first of
core.influence.ESTIMATES, which the dashboard and the CLI show unless told otherwise) reaches
Spearman >= 0.99 and slope within 0.9-1.1, on a confidently classified and a misclassified test
image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core.cli import main
from core.data import load_demo, open_dataset
from core.influence import ESTIMATES

pytestmark = pytest.mark.slow

#: ImageFolder names (sorted, as torchvision numbers them) -> Fashion-MNIST classes.
FOLDERS = {"Pullover": "Pullover", "Shirt": "Shirt", "T-shirt_top": "T-shirt/top"}
PAIR = "T-shirt_top,Shirt"
SIZE = 32
TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 20
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def write_image_folder(root: Path, train: int, test: int) -> Path:
    """train/<class>/*.png and test/<class>/*.png from the bundled demo (28x28 grey)."""
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


def network_input(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 1) uint8 -> what the CLI feeds the network: grey to RGB, /255, ImageNet
    normalisation (torchvision's metadata for resnet18), no resize at --network-input-size 32."""
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    return (x / 255.0 - MEAN) / STD


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 with 3 outputs trained a few steps on 32x32 demo images; its state dict and a
    torch.export program with a dynamic batch dimension."""
    root = tmp_path_factory.mktemp("own-network")
    data = write_image_folder(root / "data", TRAIN_PER_CLASS, TEST_PER_CLASS)
    dataset = open_dataset(data, image_size=(SIZE, SIZE))
    assert dataset.class_names == tuple(FOLDERS)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = network_input(dataset.train_images), torch.tensor(dataset.train_labels)
    model.train()
    for _ in range(20):
        batch = torch.randint(0, len(x), (16,))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # Twenty steps leave BatchNorm's running statistics far from the data's; one pass with a
    # cumulative average sets them, so that the network in eval mode is the one trained.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(x)
    model.eval()
    torch.save(model.state_dict(), root / "net.pt")
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / "net.pt2")
    return {"root": root, "data": data, "model": model, "cache": root / "cache"}


def chosen_test_images(trained) -> tuple[int, int]:
    """Test rows of the pair (in the explainer's order): the one the network classifies most
    confidently and correctly, and the misclassified one it is most sure of."""
    pair = open_dataset(trained["data"], image_size=(SIZE, SIZE)).select_classes(
        list(PAIR.split(","))
    )
    outputs = {"T-shirt_top": 2, "Shirt": 1}
    with torch.no_grad():
        logits = trained["model"](network_input(pair.test_images))[:, list(outputs.values())]
    probabilities = torch.softmax(logits, 1).numpy()
    truth = probabilities[np.arange(len(pair.test_labels)), pair.test_labels]
    wrong = np.flatnonzero(probabilities.argmax(1) != pair.test_labels)
    assert len(wrong), "the briefly trained network should make mistakes on the test set"
    return int(np.argmax(truth)), int(wrong[np.argmin(truth[wrong])])


def run(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("form", ["state dict", "torch.export"])
def test_explain_and_verify_your_network(trained, capsys, form, report):
    network = (
        ["--network", "resnet18", "--network-weights", str(trained["root"] / "net.pt")]
        if form == "state dict"
        else ["--network", str(trained["root"] / "net.pt2")]
    )
    common = [
        "--dataset", str(trained["data"]), "--classes", PAIR, "--network-input-size", str(SIZE),
        "--cache-dir", str(trained["cache"]), "--quiet", "--json", *network,
    ]  # fmt: skip
    confident, mistaken = chosen_test_images(trained)

    explained = run(capsys, "explain", *common, "--test-index", str(mistaken), "--k", "5")
    assert list(explained["models"]) == ["svm", "logreg", "network"]
    ours = explained["models"]["network"]
    assert ours["label"].startswith("Your network's last layer")
    assert len(ours["helpful"]) == len(ours["harmful"]) == 5
    info = explained["network"]
    assert info["n_classes"] == 3 and info["feature_dim"] == 512
    assert info["preprocessing"]["input_size"] == [SIZE, SIZE]
    assert info["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert "ResNet18_Weights" in info["preprocessing"]["source"] or form == "torch.export"
    head = info["refitted_head"]
    assert 0.5 <= head["agreement_with_your_head"] <= 1
    assert "frozen" in info["what_is_explained"]

    verified = run(
        capsys, "verify", *common, "--test-indices", f"{confident},{mistaken}", "--k", "30"
    )
    for item in verified["results"]:
        model = item["models"]["network"]
        assert model["converged"]
        default = model["agreement"][ESTIMATES[0]]
        report(
            f"your network ({form}), test image {item['test_index']}: default estimate "
            f"({ESTIMATES[0]}) Spearman {default['spearman']:.3f}, slope {default['slope']:.3f}"
        )
        assert default["spearman"] >= 0.99, (item["test_index"], default)
        assert 0.9 <= default["slope"] <= 1.1, (item["test_index"], default)
