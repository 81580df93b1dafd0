"""The images a fragility study trains and tests on: a seeded, balanced subset of a dataset's
training split and the whole test split of the chosen classes, pooled to the study's size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.data import Dataset, load_demo
from core.errors import InfluenceExplorerError
from core.fragility.config import FragilityConfig
from core.networks import images_to_tensor


@dataclass(frozen=True, eq=False)
class StudyData:
    """The images the study trains and tests on, as tensors.

    Attributes:
        name: dataset name with the classes; class_names: the classes, label i is class_names[i].
        X_train: (n, C, s, s) float32 in [-1, 1]; y_train: (n,) labels; train_ids: dataset ids.
        X_test, y_test, test_ids: the whole test split of those classes.
    """

    name: str
    class_names: tuple[str, ...]
    X_train: torch.Tensor
    y_train: torch.Tensor
    train_ids: tuple[str, ...]
    X_test: torch.Tensor
    y_test: torch.Tensor
    test_ids: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.X_train.shape
        return int(h), int(w), int(c)


def prepare_data(config: FragilityConfig, dataset: Dataset | None = None) -> StudyData:
    """Select the classes, draw the seeded balanced training subset, pool to ``image_size``.

    Args:
        config: the study.
        dataset: default the bundled demo.
    """
    dataset = dataset if dataset is not None else load_demo()
    if tuple(config.classes) == ("all",):
        chosen = dataset
    else:
        chosen = dataset.select_classes(list(config.classes))
    per_class = config.n_train // chosen.n_classes
    if per_class < 2:
        raise InfluenceExplorerError(
            f"n_train {config.n_train} gives fewer than 2 images per class for "
            f"{chosen.n_classes} classes; raise n_train."
        )
    rng = np.random.default_rng(config.data_seed)
    parts = []
    for c in range(chosen.n_classes):
        members = np.flatnonzero(chosen.train_labels == c)
        parts.append(np.sort(rng.permutation(members)[:per_class]))
    index = np.sort(np.concatenate(parts))
    return StudyData(
        name=chosen.name,
        class_names=tuple(chosen.class_names),
        X_train=images_to_tensor(chosen.train_images[index], config.image_size),
        y_train=torch.tensor(chosen.train_labels[index], dtype=torch.int64),
        train_ids=tuple(str(i) for i in chosen.train_ids[index]),
        X_test=images_to_tensor(chosen.test_images, config.image_size),
        y_test=torch.tensor(np.asarray(chosen.test_labels), dtype=torch.int64),
        test_ids=tuple(str(i) for i in chosen.test_ids),
    )
