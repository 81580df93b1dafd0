"""Training-set attacks on tiny image problems: a flip within budget, valid images, honest retraining."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from core.attack import (
    AttackConfig,
    _refit_on_inputs,
    amplified_difference,
    attack_training_images,
    retrained_loss_gradient,
)
from core.errors import InfluenceExplorerError
from core.features import PixelFeaturizer
from core.influence import InfluenceEngine
from core.models import KernelSVM, LogisticRegression


@dataclass
class ImageProblem:
    train_images: np.ndarray
    labels: np.ndarray
    test_images: np.ndarray


@pytest.fixture
def make_image_problem():
    """Factory: make_image_problem(n, side, seed) -> two classes of tiny grey images, the class
    shown by which half of the image is brighter, and test images of weak contrast (between the
    classes, but not on the boundary)."""

    def make(n: int, side: int, seed: int) -> ImageProblem:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % 2
        pattern = np.zeros((side, side, 1))
        pattern[:, : side // 2] = 1.0
        pattern[:, side // 2 :] = -1.0
        signs = np.where(labels == 1, 1.0, -1.0)[:, None, None, None]
        base = 128 + 40 * signs * pattern + rng.normal(scale=25, size=(n, side, side, 1))
        mix = rng.uniform(-0.3, 0.3, size=(6, 1, 1, 1))
        tests = 128 + 40 * mix * pattern + rng.normal(scale=10, size=(6, side, side, 1))
        as_uint8 = lambda x: np.clip(x, 0, 255).round().astype(np.uint8)  # noqa: E731
        return ImageProblem(as_uint8(base), labels, as_uint8(tests))

    return make


def _fit(kind, problem, tol=1e-10):
    pixels = PixelFeaturizer()
    X = pixels.transform(problem.train_images)
    if kind == "logreg":
        return LogisticRegression(l2=1e-3, tol=tol).fit(X, problem.labels), pixels
    svm = KernelSVM(gamma=0.2, l2=1e-3, temperature=0.05, tol=tol)
    return svm.fit(X, problem.labels), pixels


#: A test image of each tiny problem (seed 1) that the model gets with some confidence.
ATTACKED = {"logreg": (3, 0.75), "svm": (4, 0.6)}


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_attack_flips_a_prediction_within_budget(kind, make_image_problem, report):
    problem = make_image_problem(24, 6, seed=1)
    model, pixels = _fit(kind, problem)
    t, confidence = ATTACKED[kind]
    x_test = pixels.transform(problem.test_images[t : t + 1])
    config = AttackConfig(budget=64, step_size=8, steps=10, n_perturb=3)
    steps = []
    result = attack_training_images(
        model,
        pixels,
        problem.train_images,
        x_test,
        config,
        test_index=t,
        progress=lambda done, total: steps.append((done, total)),
    )
    report(
        f"attack ({kind}, 24 images of 6x6): p={result.probabilities_before.max():.2f} flipped="
        f"{result.flipped} after {result.steps_taken} steps, max |δ| {result.max_change}, "
        f"loss {result.loss_history[0]:.3f} -> {result.loss_history[-1]:.3f}"
    )
    assert result.probabilities_before.max() >= confidence
    assert result.flipped
    assert result.predicted_before == int(model.predict(x_test)[0]) == result.attacked_label
    assert result.predicted_after != result.predicted_before
    assert result.perturbed_images.dtype == np.uint8
    assert 0 < result.max_change <= config.budget
    assert np.all(np.diff(result.loss_history) > 0)
    assert steps[-1] == (10, 10)
    # The perturbed images are the most helpful ones, and nothing else moved.
    scores = InfluenceEngine(model).influence_scores(x_test, [result.attacked_label])[0]
    np.testing.assert_array_equal(result.train_indices, np.argsort(-scores)[:3])
    np.testing.assert_array_equal(
        result.original_images, problem.train_images[result.train_indices]
    )
    # Honest check: a model trained from scratch on the perturbed images predicts the same.
    poisoned = problem.train_images.copy()
    poisoned[result.train_indices] = result.perturbed_images
    fresh = type(model)(**_hyperparameters(model)).fit(pixels.transform(poisoned), problem.labels)
    assert int(fresh.predict(x_test)[0]) == result.predicted_after
    np.testing.assert_allclose(
        fresh.predict_proba(x_test)[0], result.probabilities_after, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_gradient_matches_finite_differences_of_retraining(kind, make_image_problem):
    problem = make_image_problem(16, 5, seed=6)
    model, pixels = _fit(kind, problem, tol=1e-12)
    engine = InfluenceEngine(model)
    x_test = pixels.transform(problem.test_images[:1])
    label = int(model.predict(x_test)[0])
    j = 4
    gradient = retrained_loss_gradient(
        engine, pixels, x_test, label, [j], problem.train_images[[j]]
    )
    direction = np.random.default_rng(0).normal(size=gradient.shape)
    base = model.training_inputs_

    def retrained_loss(step):
        inputs = base.clone()
        inputs[j] += step * torch.as_tensor(direction.reshape(-1)) / 127.5
        return float(_refit_on_inputs(model, inputs).loss(x_test, [label])[0])

    eps = 1e-3
    numeric = (retrained_loss(eps) - retrained_loss(-eps)) / (2 * eps)
    assert float((gradient * direction).sum()) == pytest.approx(numeric, rel=1e-4)


def _hyperparameters(model):
    if isinstance(model, KernelSVM):
        return {"gamma": model.gamma, "l2": model.l2, "temperature": model.temperature}
    return {"l2": model.l2}


def test_svm_retraining_builds_a_new_kernel(make_image_problem):
    problem = make_image_problem(16, 5, seed=2)
    model, pixels = _fit("svm", problem)
    inputs = model.training_inputs_.clone()
    inputs[3] = torch.clamp(inputs[3] + 0.3, -1, 1)
    refitted = _refit_on_inputs(model, inputs)
    direct = KernelSVM(gamma=0.2, l2=1e-3, temperature=0.05).fit(inputs, problem.labels)
    assert not torch.equal(refitted.cholesky_, model.cholesky_)
    torch.testing.assert_close(refitted.cholesky_, direct.cholesky_)
    torch.testing.assert_close(refitted.theta_, direct.theta_, rtol=1e-6, atol=1e-8)
    assert refitted.fit_info_.converged
    assert torch.equal(
        model.training_inputs_[3],
        pixels.torch_forward(torch.as_tensor(problem.train_images[3:4], dtype=torch.float64))[0],
    )  # the original model is untouched


def test_attack_without_retraining_every_step_stays_in_bounds(make_image_problem):
    problem = make_image_problem(20, 5, seed=3)
    model, pixels = _fit("logreg", problem)
    x_test = pixels.transform(problem.test_images[:1])
    config = AttackConfig(budget=3, step_size=2, steps=4, retrain_every_step=False)
    result = attack_training_images(
        model, pixels, problem.train_images, x_test, config, train_indices=[5]
    )
    assert result.steps_taken == 4 and result.train_indices.tolist() == [5]
    assert result.max_change <= 3
    assert (
        np.isnan(result.loss_history[1:-1]).all()
        and np.isfinite(result.loss_history[[0, -1]]).all()
    )
    shown = amplified_difference(result)
    assert shown.dtype == np.uint8 and shown.shape == result.perturbed_images.shape
    neutral = result.difference == 0
    assert np.all(shown[neutral] == 128)


def test_bad_attack_settings_are_refused(make_image_problem):
    for bad in (
        {"budget": 0},
        {"budget": 300},
        {"budget": 2.5},
        {"step_size": 0},
        {"steps": 0},
        {"n_perturb": 0},
    ):
        with pytest.raises(InfluenceExplorerError):
            AttackConfig(**bad)
    problem = make_image_problem(10, 4, seed=4)
    model, pixels = _fit("logreg", problem)
    x_test = pixels.transform(problem.test_images[:1])
    with pytest.raises(InfluenceExplorerError, match="uint8"):
        attack_training_images(model, pixels, problem.train_images.astype(float), x_test)
    with pytest.raises(InfluenceExplorerError, match="train_indices"):
        attack_training_images(model, pixels, problem.train_images, x_test, train_indices=[10])
    assert hash(AttackConfig()) == hash(AttackConfig())


def test_cli_attack_returns_json(run_cli, capsys):
    status, payload, _ = run_cli(
        "attack",
        "--test-indices",
        "1",
        "--budget",
        "4",
        "--step-size",
        "2",
        "--steps",
        "2",
        "--include-images",
        capsys=capsys,
    )
    assert status == 0
    assert payload["test_indices"] == [1]
    for key in ("svm", "logreg"):
        model = payload["models"][key]
        assert 0.0 <= model["success_rate"] <= 1.0 and model["n_attacked"] == 1
        attack = model["attacks"][0]
        original = np.asarray(attack["original_images"])
        perturbed = np.asarray(attack["perturbed_images"])
        assert original.shape == perturbed.shape == (1, 28, 28, 1)
        assert perturbed.min() >= 0 and perturbed.max() <= 255
        assert np.abs(perturbed - original).max() == attack["max_change"] <= 4
        assert len(attack["loss_history"]) == attack["steps_taken"] + 1
    assert "backbone" in payload["models"]["logreg"]["retraining"]
    assert "kernel" in payload["models"]["svm"]["retraining"]


def test_cli_attack_refuses_bad_options(run_cli, capsys):
    for options, message in (
        (("--budget", "0"), "budget"),
        (("--budget", "999"), "budget"),
        (("--steps", "0"), "steps"),
        (("--test-indices", "1,-2"), "--test-indices"),
        (("--n-test", "0"), "--n-test"),
        (("--test-indices", "99"), "--test-index"),
    ):
        status, _, err = run_cli("attack", *options, capsys=capsys)
        assert status == 2, options
        assert message in err
