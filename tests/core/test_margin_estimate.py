"""The exact-in-the-margin estimate: the loss difference against 50-digit arithmetic, the scores
against dense explicit formulas, and against explicit leave-one-out fits on near-zero-loss test
points where linearising the loss is off by more than 10%."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

from core.errors import InfluenceExplorerError
from core.influence import ESTIMATES, InfluenceEngine, loss_change
from core.losses import LogisticLoss, Loss, SmoothHingeLoss, SoftmaxCrossEntropy
from core.models import KernelSVM, LogisticRegression
from core.validation import loo_retrain


def _softplus(x):
    return mpmath.log(1 + mpmath.exp(x))


def _reference_loss(loss, scores, label):
    """The loss in 50-digit arithmetic."""
    s = [v if isinstance(v, mpmath.mpf) else mpmath.mpf(float(v)) for v in scores]
    if isinstance(loss, SoftmaxCrossEntropy):
        return mpmath.log(sum(mpmath.exp(v) for v in s)) - s[label]
    sign = 1 if label == 1 else -1
    if isinstance(loss, SmoothHingeLoss):
        t = mpmath.mpf(loss.temperature)
        return t * _softplus((1 - sign * s[0]) / t)
    return _softplus(-sign * s[0])


@pytest.mark.parametrize(
    "loss, scores, label",
    [
        (LogisticLoss(), [2.5], 1),  # confident: loss 8e-2
        (LogisticLoss(), [-30.0], 0),  # very confident: loss 1e-13
        (LogisticLoss(), [4.0], 0),  # wrong: loss 4
        (SmoothHingeLoss(0.01), [1.2], 1),  # beyond the margin: loss 2e-11
        (SmoothHingeLoss(0.01), [0.3], 1),  # inside the margin, nearly linear
        (SoftmaxCrossEntropy(), [9.0, -1.0, 0.5], 0),
        (SoftmaxCrossEntropy(), [0.2, 0.1, -0.3], 2),
    ],
)
def test_loss_change_is_accurate_from_tiny_to_large_changes(loss, scores, label):
    c = len(scores)
    direction = torch.tensor([1.0, -0.7, 0.4][:c], dtype=torch.float64)
    sizes = 10.0 ** np.arange(-14, 1.5, 0.5)
    changes = torch.as_tensor(sizes, dtype=torch.float64)[:, None] * direction
    with mpmath.workdps(50):
        _check_loss_change(loss, scores, label, changes)


def _check_loss_change(loss, scores, label, changes):
    base = _reference_loss(loss, scores, label)
    for sign in (1.0, -1.0):
        args = (
            torch.tensor([scores], dtype=torch.float64),
            sign * changes[None],
            torch.tensor([label]),
        )
        expected = []
        for row in sign * changes:
            # s + Δs exactly, not rounded to float64 first.
            moved = [mpmath.mpf(s) + mpmath.mpf(float(d)) for s, d in zip(scores, row, strict=True)]
            expected.append(float(_reference_loss(loss, moved, label) - base))
        expected = np.array(expected)
        np.testing.assert_allclose(loss_change(loss, *args)[0].numpy(), expected, rtol=1e-10)
        # The generic version (difference, or Taylor for tiny changes), for losses without a
        # closed form, is less accurate but still far below anything influence can resolve.
        generic = Loss.value_change(loss, *args)[0].numpy()
        errors = np.abs(generic - expected) / np.abs(expected)
        assert errors.max() < (1e-3 if isinstance(loss, SoftmaxCrossEntropy) else 1e-6), errors


@pytest.fixture
def binary(make_logreg_problem):
    problem = make_logreg_problem(150, 40, seed=11)
    return LogisticRegression(l2=1e-2).fit(problem.X, problem.y), problem


@pytest.fixture
def softmax(make_logreg_problem):
    problem = make_logreg_problem(150, 12, seed=12, n_classes=3)
    return LogisticRegression(l2=1e-2).fit(problem.X, problem.y), problem


@pytest.fixture
def svm(make_svm_problem):
    problem = make_svm_problem(120, 30, seed=13)
    return KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(problem.X, problem.y), problem


@pytest.fixture
def svm3(make_svm_problem):
    problem = make_svm_problem(120, 30, seed=14, n_classes=3)
    return KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(problem.X, problem.y), problem


@pytest.mark.parametrize("name", ["binary", "softmax", "svm", "svm3"])
def test_margin_scores_are_the_loss_at_the_newton_predicted_outputs(
    name, binary, softmax, svm, svm3
):
    model, problem = {"binary": binary, "softmax": softmax, "svm": svm, "svm3": svm3}[name]
    engine = InfluenceEngine(model)
    X_test, y_test = problem.X_test[:3], problem.y_test[:3]
    margin = engine.influence_scores(X_test, y_test)  # the default
    assert engine.default_estimate == "margin"
    n, hessian = model.n_train_, model.hessian()
    train_grads = model.per_example_gradients(model.features_, model.labels_)
    factors = model.example_hessian_factors(model.features_, model.labels_)
    features = model.transform(X_test)
    d, c = model.features_.shape[1], model.n_outputs_
    changes = engine.predicted_output_changes(X_test)
    for j in (0, 5, 42):
        u = (model.features_[j][:, None, None] * factors[j][None]).reshape(d * c, -1)
        step = torch.linalg.solve(hessian - (u @ u.T) / n, train_grads[j]) / n  # Δθ_j, Newton
        outputs_after = features @ (model.theta_ + step).reshape(d, c)
        np.testing.assert_allclose(
            changes[:, j], (outputs_after - model.scores(features)).numpy(), rtol=1e-8, atol=1e-13
        )
        expected = model.loss_.value(outputs_after, torch.as_tensor(y_test)) - model.loss_.value(
            model.scores(features), torch.as_tensor(y_test)
        )
        np.testing.assert_allclose(margin[:, j], expected.numpy(), rtol=1e-7, atol=1e-15)


@pytest.mark.parametrize("name", ["binary", "softmax", "svm"])
def test_linear_estimates_are_the_loss_slope_times_the_output_change(name, binary, softmax, svm):
    model, problem = {"binary": binary, "softmax": softmax, "svm": svm}[name]
    engine = InfluenceEngine(model)
    X_test, y_test = problem.X_test[:4], problem.y_test[:4]
    slope = model.loss_.derivatives(
        model.scores(model.transform(X_test)), torch.as_tensor(y_test)
    ).d1.numpy()
    together = engine.score_estimates(X_test, y_test)
    assert tuple(together) == ESTIMATES
    for estimate in ("corrected", "first_order"):
        changes = engine.predicted_output_changes(X_test, estimate=estimate)
        np.testing.assert_allclose(
            together[estimate], np.einsum("tc,tjc->tj", slope, changes), rtol=1e-8, atol=1e-15
        )
        # Sharing the solves gives the same numbers as asking for one estimate at a time.
        np.testing.assert_allclose(
            together[estimate],
            engine.influence_scores(X_test, y_test, estimate=estimate),
            rtol=1e-9,
            atol=1e-16,
        )
    np.testing.assert_allclose(
        together["margin"], engine.influence_scores(X_test, y_test), rtol=1e-9, atol=1e-16
    )
    # The loss is convex in the outputs, so the loss at the predicted outputs never lies below
    # its tangent.
    assert np.all(together["margin"] >= together["corrected"] - 1e-14)


@pytest.mark.parametrize("name", ["binary", "softmax", "svm"])
def test_margin_self_influence_is_the_diagonal(name, binary, softmax, svm):
    model, _ = {"binary": binary, "softmax": softmax, "svm": svm}[name]
    engine = InfluenceEngine(model)
    full = engine.influence_scores(model.training_inputs_.numpy(), model.labels_.numpy())
    np.testing.assert_allclose(engine.self_influence(), np.diag(full), rtol=1e-9, atol=1e-15)
    assert np.all(engine.self_influence() > 0)
    assert np.all(engine.self_influence("margin") >= engine.self_influence("corrected") - 1e-15)


def test_margin_needs_the_test_inputs_not_only_s_test(binary):
    model, problem = binary
    engine = InfluenceEngine(model)
    s_test = engine.inverse_hvp_test(problem.X_test[:1], problem.y_test[:1])
    with pytest.raises(InfluenceExplorerError, match="test inputs"):
        engine.scores_from_stest(s_test, estimate="margin")


def _far_test_point(problem, model, scale):
    # Far out along a test point's direction the model is confident (near-zero loss) and the
    # outputs move by `scale` times more for the same, accurately predicted, parameter change.
    x = problem.X_test[:1] * scale
    return x, model.predict(x)


def _problem(kind, make_logreg_problem, make_svm_problem):
    """A near-zero-loss test point, and how to refit without a point from scratch."""
    if kind == "binary logistic regression":
        p = make_logreg_problem(80, 4, seed=1, noise=0.5)
        model = LogisticRegression(l2=0.03).fit(p.X, p.y)
        x, y = _far_test_point(p, model, 5.0)
        return model, p.X, p.y, x, y, lambda l2: LogisticRegression(l2=l2)
    if kind == "3-class logistic regression":
        p = make_logreg_problem(80, 4, seed=1, n_classes=3, noise=0.5)
        model = LogisticRegression(l2=0.1).fit(p.X, p.y)
        x, y = _far_test_point(p, model, 5.0)
        return model, p.X, p.y, x, y, lambda l2: LogisticRegression(l2=l2)
    p = make_logreg_problem(150, 5, seed=2, noise=0.5, n_classes=3 if kind.startswith("3") else 2)
    X, X_test = np.tanh(p.X), np.tanh(p.X_test)
    model = KernelSVM(gamma=0.2, l2=1e-2, temperature=0.1).fit(X, p.y)
    # The most confidently classified test point (for two classes, test point 10 is one).
    row = int(np.argmin(model.loss(X_test, p.y_test))) if kind.startswith("3") else 10
    return (
        model,
        X,
        p.y,
        X_test[row : row + 1],
        p.y_test[row : row + 1],
        lambda l2: KernelSVM(gamma=0.2, l2=l2, temperature=0.1),
    )


@pytest.mark.parametrize(
    "kind",
    [
        "binary logistic regression",
        "3-class logistic regression",
        "smooth-hinge SVM",
        "3-class smooth-hinge SVM",
    ],
)
def test_near_zero_loss_against_explicit_leave_one_out(
    kind, make_logreg_problem, make_svm_problem, report
):
    model, X, y, x_test, y_test, make = _problem(kind, make_logreg_problem, make_svm_problem)
    engine = InfluenceEngine(model)
    loss = float(model.loss(x_test, y_test)[0])
    assert loss < 1e-4
    scores = engine.score_estimates(x_test, y_test)
    top = np.argsort(-np.abs(scores["margin"][0]))[:5]
    n = len(y)
    actual = []
    for j in top:
        # Leave-one-out from scratch: the objective without z_j, (1/n) Σ_{i≠j} ℓ_i + (λ/2)‖θ‖²,
        # is the usual fit on n - 1 points with λ scaled by n / (n - 1).
        keep = np.setdiff1d(np.arange(n), [j])
        refit = make(model.l2 * n / (n - 1)).fit(X[keep], y[keep])
        actual.append(float(refit.loss(x_test, y_test)[0]) - loss)
    actual = np.array(actual)
    errors = {e: np.abs(s[0, top] - actual) / np.abs(actual) for e, s in scores.items()}
    report(
        f"near-zero loss {loss:.1e}, {kind}, top 5 vs explicit LOO, relative error: "
        + ", ".join(f"{e} {v.min():.3f}-{v.max():.3f}" for e, v in errors.items())
    )
    assert errors["margin"].max() < 0.1
    assert errors["corrected"].min() > 0.1 and errors["first_order"].min() > 0.1


def test_predicted_output_changes_match_retrained_outputs(make_logreg_problem, make_svm_problem):
    model, _, _, x_test, y_test, _ = _problem(
        "smooth-hinge SVM", make_logreg_problem, make_svm_problem
    )
    engine = InfluenceEngine(model)
    top = np.argsort(-np.abs(engine.influence_scores(x_test, y_test)[0]))[:5]
    predicted = engine.predicted_output_changes(x_test)[0, top, 0]
    features = model.transform(x_test)
    actual = []
    for j in top:
        weights = model.sample_weight_.clone()
        weights[int(j)] = 0.0
        actual.append(
            float(
                (model.refit(sample_weight=weights).scores(features) - model.scores(features))[0, 0]
            )
        )
    np.testing.assert_allclose(predicted, actual, rtol=0.06)
    # ... and retraining agrees with the estimate it checks.
    retrained = loo_retrain(model, top, x_test, y_test)
    np.testing.assert_allclose(
        engine.influence_scores(x_test, y_test)[0, top], retrained.actual[:, 0], rtol=0.06
    )
