"""Training-set attacks (Koh & Liang 2017, §5.2): perturb a few training images, within an L∞ budget
in pixel units, so that retraining flips a chosen test prediction.

For a test image z_t predicted as ŷ, the attack raises ℓ(z_t, ŷ) by moving the pixels of its most
helpful training images (largest influence scores on that loss) along I_pert,loss, the gradient of
the retrained model's test loss with respect to a training image's pixels. By the implicit function
theorem, with s = H⁻¹ ∇_θ ℓ(z_t, θ̂) and R(θ; X) the training objective as a function of the
training inputs X,

    d ℓ(z_t, θ̂(X)) / d x_j = ∂_{x_j} [ ℓ(z_t, θ̂; X) - sᵀ ∇_θ R(θ̂; X) ]      (s held fixed),

back-propagated through the model's feature map into the pixels. For the logistic regression only
x_j's own features depend on x_j, and this is exactly the engine's I_pert,loss,
-(1/n) sᵀ ∇_x ∇_θ ℓ(z_j, θ̂) (through the backbone, as the explainer's heatmap). For the RBF SVM the
training image enters the whole kernel matrix, its Cholesky factor (every training point's
features) and the test image's features; the gradient here differentiates all of them, where the
engine's I_pert,loss holds the factor fixed. Each step is a projected signed-gradient step

    x̃ ← clip(x̃ + α·sign(d ℓ / d x̃),  x - ε,  x + ε,  0,  255)

with integer step α and budget ε, so every iterate is a valid uint8 image with |x̃ - x| ≤ ε.
After each step the model is actually retrained on the perturbed training set (as Koh & Liang do)
and the attack stops as soon as the test prediction changes:

- logistic regression: the perturbed images' backbone features are recomputed and the logistic
  regression refitted (the backbone itself stays frozen, as in the paper);
- RBF SVM on pixels: the SVM is refitted from the perturbed pixels: a new kernel matrix and a new
  Cholesky factor, with the same γ, λ, temperature and jitter.

Both refits are warm-started from the current parameters and run to the model's tolerance.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.data import Dataset
from core.errors import InfluenceExplorerError
from core.explainer import FittedModel
from core.features import Featurizer
from core.influence import InfluenceEngine, SolverConfig
from core.models import KernelSVM, LinearModel, as_float64

StageProgress = Callable[[str, int, int], None]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class AttackConfig:
    """How to attack. Frozen and hashable, so it can key a cache.

    Attributes:
        budget: L∞ bound ε on the change of each pixel, in pixel units (0-255 scale).
        step_size: α, pixel units per signed-gradient step.
        steps: steps at most (the attack stops when the prediction flips).
        n_perturb: how many of the test image's most helpful training images are perturbed.
        retrain_every_step: retrain after each step (Koh & Liang) and follow the gradient of the
            retrained model; if False, follow the original model's gradient and retrain once at
            the end (cheaper, weaker).
    """

    budget: int = 16
    step_size: int = 2
    steps: int = 10
    n_perturb: int = 1
    retrain_every_step: bool = True

    def __post_init__(self) -> None:
        for name, lowest in (("budget", 1), ("step_size", 1), ("steps", 1), ("n_perturb", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InfluenceExplorerError(
                    f"{name} must be a whole number (pixel units are integers); got {value!r}."
                )
            if value < lowest:
                raise InfluenceExplorerError(f"{name} must be >= {lowest}; got {value!r}.")
        if self.budget > 255:
            raise InfluenceExplorerError(
                f"budget is in pixel units, at most 255; got {self.budget}."
            )


@dataclass(frozen=True)
class AttackResult:
    """One attack on one test image.

    Attributes:
        test_index: row of the test set (``None`` for an image given directly).
        attacked_label: the label predicted before the attack, whose loss the attack raises.
        train_indices: (k,) the perturbed training images, most helpful first.
        original_images, perturbed_images: (k, H, W, C) uint8.
        probabilities_before, probabilities_after: (n_classes,) the test image's predicted
            probabilities before and after retraining (the SVM's are Platt-scaled scores).
        predicted_before, predicted_after: the predicted class before and after.
        loss_history: (steps_taken + 1,) ℓ(z_test, attacked_label) of the model retrained after
            each step (entry 0: before; without retraining every step, only the ends are real).
        steps_taken: signed-gradient steps taken.
        budget: the L∞ budget in pixel units.
        retraining: what retraining meant for this model.
        seconds: wall time.
    """

    test_index: int | None
    attacked_label: int
    train_indices: np.ndarray
    original_images: np.ndarray
    perturbed_images: np.ndarray
    probabilities_before: np.ndarray
    probabilities_after: np.ndarray
    predicted_before: int
    predicted_after: int
    loss_history: np.ndarray
    steps_taken: int
    budget: int
    retraining: str
    seconds: float

    @property
    def flipped(self) -> bool:
        """Whether retraining on the perturbed images changed the test prediction."""
        return self.predicted_after != self.predicted_before

    @property
    def difference(self) -> np.ndarray:
        """(k, H, W, C) int16 perturbed minus original, in pixel units."""
        return self.perturbed_images.astype(np.int16) - self.original_images.astype(np.int16)

    @property
    def max_change(self) -> int:
        """Largest |change| of any pixel (never above the budget)."""
        return int(np.abs(self.difference).max()) if self.difference.size else 0


def amplified_difference(result: AttackResult, *, gain: float | None = None) -> np.ndarray:
    """The perturbations made visible: 128 + gain·δ as uint8 images (grey = unchanged).

    Args:
        gain: amplification; default 127 / budget, so ±budget maps to black and white.
    Returns:
        (k, H, W, C) uint8.
    """
    gain = 127.0 / result.budget if gain is None else float(gain)
    return np.clip(128.0 + gain * result.difference, 0, 255).round().astype(np.uint8)


def _retraining_note(model: LinearModel, featurizer: Featurizer) -> str:
    if isinstance(model, KernelSVM):
        return (
            "refitted the RBF SVM on the perturbed pixels: new kernel matrix and Cholesky "
            "factor, same γ, λ and temperature, warm-started, to tolerance"
        )
    return (
        f"recomputed the perturbed images' {featurizer.label} features and refitted the "
        "logistic regression on them (backbone frozen), warm-started, to tolerance"
    )


def _refit_on_inputs(model: LinearModel, train_inputs: torch.Tensor) -> LinearModel:
    """A copy of the model fitted on new training inputs (same labels, weights, hyperparameters).

    For the kernel SVM this builds a new feature map (kernel and Cholesky factor) from the
    inputs; ``refit`` would keep the old one, which is not the model trained on these images.
    """
    other = copy.copy(model)
    # A copy: the fitted model keeps (and for features, aliases) the tensor it is given, and the
    # attack goes on changing its own.
    return other.fit(
        train_inputs.clone(), model.labels_, sample_weight=model.sample_weight_, theta0=model.theta_
    )


def retrained_loss_gradient(
    engine: InfluenceEngine,
    featurizer: Featurizer,
    test_input: Any,
    label: int,
    train_indices: Sequence[int],
    images: np.ndarray,
) -> np.ndarray:
    """d ℓ(z_test, label) of the retrained model / d pixels of the given training images.

    The engine's I_pert,loss (the implicit-function gradient of the module docstring, which for
    the SVM differentiates the kernel and its factor) at the engine's fitted model, pulled back
    through the featurizer to the pixels.

    Args:
        engine: influence engine of the current model, fitted on ``images`` at those indices.
        featurizer: uint8 images -> model inputs, differentiable.
        test_input: (1, D) the test image's model input; label: whose loss.
        train_indices: (k,) training points; images: (k, H, W, C) their current pixels.
    Returns:
        (k, H, W, C) in units of test loss per pixel unit (0-255 scale). Positive: brightening the
        pixel raises the test loss.
    """
    images = np.asarray(images)
    input_gradient = engine.perturbation_influence(
        as_float64(test_input).reshape(1, -1),
        [int(label)],
        train_indices,
        train_inputs=_model_inputs(featurizer, images),
    )[0]
    return featurizer.pixel_gradient(images, input_gradient)


def _model_inputs(featurizer: Featurizer, images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(featurizer.transform(images), dtype=torch.float64)


def attack_training_images(
    model: LinearModel,
    featurizer: Featurizer,
    train_images: Any,
    test_input: Any,
    config: AttackConfig | None = None,
    *,
    solver: SolverConfig | None = None,
    engine: InfluenceEngine | None = None,
    train_indices: Sequence[int] | None = None,
    test_index: int | None = None,
    progress: Progress | None = None,
) -> AttackResult:
    """Perturb the test image's most helpful training images until retraining flips its prediction.

    Args:
        model: the fitted model (not modified); its training inputs must be
            ``featurizer.transform(train_images)``.
        featurizer: uint8 images -> the model's inputs, differentiable (``torch_forward``).
        train_images: (n, H, W, C) uint8 training images, rows aligned with the model's.
        test_input: (1, D) the test image's model input.
        config: budget, steps, how many images (default :class:`AttackConfig`).
        solver: inverse-Hessian solver for I_pert,loss at each step.
        engine: the model's influence engine, if there is one already (saves a factorisation).
        train_indices: perturb these training images instead of the most helpful ones.
        test_index: recorded in the result.
        progress: ``progress(done, total)`` after each step.
    """
    start = time.perf_counter()
    config = config if config is not None else AttackConfig()
    images = np.asarray(train_images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InfluenceExplorerError(
            f"train_images must be (n, H, W, C) uint8; got {images.dtype} {images.shape}."
        )
    n = model.n_train_
    if images.shape[0] != n:
        raise InfluenceExplorerError(
            f"train_images has {images.shape[0]} images but the model was trained on {n}."
        )
    x_test = as_float64(test_input).reshape(1, -1)
    if engine is None or engine.model is not model:
        engine = InfluenceEngine(model, solver)
    label = int(model.predict(x_test)[0])
    if train_indices is None:
        scores = engine.influence_scores(x_test, [label])[0]
        chosen = np.argsort(-scores, kind="stable")[: config.n_perturb]
    else:
        chosen = np.asarray(train_indices, dtype=np.int64).reshape(-1)
        if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= n:
            raise InfluenceExplorerError(f"train_indices must be in [0, {n}).")
    original = images[chosen].copy()
    low = np.maximum(original.astype(np.int16) - config.budget, 0)
    high = np.minimum(original.astype(np.int16) + config.budget, 255)
    current = original.astype(np.int16)
    inputs = model.training_inputs_.clone()
    probabilities_before = model.predict_proba(x_test)[0]

    def test_loss(m: LinearModel) -> float:
        return float(m.loss(x_test, [label])[0])

    history = [test_loss(model)]
    retrained = model
    steps_taken = 0
    for step in range(config.steps):
        pixel_gradient = retrained_loss_gradient(
            engine, featurizer, x_test, label, chosen, current.astype(np.uint8)
        )
        current = np.clip(
            current + config.step_size * np.sign(pixel_gradient).astype(np.int16), low, high
        )
        inputs[torch.as_tensor(chosen)] = _model_inputs(featurizer, current.astype(np.uint8))
        steps_taken = step + 1
        if config.retrain_every_step or steps_taken == config.steps:
            # Warm-started from the previous retrain, which is closer than the original.
            retrained = _refit_on_inputs(retrained, inputs)
            history.append(test_loss(retrained))
            if config.retrain_every_step:
                engine = InfluenceEngine(retrained, solver)
        else:
            history.append(math.nan)
        if progress is not None:
            progress(steps_taken, config.steps)
        if config.retrain_every_step and int(retrained.predict(x_test)[0]) != label:
            break
    if progress is not None and steps_taken < config.steps:
        progress(config.steps, config.steps)
    probabilities_after = retrained.predict_proba(x_test)[0]
    perturbed = current.astype(np.uint8)
    return AttackResult(
        test_index=test_index,
        attacked_label=label,
        train_indices=chosen,
        original_images=original,
        perturbed_images=perturbed,
        probabilities_before=probabilities_before,
        probabilities_after=probabilities_after,
        predicted_before=label,
        predicted_after=int(retrained.predict(x_test)[0]),
        loss_history=np.asarray(history),
        steps_taken=steps_taken,
        budget=config.budget,
        retraining=_retraining_note(model, featurizer),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------- explainer
def model_attack(
    fitted: FittedModel,
    dataset: Dataset,
    test_index: int,
    config: AttackConfig | None = None,
    *,
    train_indices: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> AttackResult:
    """:func:`attack_training_images` on one fitted model of an explainer's collection.

    Args:
        fitted: the model (not modified); dataset: the data it was fitted on.
    """
    n_test = dataset.n_test
    if not 0 <= int(test_index) < n_test:
        raise InfluenceExplorerError(f"test_index must be in [0, {n_test}); got {test_index}.")
    index = int(test_index)
    return attack_training_images(
        fitted.model,
        fitted.featurizer,
        dataset.train_images,
        fitted.test_inputs[index : index + 1],
        config,
        solver=fitted.solver,
        engine=fitted.engine,
        train_indices=train_indices,
        test_index=index,
        progress=progress,
    )


def correctly_classified(
    models: Iterable[FittedModel], test_labels: Any, *, count: int, seed: int = 0
) -> list[int]:
    """Up to ``count`` test images every model classifies correctly, in a seeded random order
    (the images Koh & Liang attack)."""
    if count < 1:
        raise InfluenceExplorerError(f"count must be >= 1; got {count}.")
    truth = np.asarray(test_labels)
    correct = np.ones(len(truth), dtype=bool)
    for fitted in models:
        # The decision function's class, as the attack uses: the SVM's Platt-scaled
        # probabilities can put 0.5 slightly off the decision boundary.
        correct &= fitted.model.predict(fitted.test_inputs) == truth
    candidates = np.flatnonzero(correct)
    order = np.random.default_rng(seed).permutation(candidates)
    return sorted(int(i) for i in order[:count])


def lowest_margin_correct(fitted: FittedModel, test_labels: Any, *, count: int = 10) -> list[int]:
    """Up to ``count`` test images this model classifies correctly, least confident first: the
    smallest gap between the true class's probability and the next class's. These are the images
    a training-set attack has the best chance to flip (a misclassified image would only be made
    right; a confident one needs a far larger change), so the dashboard's Attack page starts there.
    """
    if count < 1:
        raise InfluenceExplorerError(f"count must be >= 1; got {count}.")
    truth = np.asarray(test_labels)
    # Correct by the decision function's class, as the attack judges a flip.
    correct = fitted.model.predict(fitted.test_inputs) == truth
    probabilities = np.asarray(fitted.model.predict_proba(fitted.test_inputs), dtype=np.float64)
    rows = np.arange(len(truth))
    own = probabilities[rows, truth]
    others = probabilities.copy()
    others[rows, truth] = -np.inf
    margin = own - others.max(axis=1)
    candidates = np.flatnonzero(correct)
    order = candidates[np.argsort(margin[candidates], kind="stable")]
    return [int(i) for i in order[:count]]


@dataclass(frozen=True)
class AttackSummary:
    """Attacks on several test images with one model.

    Attributes:
        key: the model; config: the attack settings.
        results: one :class:`AttackResult` per test image.
        success_rate: share of the attacks whose retraining flipped the prediction.
        seconds: wall time.
    """

    key: str
    config: AttackConfig
    results: tuple[AttackResult, ...]
    success_rate: float
    seconds: float


def attack_many(
    fitted: FittedModel,
    dataset: Dataset,
    test_indices: Sequence[int],
    config: AttackConfig | None = None,
    *,
    progress: StageProgress | None = None,
) -> AttackSummary:
    """Attack each test image in turn with the same settings; the success rate over them."""
    start = time.perf_counter()
    config = config if config is not None else AttackConfig()
    indices = [int(i) for i in test_indices]
    if not indices:
        raise InfluenceExplorerError("Give at least one test image to attack.")
    report = progress or (lambda stage, done, total: None)
    stage = f"Attacking {fitted.label}"
    results = []
    for position, index in enumerate(indices):
        report(stage, position, len(indices))
        results.append(model_attack(fitted, dataset, index, config))
    report(stage, len(indices), len(indices))
    return AttackSummary(
        key=fitted.key,
        config=config,
        results=tuple(results),
        success_rate=float(np.mean([r.flipped for r in results])),
        seconds=time.perf_counter() - start,
    )


__all__ = [
    "AttackConfig",
    "AttackResult",
    "AttackSummary",
    "amplified_difference",
    "attack_many",
    "attack_training_images",
    "correctly_classified",
    "lowest_margin_correct",
    "model_attack",
    "retrained_loss_gradient",
]
