"""Models: closed-form derivatives against torch.func, convergence, refit semantics, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import core.linalg as linalg
import core.models as models
from core.errors import InfluenceExplorerError, NotFittedError
from core.losses import LogisticLoss, MulticlassSmoothHinge, SmoothHingeLoss, SoftmaxCrossEntropy
from core.models import (
    KernelSVM,
    LogisticRegression,
    NystroemSVM,
    cross_validated_accuracies,
    make_rbf_svm,
    rbf_gamma,
    rbf_kernel,
    svm_memory_bytes,
)

LOSSES = {
    "logistic": (LogisticLoss(), 1, 2),
    "smooth-hinge-0.1": (SmoothHingeLoss(0.1), 1, 2),
    "smooth-hinge-0.001": (SmoothHingeLoss(0.001), 1, 2),
    "softmax": (SoftmaxCrossEntropy(), 4, 4),
    "multiclass-smooth-hinge-0.1": (MulticlassSmoothHinge(0.1), 4, 4),
    "multiclass-smooth-hinge-0.01": (MulticlassSmoothHinge(0.01), 4, 4),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_derivatives_match_autodiff(name):
    loss, n_outputs, n_classes = LOSSES[name]
    gen = torch.Generator().manual_seed(0)
    # Scores spread around the margin, where the smooth hinge's curvature lives.
    scores = 1.0 + 0.01 * torch.randn(64, n_outputs, generator=gen, dtype=torch.float64)
    scores[::2] = torch.randn(32, n_outputs, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, n_classes, (64,), generator=gen)
    derivs = loss.derivatives(scores, labels)

    def one(s, y):
        return loss.value(s[None], y[None])[0]

    d1 = torch.func.vmap(torch.func.grad(one))(scores, labels)
    d2 = torch.func.vmap(torch.func.hessian(one))(scores, labels)
    torch.testing.assert_close(derivs.loss, loss.value(scores, labels), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(derivs.d1, d1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(derivs.d2, d2, rtol=1e-8, atol=1e-10)
    factor = derivs.factor
    torch.testing.assert_close(factor @ factor.transpose(1, 2), d2, rtol=1e-8, atol=1e-10)
    # As many columns as the Hessian's rank: C - 1 for the multi-class losses (their scores are
    # only defined up to a constant), 1 for the binary ones.
    assert factor.shape == (64, n_outputs, max(1, n_outputs - 1))
    confident = torch.zeros(2, n_outputs, dtype=torch.float64)
    confident[0, 0] = confident[1, -1] = 60.0  # a row certain of its first, one of its last class
    sure = loss.derivatives(confident, torch.tensor([0, n_classes - 1])).factor
    assert torch.isfinite(sure).all()
    torch.testing.assert_close(
        sure @ sure.transpose(1, 2),
        loss.derivatives(confident, torch.tensor([0, n_classes - 1])).d2,
        rtol=1e-8,
        atol=1e-14,
    )


def _fitted_models(make_logreg_problem, make_svm_problem):
    binary = make_logreg_problem(80, 12, seed=1)
    multi = make_logreg_problem(90, 7, seed=2, n_classes=3)
    pixels = make_svm_problem(60, 20, seed=3)
    pixels3 = make_svm_problem(60, 20, seed=9, n_classes=3)
    return {
        "logreg-binary": (LogisticRegression(l2=1e-2).fit(binary.X, binary.y), binary),
        "logreg-intercept": (
            LogisticRegression(l2=1e-2, fit_intercept=True).fit(binary.X, binary.y),
            binary,
        ),
        "logreg-softmax": (LogisticRegression(l2=1e-2).fit(multi.X, multi.y), multi),
        "svm": (KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(pixels.X, pixels.y), pixels),
        "svm-nystroem": (
            NystroemSVM(n_components=30, gamma=0.05, l2=1e-2, temperature=0.05, chunk_size=7).fit(
                pixels.X, pixels.y
            ),
            pixels,
        ),
        "svm-3-class": (
            KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(pixels3.X, pixels3.y),
            pixels3,
        ),
        "svm-nystroem-3-class": (
            NystroemSVM(n_components=25, gamma=0.05, l2=1e-2, temperature=0.05).fit(
                pixels3.X, pixels3.y
            ),
            pixels3,
        ),
    }


@pytest.fixture
def fitted(make_logreg_problem, make_svm_problem):
    return _fitted_models(make_logreg_problem, make_svm_problem)


MODEL_NAMES = [
    "logreg-binary",
    "logreg-intercept",
    "logreg-softmax",
    "svm",
    "svm-nystroem",
    "svm-3-class",
    "svm-nystroem-3-class",
]


def _objective_fn(model):
    features, labels, w = model.features_, model.labels_, model.sample_weight_
    d, c, n = features.shape[1], model.n_outputs_, features.shape[0]

    def objective(theta):
        losses = model.loss_.value(features @ theta.reshape(d, c), labels)
        return (w @ losses) / n + 0.5 * model.l2 * (theta @ theta)

    return objective


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fit_reaches_tight_gradient_norm(fitted, name):
    model, _ = fitted[name]
    assert model.fit_info_.converged
    assert float(model.objective_gradient().norm()) <= 1e-8
    grad = torch.func.grad(_objective_fn(model))(model.theta_)
    assert float(grad.norm()) <= 1e-8


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hvp_in_small_blocks_of_rows_matches_autodiff(fitted, name, monkeypatch):
    # Fitting's Hessian-vector products go through the training rows in blocks (through_rows);
    # blocks of 7 rows make every model's products cross many block boundaries.
    monkeypatch.setattr(linalg, "THROUGH_ROWS", 7)
    model, _ = fitted[name]
    hessian = torch.func.hessian(_objective_fn(model))(model.theta_)
    gen = torch.Generator().manual_seed(5)
    vectors = torch.randn(model.n_params_, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(model.hvp(vectors), hessian @ vectors, rtol=1e-9, atol=1e-11)
    batch = torch.arange(3, model.n_train_, 2)  # a minibatch of 7-row blocks too
    features, labels = model.features_[batch], model.labels_[batch]
    w, d, c = model.sample_weight_[batch], features.shape[1], model.n_outputs_

    def batch_objective(theta):
        losses = model.loss_.value(features @ theta.reshape(d, c), labels)
        return (w @ losses) / len(batch) + 0.5 * model.l2 * (theta @ theta)

    expected = torch.func.hessian(batch_objective)(model.theta_) @ vectors
    torch.testing.assert_close(model.hvp(vectors, indices=batch), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_hessian_and_hvp_match_autodiff(fitted, name):
    model, problem = fitted[name]
    features = model.transform(problem.X_test)
    labels = torch.as_tensor(problem.y_test)
    d, c = model.features_.shape[1], model.n_outputs_

    def example_loss(theta, phi, y):
        return model.loss_.value((phi @ theta.reshape(d, c))[None], y[None])[0]

    expected = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(
        model.theta_, features, labels
    )
    torch.testing.assert_close(
        model.per_example_gradients(features, labels), expected, rtol=1e-10, atol=1e-12
    )

    hessian = torch.func.hessian(_objective_fn(model))(model.theta_)
    torch.testing.assert_close(model.hessian(), hessian, rtol=1e-9, atol=1e-11)

    gen = torch.Generator().manual_seed(4)
    vectors = torch.randn(model.n_params_, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(model.hvp(vectors), hessian @ vectors, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(
        model.hvp(vectors[:, 0]), hessian @ vectors[:, 0], rtol=1e-9, atol=1e-11
    )

    # The per-example Hessian factors reproduce each example's Hessian: (φ ⊗ B)(φ ⊗ B)ᵀ.
    factors = model.example_hessian_factors(features, labels)
    for i in range(3):
        u = (features[i][:, None, None] * factors[i][None]).reshape(d * c, -1)
        single = torch.func.hessian(example_loss)(model.theta_, features[i], labels[i])
        torch.testing.assert_close(u @ u.T, single, rtol=1e-9, atol=1e-11)


def test_minibatch_hvp_is_the_batch_mean(fitted):
    model, _ = fitted["logreg-softmax"]
    batch = torch.tensor([3, 5, 5, 17])
    features, labels = model.features_[batch], model.labels_[batch]
    d, c = features.shape[1], model.n_outputs_

    def batch_objective(theta):
        return model.loss_.value(features @ theta.reshape(d, c), labels).mean() + 0.5 * model.l2 * (
            theta @ theta
        )

    v = torch.randn(model.n_params_, dtype=torch.float64)
    expected = torch.func.hessian(batch_objective)(model.theta_) @ v
    torch.testing.assert_close(model.hvp(v, indices=batch), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["logreg-binary", "logreg-softmax"])
def test_zero_weight_refit_equals_fit_without_the_point(fitted, name):
    # Dropping z_j's term but keeping 1/n is fitting the other n-1 points with λ·n/(n-1).
    model, problem = fitted[name]
    n, j = len(problem.y), 7
    weights = np.ones(n)
    weights[j] = 0
    refitted = model.refit(sample_weight=weights)
    keep = np.arange(n) != j
    direct = LogisticRegression(l2=model.l2 * n / (n - 1)).fit(problem.X[keep], problem.y[keep])
    torch.testing.assert_close(refitted.theta_, direct.theta_, rtol=1e-7, atol=1e-9)
    assert refitted is not model and model.sample_weight_[j] == 1.0


def test_refit_warm_start_takes_few_iterations(fitted):
    model, problem = fitted["svm"]
    weights = np.ones(len(problem.y))
    weights[0] = 0
    refitted = model.refit(sample_weight=weights)
    assert refitted.fit_info_.converged
    assert refitted.fit_info_.iterations <= 15


@pytest.mark.parametrize("kind", ["softmax", "svm-3-class"])
def test_newton_cg_path_matches_dense(make_logreg_problem, make_svm_problem, monkeypatch, kind):
    if kind == "softmax":
        problem = make_logreg_problem(120, 30, seed=5, n_classes=3)

        def make():
            return LogisticRegression(l2=1e-2)
    else:
        problem = make_svm_problem(70, 20, seed=5, n_classes=3)

        def make():
            return KernelSVM(gamma=0.05, l2=1e-2, temperature=0.02)

    dense = make().fit(problem.X, problem.y)
    monkeypatch.setattr(models, "DENSE_NEWTON_MAX_PARAMS", 10)
    iterative = make().fit(problem.X, problem.y)
    assert iterative.fit_info_.converged
    torch.testing.assert_close(iterative.theta_, dense.theta_, rtol=1e-7, atol=1e-9)


def test_kernel_svm_is_a_kernel_machine(fitted):
    model, problem = fitted["svm"]
    # Training points' features are the rows of the Cholesky factor.
    torch.testing.assert_close(model.transform(problem.X), model.cholesky_, rtol=1e-6, atol=1e-6)
    # θᵀ L⁻¹ k(X, x) = αᵀ k(X, x) with α = L⁻ᵀ θ.
    alpha = torch.linalg.solve_triangular(model.cholesky_.T, model.theta_[:, None], upper=True)
    kernel = rbf_kernel(model.X_train_, torch.as_tensor(problem.X_test), model.gamma_)
    np.testing.assert_allclose(
        model.decision_function(problem.X_test),
        (alpha.T @ kernel)[0].numpy(),
        rtol=1e-8,
        atol=1e-10,
    )
    proba = model.predict_proba(problem.X_test)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    order = np.argsort(model.decision_function(problem.X_test))
    assert np.all(np.diff(proba[order, 1]) >= -1e-12)
    assert model.platt_ > 0
    # p = 0.5 on the decision boundary: the most probable class is the predicted one.
    np.testing.assert_array_equal(proba.argmax(1), model.predict(problem.X_test))


def test_kernel_svm_default_gamma_is_the_papers(make_svm_problem):
    problem = make_svm_problem(50, 10, seed=6)
    model = KernelSVM(temperature=0.01).fit(problem.X, problem.y)
    assert model.gamma_ == pytest.approx(0.05 / 50)
    assert KernelSVM(gamma="paper").fit(problem.X, problem.y).gamma_ == model.gamma_


def test_median_heuristic_gamma(make_svm_problem):
    problem = make_svm_problem(120, 10, seed=6)
    X = problem.X
    squared = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    expected = 1.0 / np.median(squared[np.triu_indices(len(X), k=1)])
    model = KernelSVM(gamma="median", temperature=0.1).fit(X, problem.y)
    assert model.gamma_ == pytest.approx(expected, rel=1e-12)
    # It does not shrink with n (the paper's 0.05/n does): the same distribution, twice the rows.
    doubled = np.concatenate([X, np.tanh(np.arctanh(X) + 1e-3)])
    assert rbf_gamma("median", torch.as_tensor(doubled)) == pytest.approx(expected, rel=0.05)
    with pytest.raises(InfluenceExplorerError, match="identical"):
        rbf_gamma("median", torch.zeros(5, 3, dtype=torch.float64))


def test_two_class_svm_is_the_papers_binary_model(make_svm_problem):
    """C = 2 keeps the paper's one-column model: its θ minimises the paper's objective, written
    out here independently, and the multiclass hinge in the score difference is that loss."""
    problem = make_svm_problem(60, 20, seed=3)
    model = KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(problem.X, problem.y)
    assert model.n_outputs_ == 1 and model.n_params_ == 60
    X = torch.as_tensor(problem.X)
    n, t = len(X), 0.05
    kernel = torch.exp(-0.05 * torch.cdist(X, X).square())
    factor = torch.linalg.cholesky(kernel + model.jitter_ * torch.eye(n, dtype=torch.float64))
    signs = torch.as_tensor(2 * problem.y - 1, dtype=torch.float64)

    def objective(theta):
        margins = signs * (factor @ theta)
        return (t * torch.nn.functional.softplus((1 - margins) / t)).mean() + 0.005 * theta @ theta

    gradient = torch.func.grad(objective)(model.theta_)
    assert float(gradient.norm()) <= 1e-9
    scores = factor @ model.theta_
    torch.testing.assert_close(model.scores(model.features_)[:, 0], scores, rtol=1e-8, atol=1e-10)
    two_columns = torch.stack([-scores / 2, scores / 2], dim=1)
    torch.testing.assert_close(
        MulticlassSmoothHinge(t).value(two_columns, model.labels_),
        SmoothHingeLoss(t).value(scores[:, None], model.labels_),
        rtol=1e-12,
        atol=1e-15,
    )


def test_multiclass_svm_probabilities_follow_the_scores(fitted):
    model, problem = fitted["svm-3-class"]
    assert model.n_outputs_ == 3 and model.n_params_ == 3 * 60
    proba = model.predict_proba(problem.X_test)
    assert proba.shape == (len(problem.y_test), 3)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(proba.argmax(1), model.predict(problem.X_test))
    scores = model.decision_function(problem.X_test)
    assert scores.shape == (len(problem.y_test), 3)
    expected = torch.softmax(model.platt_ * torch.as_tensor(scores), dim=1).numpy()
    np.testing.assert_allclose(proba, expected, rtol=1e-12)
    assert 0 < model.platt_ < 1e3
    assert model.accuracy(problem.X, problem.y) > 0.8


def test_make_rbf_svm_switches_to_nystroem_by_memory():
    # 8·(3n² + 2p²) bytes: exact for the demo's pair, Nyström for its ten classes.
    assert svm_memory_bytes(1000, 1000, 2) == 8 * (3 * 1000**2 + 2 * 1000**2)
    assert type(make_rbf_svm(1000, 2)) is KernelSVM
    assert type(make_rbf_svm(1500, 3)) is KernelSVM
    ten = make_rbf_svm(5000, 10, temperature=0.1)
    assert isinstance(ten, NystroemSVM) and ten.n_components == 1000 and ten.temperature == 0.1
    small = make_rbf_svm(60_000, 10, memory_budget=2**30)
    assert isinstance(small, NystroemSVM)
    assert svm_memory_bytes(60_000, small.n_components, 10) <= 2**30
    assert svm_memory_bytes(60_000, int(small.n_components / 0.85), 10) > 2**30


def test_cross_validated_accuracies_equal_independent_fits(make_logreg_problem):
    problem = make_logreg_problem(150, 10, seed=4, n_classes=3)
    folds = np.arange(150) % 3
    grid = (1e-3, 1e-1, 1e-2)
    table = cross_validated_accuracies(
        lambda l2: LogisticRegression(l2=l2, tol=1e-10), problem.X, problem.y, folds, grid
    )
    assert table.shape == (3, 3)
    for i, l2 in enumerate(grid):
        for fold in range(3):
            train, held = folds != fold, folds == fold
            model = LogisticRegression(l2=l2, tol=1e-10).fit(problem.X[train], problem.y[train])
            assert table[i, fold] == model.accuracy(problem.X[held], problem.y[held])
    with pytest.raises(InfluenceExplorerError, match="folds"):
        cross_validated_accuracies(LogisticRegression, problem.X, problem.y, folds[:10], grid)


def test_kernel_svm_small_temperature_reaches_tolerance(make_svm_problem):
    problem = make_svm_problem(150, 30, seed=8)
    model = KernelSVM(gamma=0.05, temperature=1e-3).fit(problem.X, problem.y)
    assert model.fit_info_.converged and model.fit_info_.gradient_norm <= 1e-10
    assert model.accuracy(problem.X_test, problem.y_test) > 0.6


def test_predictions_and_losses(fitted):
    model, problem = fitted["logreg-softmax"]
    proba = model.predict_proba(problem.X_test)
    np.testing.assert_array_equal(model.predict(problem.X_test), proba.argmax(1))
    np.testing.assert_allclose(
        model.loss(problem.X_test, problem.y_test),
        -np.log(proba[np.arange(len(proba)), problem.y_test]),
        rtol=1e-10,
    )
    assert 0.0 <= model.accuracy(problem.X_test, problem.y_test) <= 1.0


def test_unfitted_model_says_so():
    with pytest.raises(NotFittedError, match="call fit"):
        LogisticRegression().predict(np.zeros((1, 3)))
    with pytest.raises(NotFittedError):
        KernelSVM().hessian()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (LogisticRegression(l2=-1.0), "l2"),
        (KernelSVM(temperature=0.0), "temperature"),
        (KernelSVM(gamma=-2.0), "gamma"),
        (NystroemSVM(n_components=0), "n_components"),
    ],
)
def test_bad_hyperparameters_name_the_field(model, message):
    with pytest.raises(InfluenceExplorerError, match=message):
        model.fit(np.zeros((4, 2)), np.array([0, 1, 0, 1]))


def test_bad_inputs_are_refused_with_a_message():
    X = np.random.default_rng(0).normal(size=(6, 3))
    y = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(InfluenceExplorerError, match="NaN"):
        LogisticRegression().fit(np.where(X > 1, np.nan, X), y)
    with pytest.raises(InfluenceExplorerError, match="same n"):
        LogisticRegression().fit(X, y[:4])
    with pytest.raises(InfluenceExplorerError, match="class indices >= 0"):
        KernelSVM().fit(X, np.array([0, 1, -1, 0, 1, 2]))
    model = LogisticRegression().fit(X, y)
    with pytest.raises(InfluenceExplorerError, match="shape"):
        model.predict(np.zeros((2, 5)))
    with pytest.raises(InfluenceExplorerError, match="sample_weight"):
        model.refit(sample_weight=np.ones(3))


def test_preconditioned_refit_equals_dense_refit(fitted):
    from core.influence import ExactSolver

    for name in ("logreg-softmax", "svm"):
        model, problem = fitted[name]
        weights = np.ones(len(problem.y))
        weights[[2, 11]] = 0
        dense = model.refit(sample_weight=weights)
        fast = model.refit(sample_weight=weights, preconditioner=ExactSolver(model).inverse_hvp)
        assert fast.fit_info_.converged
        torch.testing.assert_close(fast.theta_, dense.theta_, rtol=1e-8, atol=1e-10)
        assert getattr(fast, "_preconditioner", None) is None


def test_nystroem_with_every_point_as_landmark_is_the_exact_svm(make_svm_problem):
    from core.influence import InfluenceEngine

    problem = make_svm_problem(60, 20, seed=3)
    settings = {"gamma": 0.05, "l2": 1e-2, "temperature": 0.05}
    exact = KernelSVM(**settings).fit(problem.X, problem.y)
    nystroem = NystroemSVM(n_components=1000, chunk_size=16, **settings).fit(problem.X, problem.y)
    # Features L⁻¹k(X, x_i) are the rows of the exact model's factor (up to the tiny jitter).
    torch.testing.assert_close(nystroem.features_, exact.features_, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(nystroem.theta_, exact.theta_, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(
        nystroem.decision_function(problem.X_test),
        exact.decision_function(problem.X_test),
        rtol=1e-7,
        atol=1e-9,
    )
    for estimate in ("first_order", "corrected"):
        np.testing.assert_allclose(
            InfluenceEngine(nystroem).influence_scores(
                problem.X_test, problem.y_test, estimate=estimate
            ),
            InfluenceEngine(exact).influence_scores(
                problem.X_test, problem.y_test, estimate=estimate
            ),
            rtol=1e-6,
            atol=1e-10,
        )


def test_nystroem_kernel_error_shrinks_as_landmarks_are_added(make_svm_problem):
    problem = make_svm_problem(80, 20, seed=4)
    X = torch.as_tensor(problem.X)
    kernel = rbf_kernel(X, X, 0.05)
    errors = []
    for m in (10, 30, 60, 80):
        model = NystroemSVM(n_components=m, gamma=0.05, temperature=0.05).fit(problem.X, problem.y)
        assert model.features_.shape == (80, m)
        # The same seed gives nested landmark sets, so the Nyström error cannot grow.
        errors.append(float((model.features_ @ model.features_.T - kernel).norm()))
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errors))
    assert errors[0] > 10 * errors[-1] and errors[-1] < 1e-4


@pytest.mark.parametrize("n_classes", [2, 3])
def test_dual_newton_step_is_the_dense_step(make_logreg_problem, n_classes):
    # Fewer data than parameters (n·r <= p/2): Newton steps go through Woodbury on n·r x n·r.
    problem = make_logreg_problem(30, 200, seed=7, n_classes=n_classes)
    weights = np.ones(30)
    weights[[3, 4]] = 0
    model = LogisticRegression(l2=1e-2).fit(problem.X, problem.y, sample_weight=weights)
    assert model.fit_info_.converged
    derivs = model._derivatives(model.features_, model.labels_, model.theta_)
    vector = torch.randn(model.n_params_, generator=torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(
        model._dual_newton_step(derivs, vector),
        torch.linalg.solve(model.hessian(), vector),
        rtol=1e-9,
        atol=1e-12,
    )


def _many_class_problem(make_logreg_problem, n=600, d=30, classes=8):
    problem = make_logreg_problem(n, d, seed=11, n_classes=classes, noise=0.5)
    return torch.as_tensor(problem.X), problem.y


def test_sampled_curvature_with_every_row_is_the_exact_hessian(make_logreg_problem):
    X, y = _many_class_problem(make_logreg_problem)
    model = LogisticRegression(l2=1e-3).fit(X, y)
    curvature = models.SampledCurvature()
    curvature.rows = len(y)  # the whole set: H_S is H itself (in float32)
    curvature.prepare(model, model.training_derivatives())
    v = torch.randn(
        model.n_params_, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    # Formed in the class basis: the softmax's all-ones class direction carries λ alone.
    assert curvature._data.shape == (model.n_params_ // 8 * 7,) * 2
    recovered = curvature.apply(model.hessian() @ v)
    assert recovered.dtype == torch.float64
    single = curvature.apply(model.hessian() @ v[:, 0])  # one vector, as CG applies it
    torch.testing.assert_close(single, v[:, 0], rtol=0, atol=2e-3 * float(v.abs().max()))
    torch.testing.assert_close(recovered, v, rtol=0, atol=2e-3 * float(v.abs().max()))
    # A new λ refactorises the kept sample Hessian; other rows form a new one.
    model.l2 = 1e-2
    curvature.prepare(model, model.training_derivatives())
    assert (curvature.builds, curvature.factorisations) == (1, 2)
    torch.testing.assert_close(
        curvature.apply(model.hessian() @ v), v, rtol=0, atol=2e-3 * float(v.abs().max())
    )
    other = LogisticRegression(l2=1e-2).fit(X[:500], y[:500])
    curvature.prepare(other, other.training_derivatives())
    assert (curvature.builds, curvature.factorisations) == (2, 3)


def test_newton_cg_with_a_sampled_preconditioner_reaches_the_same_optimum_in_fewer_iterations(
    monkeypatch,
):
    # Features with a few dominant directions and a mean, as deep features have: plain CG is slow
    # at small λ, and a quarter of the rows' Hessian captures those directions.
    rng = np.random.default_rng(0)
    n, d, classes = 2000, 20, 5
    X = rng.standard_normal((n, d)) * np.logspace(1, -1.5, d) + 2.0
    y = ((X - 2.0) @ rng.standard_normal((d, classes)) + 3 * rng.gumbel(size=(n, classes))).argmax(
        1
    )
    X = torch.as_tensor(X)
    monkeypatch.setattr(models, "DENSE_NEWTON_MAX_PARAMS", 64)  # Newton-CG for p = 100
    monkeypatch.setattr(models, "SAMPLED_CURVATURE_MIN_ROWS", 10**9)
    plain = LogisticRegression(l2=1e-4).fit(X, y)
    monkeypatch.setattr(models, "SAMPLED_CURVATURE_MIN_ROWS", 1000)
    monkeypatch.setattr(models.SampledCurvature, "rows", 500)
    monkeypatch.setattr(models.SampledCurvature, "refresh_after", 5)
    shared = models.SampledCurvature()
    sampled = LogisticRegression(l2=1e-4).fit(X, y, curvature=shared)
    assert shared.builds >= 1 and sampled.fit_info_.converged
    assert sampled.fit_info_.cg_iterations < plain.fit_info_.cg_iterations / 4
    torch.testing.assert_close(sampled.theta_, plain.theta_, rtol=0, atol=1e-7)
    # The fit does not keep the preconditioner (up to (d·C)² floats) once it is done ...
    assert getattr(sampled, "_curvature", None) is None
    # ... and a fit on fewer rows than the threshold builds none of its own.
    small = LogisticRegression(l2=1e-4).fit(X[:900], y[:900])
    assert small._sampled_curvature() is None
    # Nor does it use a caller's (a cross-validation fold below the threshold).
    builds = shared.builds
    LogisticRegression(l2=1e-4).fit(X[:900], y[:900], curvature=shared)
    assert shared.builds == builds


def test_newton_forcing_follows_the_gradients_fall():
    forcing = models._newton_forcing
    # The first step: min(0.1, √‖∇R‖), the rule every step used before.
    assert forcing(4.0, None, 1e-10) == 0.1
    assert forcing(1e-4, None, 1e-10) == pytest.approx(1e-2)
    # Slow progress (damped steps): CG stops early, at the 0.1 cap.
    assert forcing(5e-3, (1e-2, 0.1), 1e-10) == 0.1
    # Fast progress: the square of the gradient's fall, 0.9·(1e-5/1e-3)² = 9e-5.
    assert forcing(1e-5, (1e-3, 0.01), 1e-10) == pytest.approx(9e-5)
    # ... but not much below the last forcing's square while that is large (safeguard) ...
    assert forcing(1e-5, (1e-2, 0.5), 1e-10) == pytest.approx(0.1)
    # ... and never tighter than the tolerance needs: 1e-3·tol/‖∇R‖.
    assert forcing(1e-9, (1e-6, 1e-3), 1e-10) == pytest.approx(1e-4)
