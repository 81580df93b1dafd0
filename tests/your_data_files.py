"""Small files a user would bring to "Your data": a zipped ImageFolder of demo garments and the
state dict of a small torchvision network for its classes.

Kept tiny so that the dashboard prepares all three models in seconds: two classes, 16 training
and 4 test images each, 32x32 pixels; a ``shufflenet_v2_x0_5`` (about 1.4 MB of weights; a resnet18's
45 MB upload as well, within the server's 200 MB, but take longer) with two outputs, its
BatchNorm statistics set on these images so that it is a network in eval mode as a user would
save it.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import torch
import torchvision
from PIL import Image

#: ImageFolder class folder -> Fashion-MNIST class of the demo.
CLASSES = {"shirt": "Shirt", "tshirt": "T-shirt/top"}
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 4
SIZE = 32
ARCHITECTURE = "shufflenet_v2_x0_5"


def _images() -> dict[str, dict[str, list[np.ndarray]]]:
    from core.data import load_demo

    demo = load_demo()
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        labels, images = getattr(demo, f"{split}_labels"), getattr(demo, f"{split}_images")
        out[split] = {}
        for folder, name in CLASSES.items():
            rows = np.flatnonzero(labels == demo.class_names.index(name))[:count]
            out[split][folder] = [images[row][..., 0] for row in rows]
    return out


def image_folder_zip() -> bytes:
    """``garments/train/<class>/*.png`` and ``garments/test/<class>/*.png``, zipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for split, classes in _images().items():
            for folder, images in classes.items():
                for i, image in enumerate(images):
                    png = io.BytesIO()
                    Image.fromarray(image).resize((SIZE, SIZE)).save(png, "PNG")
                    archive.writestr(f"garments/{split}/{folder}/{i:03d}.png", png.getvalue())
    return buffer.getvalue()


def state_dict_file() -> bytes:
    """``torch.save(model.state_dict())`` of a two-class shufflenet_v2_x0_5 in eval mode."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, ARCHITECTURE)(num_classes=len(CLASSES))
    train = _images()["train"]
    x = torch.tensor(
        np.stack([image for folder in sorted(train) for image in train[folder]]),
        dtype=torch.float32,
    )
    x = (x[:, None].expand(-1, 3, -1, -1) / 255.0 - 0.45) / 0.225
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear")
    # BatchNorm's running statistics from these images (a cumulative average over one pass).
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()
