"""What pages read of a prepared explainer: sizes, names, images, the models and their predictions.

Pages hold the explainer only to hand it back to services; everything they show of it comes
through these functions, so the engine's layout (its dataset, its dict of fitted models) can
change without touching a page. The models are a collection, in the engine's order: nothing here
names one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.explainer import Explainer, ModelSummary


def n_train(explainer: Explainer) -> int:
    return int(explainer.n_train)


def n_test(explainer: Explainer) -> int:
    return int(explainer.n_test)


def class_names(explainer: Explainer) -> tuple[str, ...]:
    """The explained classes' names; class index i of every label is ``class_names[i]``."""
    return tuple(explainer.class_names)


def dataset_name(explainer: Explainer) -> str:
    """E.g. "fashion-mnist-demo [T-shirt/top vs Shirt]"."""
    return str(explainer.dataset.name)


def image_description(explainer: Explainer) -> str:
    """What the models see, e.g. "28×28, grayscale, light on dark"."""
    h, w, c = explainer.dataset.image_shape
    text = f"{w}×{h}, {'grayscale' if c == 1 else 'RGB'}"
    return text + (", light on dark" if explainer.dataset.light_on_dark else "")


def model_labels(explainer: Explainer) -> dict[str, str]:
    """Model key -> its label (e.g. "RBF SVM on pixels"), for every model, in the engine's order."""
    return {key: fitted.label for key, fitted in explainer.models.items()}


def model_short_labels(explainer: Explainer) -> dict[str, str]:
    """Model key -> an abbreviation for tight spaces (a thumbnail's caption)."""
    return {key: fitted.short_label for key, fitted in explainer.models.items()}


def default_model(explainer: Explainer) -> str:
    """The model the Training data pages start with: the last in the engine's order.

    The engine lists its pixel baseline (the RBF SVM) first and models on learned features after
    it; the experiments are most telling on the latter.
    """
    return list(explainer.models)[-1]


def summaries(explainer: Explainer) -> dict[str, ModelSummary]:
    """Model key -> its accuracy, inputs and hyperparameters, in the engine's order."""
    return explainer.summaries()


def train_image(explainer: Explainer, index: int) -> np.ndarray:
    """(H, W, C) uint8 training image ``index``."""
    return explainer.dataset.train_images[int(index)]


def test_image(explainer: Explainer, index: int) -> np.ndarray:
    """(H, W, C) uint8 test image ``index``."""
    return explainer.dataset.test_images[int(index)]


def train_labels(explainer: Explainer) -> np.ndarray:
    """(n_train,) class index of every training image."""
    return np.asarray(explainer.train_labels)


def train_ids(explainer: Explainer) -> np.ndarray:
    """(n_train,) the dataset's stable id of every training image."""
    return np.asarray(explainer.dataset.train_ids)


def train_label_name(explainer: Explainer, index: int) -> str:
    return str(explainer.class_names[int(explainer.train_labels[int(index)])])


def test_label_name(explainer: Explainer, index: int) -> str:
    return str(explainer.class_names[int(explainer.test_labels[int(index)])])


@dataclass(frozen=True)
class Prediction:
    """One model's prediction for one test image: the label and its probability."""

    label_name: str
    probability: float


def test_prediction(explainer: Explainer, model_key: str, index: int) -> Prediction:
    """What model ``model_key`` predicts for test image ``index``."""
    probabilities = explainer.test_probabilities(model_key)[int(index)]
    predicted = int(np.argmax(probabilities))
    return Prediction(str(explainer.class_names[predicted]), float(probabilities[predicted]))


def test_predictions(explainer: Explainer) -> dict[str, np.ndarray]:
    """Model key -> (n_test,) its predicted class of every test image, in the engine's order."""
    return {key: explainer.test_probabilities(key).argmax(1) for key in explainer.models}


def runners_up(probabilities: np.ndarray, class_names: tuple[str, ...], *, most: int = 3) -> str:
    """With three or more classes, the next most probable classes after the prediction, e.g.
    " Next: Shirt 0.21, Pullover 0.08, Coat 0.05." (empty for two classes, where the other class
    has the rest).

    Args:
        probabilities: (C,) one model's probabilities for one image.
    """
    if len(probabilities) <= 2:
        return ""
    order = np.argsort(-np.asarray(probabilities), kind="stable")[1 : 1 + most]
    listed = ", ".join(f"{class_names[i]} {float(probabilities[i]):.2f}" for i in order)
    return f" Next: {listed}."
