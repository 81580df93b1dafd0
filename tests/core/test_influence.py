"""Influence: solvers against the exact one, the Woodbury correction against explicit inverses,
batching, self-influence, I_up,params and I_pert,loss against their oracles, and error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import linalg
from core.errors import (
    ConvergenceError,
    InfluenceExplorerError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from core.influence import (
    CGSolver,
    ExactSolver,
    InfluenceEngine,
    LiSSASolver,
    LiSSAWarning,
    SolverConfig,
    top_k,
    top_k_by_magnitude,
)
from core.models import KernelSVM, LogisticRegression
from core.validation import verify


@pytest.fixture
def binary_model(make_logreg_problem):
    problem = make_logreg_problem(150, 40, seed=11)
    return LogisticRegression(l2=1e-2).fit(problem.X, problem.y), problem


@pytest.fixture
def softmax_model(make_logreg_problem):
    problem = make_logreg_problem(150, 12, seed=12, n_classes=3)
    return LogisticRegression(l2=1e-2).fit(problem.X, problem.y), problem


@pytest.fixture
def svm_model(make_svm_problem):
    problem = make_svm_problem(120, 30, seed=13)
    return KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(problem.X, problem.y), problem


@pytest.fixture
def svm3_model(make_svm_problem):
    problem = make_svm_problem(90, 30, seed=14, n_classes=3)
    return KernelSVM(gamma=0.05, l2=1e-2, temperature=0.1).fit(problem.X, problem.y), problem


def _relative_error(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_exact_solver_inverts_the_hessian(softmax_model):
    model, _ = softmax_model
    solver = ExactSolver(model, damping=0.1)
    v = torch.randn(model.n_params_, 4, dtype=torch.float64)
    damped = model.hessian() + 0.1 * torch.eye(model.n_params_, dtype=torch.float64)
    torch.testing.assert_close(damped @ solver.inverse_hvp(v), v, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(solver.inverse_hvp(v[:, 1]), solver.inverse_hvp(v)[:, 1])


@pytest.mark.parametrize("name", ["binary", "softmax", "svm"])
def test_cg_matches_exact(name, binary_model, softmax_model, svm_model, report):
    model, _ = {"binary": binary_model, "softmax": softmax_model, "svm": svm_model}[name]
    v = torch.randn(model.n_params_, 5, dtype=torch.float64)
    exact = ExactSolver(model).inverse_hvp(v)
    cg = CGSolver(model, tol=1e-12, max_iter=5000)
    error = _relative_error(cg.inverse_hvp(v), exact)
    report(f"CG vs exact ({name}): relative error {error:.1e} in {cg.last_iterations} iterations")
    assert error < 1e-8


def test_lissa_matches_exact_when_well_conditioned(binary_model, report):
    model, _ = binary_model
    v = torch.randn(model.n_params_, 3, dtype=torch.float64)
    damping = 0.05
    exact = ExactSolver(model, damping).inverse_hvp(v)
    lissa = LiSSASolver(model, damping, depth=600, repeats=4, batch_size=50, seed=0)
    error = _relative_error(lissa.inverse_hvp(v), exact)
    report(f"LiSSA vs exact (binary logreg, damping {damping}): relative error {error:.3f}")
    assert error < 0.1


def test_solver_config_builds_each_solver(binary_model):
    model, problem = binary_model
    reference = InfluenceEngine(model).influence_scores(problem.X_test[:2], problem.y_test[:2])
    cg = InfluenceEngine(model, SolverConfig(method="cg", cg_tol=1e-12))
    np.testing.assert_allclose(
        cg.influence_scores(problem.X_test[:2], problem.y_test[:2]),
        reference,
        rtol=1e-6,
        atol=1e-12,
    )
    assert isinstance(InfluenceEngine(model, SolverConfig()).solver, ExactSolver)


def test_batched_scores_equal_one_at_a_time(softmax_model):
    model, problem = softmax_model
    engine = InfluenceEngine(model)
    for estimate in ("corrected", "first_order"):
        batched = engine.influence_scores(problem.X_test, problem.y_test, estimate=estimate)
        single = np.stack(
            [
                engine.influence_scores(
                    problem.X_test[i : i + 1], problem.y_test[i : i + 1], estimate=estimate
                )[0]
                for i in range(len(problem.y_test))
            ]
        )
        np.testing.assert_allclose(batched, single, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["binary", "softmax", "svm", "svm-3-class"])
def test_scores_match_explicit_formulas(name, binary_model, softmax_model, svm_model, svm3_model):
    model, problem = {
        "binary": binary_model,
        "softmax": softmax_model,
        "svm": svm_model,
        "svm-3-class": svm3_model,
    }[name]
    engine = InfluenceEngine(model)
    n = model.n_train_
    hessian = model.hessian()
    train_grads = model.per_example_gradients(model.features_, model.labels_)
    test_grads = model.per_example_gradients(
        model.transform(problem.X_test[:3]), problem.y_test[:3]
    )
    first = engine.influence_scores(problem.X_test[:3], problem.y_test[:3], estimate="first_order")
    expected = (test_grads @ torch.linalg.solve(hessian, train_grads.T) / n).numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-8, atol=1e-14)

    corrected = engine.influence_scores(
        problem.X_test[:3], problem.y_test[:3], estimate="corrected"
    )
    factors = model.example_hessian_factors(model.features_, model.labels_)
    d, c = model.features_.shape[1], model.n_outputs_
    for j in (0, 5, 42):
        u = (model.features_[j][:, None, None] * factors[j][None]).reshape(d * c, -1)
        without_j = hessian - (u @ u.T) / n  # H_{-j} = H - (1/n) ∇²ℓ(z_j)
        explicit = (test_grads @ torch.linalg.solve(without_j, train_grads[j]) / n).numpy()
        np.testing.assert_allclose(corrected[:, j], explicit, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("name", ["softmax", "svm-3-class"])
def test_quadratic_forms_from_inverse_blocks_match_explicit_ones(
    name, softmax_model, svm3_model, monkeypatch
):
    model, _ = {"softmax": softmax_model, "svm-3-class": svm3_model}[name]
    monkeypatch.setattr(linalg, "STRIP", 8)  # several strips even at these small sizes
    d, c = model.features_.shape[1], model.n_outputs_
    inverse = torch.linalg.inv(model.hessian())
    eye = torch.eye(c, dtype=torch.float64)
    forms = InfluenceEngine(model)._unit_quadratic_forms()
    for j in (0, 7, 31):
        u = (model.features_[j][:, None, None] * eye[None]).reshape(d * c, c)  # φ_j ⊗ I_C
        torch.testing.assert_close(forms[j], u.T @ inverse @ u, rtol=1e-9, atol=1e-13)
    # Solvers without a factor reach the same forms by solving for unit vectors.
    iterative = InfluenceEngine(model, SolverConfig(method="cg", cg_tol=1e-12))
    torch.testing.assert_close(iterative._unit_quadratic_forms(), forms, rtol=1e-7, atol=1e-11)


@pytest.mark.parametrize("name", ["softmax", "svm-3-class"])
def test_multiclass_corrected_estimate_tracks_leave_one_out(name, softmax_model, svm3_model):
    """The C-class Woodbury estimate against actually retraining without each point."""
    model, problem = {"softmax": softmax_model, "svm-3-class": svm3_model}[name]
    engine = InfluenceEngine(model)
    X_test, y_test = problem.X_test[:2], problem.y_test[:2]
    results = verify(engine, X_test, y_test, k=25)
    for result in results:
        corrected, first = result.agreement["corrected"], result.agreement["first_order"]
        assert corrected.spearman >= 0.98 and corrected.pearson >= 0.99
        assert 0.95 <= corrected.slope <= 1.05
        # The correction is at least as close to retraining as the first order.
        assert abs(corrected.slope - 1) <= abs(first.slope - 1) + 1e-3


def test_binary_correction_is_division_by_one_minus_leverage(binary_model):
    model, problem = binary_model
    engine = InfluenceEngine(model)
    first = engine.influence_scores(problem.X_test, problem.y_test, estimate="first_order")
    corrected = engine.influence_scores(problem.X_test, problem.y_test, estimate="corrected")
    leverage = engine.leverage()
    assert np.all((leverage > 0) & (leverage < 1))
    np.testing.assert_allclose(corrected, first / (1 - leverage), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("estimate", ["corrected", "first_order"])
def test_self_influence_is_the_diagonal(softmax_model, estimate):
    model, _ = softmax_model
    engine = InfluenceEngine(model)
    X_train = model.training_inputs_.numpy()
    full = engine.influence_scores(X_train, model.labels_.numpy(), estimate=estimate)
    np.testing.assert_allclose(
        engine.self_influence(estimate), np.diag(full), rtol=1e-9, atol=1e-15
    )
    assert np.all(engine.self_influence(estimate) > 0)


def test_params_change_matches_explicit_solves(svm_model):
    model, _ = svm_model
    engine = InfluenceEngine(model)
    idx = [1, 4]
    grads = model.per_example_gradients(model.features_[idx], model.labels_[idx])
    expected = torch.linalg.solve(model.hessian(), grads.T).T / model.n_train_
    np.testing.assert_allclose(
        engine.params_change(idx, estimate="first_order"), expected.numpy(), rtol=1e-8, atol=1e-14
    )
    # The corrected change is one exact Newton step on the objective without the point.
    factors = model.example_hessian_factors(model.features_[idx], model.labels_[idx])
    corrected = engine.params_change(idx, estimate="corrected")
    for row, j in enumerate(idx):
        u = model.features_[j][:, None] * factors[row, 0, 0]
        without_j = model.hessian() - (u @ u.T) / model.n_train_
        step = torch.linalg.solve(without_j, grads[row]) / model.n_train_
        np.testing.assert_allclose(corrected[row], step.numpy(), rtol=1e-8, atol=1e-14)


def test_perturbation_influence_matches_refitting(binary_model):
    # d ℓ_test / d x_j is exact to first order (implicit function theorem), so a central
    # finite difference of actual refits must agree.
    model, problem = binary_model
    engine = InfluenceEngine(model)
    j, eps = 3, 1e-4
    predicted = engine.perturbation_influence(problem.X_test[:2], problem.y_test[:2], [j])[:, 0]
    direction = np.random.default_rng(0).normal(size=problem.X.shape[1])

    def test_loss_after_moving(sign):
        X = problem.X.copy()
        X[j] += sign * eps * direction
        refitted = LogisticRegression(l2=model.l2, tol=1e-13).fit(X, problem.y, theta0=model.theta_)
        return refitted.loss(problem.X_test[:2], problem.y_test[:2])

    actual = (test_loss_after_moving(1) - test_loss_after_moving(-1)) / (2 * eps)
    np.testing.assert_allclose(predicted @ direction, actual, rtol=1e-4, atol=1e-9)


def test_perturbation_influence_matches_refitting_the_kernel_svm(make_svm_problem):
    # Moving a training image changes the whole kernel matrix and its factor; the gradient must
    # describe honestly refitting the SVM on the moved image (a new kernel), checked by a
    # central finite difference of real refits.
    problem = make_svm_problem(40, 12, seed=15)
    model = KernelSVM(gamma=0.05, l2=1e-2, temperature=0.1, tol=1e-13).fit(problem.X, problem.y)
    engine = InfluenceEngine(model)
    x_test, y_test = problem.X_test[:2], problem.y_test[:2]
    j, eps = 5, 1e-4
    predicted = engine.perturbation_influence(x_test, y_test, [j])[:, 0]
    assert predicted.shape == (2, problem.X.shape[1])
    direction = np.random.default_rng(1).normal(size=problem.X.shape[1])

    def test_loss_after_moving(sign):
        X = problem.X.copy()
        X[j] += sign * eps * direction
        refitted = KernelSVM(gamma=0.05, l2=1e-2, temperature=0.1, tol=1e-13).fit(X, problem.y)
        return refitted.loss(x_test, y_test)

    actual = (test_loss_after_moving(1) - test_loss_after_moving(-1)) / (2 * eps)
    np.testing.assert_allclose(predicted @ direction, actual, rtol=1e-4, atol=1e-10)


def test_perturbation_influence_at_moved_inputs(binary_model):
    # Evaluated at the stored inputs, passing them explicitly changes nothing.
    model, problem = binary_model
    engine = InfluenceEngine(model)
    default = engine.perturbation_influence(problem.X_test[:1], problem.y_test[:1], [1, 4])
    explicit = engine.perturbation_influence(
        problem.X_test[:1], problem.y_test[:1], [1, 4], train_inputs=problem.X[[1, 4]]
    )
    np.testing.assert_allclose(explicit, default, rtol=1e-12, atol=1e-15)


def test_top_k_orders_and_signs():
    scores = np.array([0.3, -0.2, 0.0, 0.5, -0.9, 0.1])
    result = top_k(scores, 2)
    np.testing.assert_array_equal(result.helpful, [3, 0])
    np.testing.assert_array_equal(result.harmful, [4, 1])
    np.testing.assert_allclose(result.helpful_scores, [0.5, 0.3])
    few = top_k(np.array([0.1, -0.1, 0.0]), 5)
    assert list(few.helpful) == [0] and list(few.harmful) == [1]
    with pytest.raises(InfluenceExplorerError, match="k must be"):
        top_k(scores, 0)


@pytest.mark.parametrize("kind", ["distinct", "ties", "signed zeros", "infinities", "nan"])
def test_top_k_lists_are_those_of_a_full_stable_sort(kind):
    # The partial selection must give exactly the lists a full stable sort gives, ties broken by
    # the lower training index, for every k.
    rng = np.random.default_rng(5)
    n = 257
    values = {
        "distinct": rng.normal(size=n),
        "ties": rng.integers(-3, 4, size=n).astype(float),
        "signed zeros": np.where(rng.random(n) < 0.5, 0.0, -0.0) + (rng.random(n) < 0.1),
        "infinities": rng.choice([np.inf, -np.inf, 1.0, 0.0, -2.0], size=n),
        "nan": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
    }[kind]
    for k in (1, 2, 7, 64, n - 1, n, n + 3):
        helpful = np.argsort(-values, kind="stable")[:k]
        harmful = np.argsort(values, kind="stable")[:k]
        best = top_k(values, k)
        np.testing.assert_array_equal(best.helpful, helpful[values[helpful] > 0])
        np.testing.assert_array_equal(best.harmful, harmful[values[harmful] < 0])
        np.testing.assert_array_equal(
            top_k_by_magnitude(values, k), np.argsort(-np.abs(values), kind="stable")[:k]
        )


def test_singular_hessian_asks_for_damping(make_logreg_problem):
    # More parameters than points and no weight decay: the Hessian is singular.
    problem = make_logreg_problem(20, 60, seed=14, noise=5.0)
    model = LogisticRegression(l2=1e-3).fit(problem.X, problem.y)
    model.l2 = 0.0  # what the Hessian would be without weight decay
    with pytest.raises(NotPositiveDefiniteError, match="damping") as refused:
        ExactSolver(model)
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        CGSolver(model, max_iter=500).inverse_hvp(torch.randn(model.n_params_, dtype=torch.float64))
    assert ExactSolver(model, damping=1e-3).cholesky is not None
    # The suggested fix is a number a front end can offer, and it works.
    suggested = refused.value.suggested_damping
    assert suggested is not None and f"{suggested:.2g}" in str(refused.value)
    assert ExactSolver(model, damping=suggested).cholesky is not None


def test_indefinite_hessian_suggests_damping_that_makes_it_definite(binary_model, monkeypatch):
    # A Hessian with a clearly negative eigenvalue (as a non-convex objective would give):
    # the suggested total damping is just enough, while half of it is not.
    model, _ = binary_model
    shift = model.l2 + 0.02
    real_hessian = type(model).hessian

    def indefinite(self):
        hessian = real_hessian(self)
        hessian.diagonal().sub_(shift)
        return hessian

    monkeypatch.setattr(type(model), "hessian", indefinite)
    with pytest.raises(NotPositiveDefiniteError) as refused:
        ExactSolver(model, damping=1e-3)
    suggested = refused.value.suggested_damping
    assert suggested is not None and 1e-3 < suggested < shift + 1e-3 + 0.01
    assert ExactSolver(model, damping=suggested).cholesky is not None
    with pytest.raises(NotPositiveDefiniteError):
        ExactSolver(model, damping=suggested / 2)


def test_cg_that_does_not_converge_says_what_to_change(binary_model):
    model, _ = binary_model
    with pytest.raises(ConvergenceError, match="cg_max_iter"):
        CGSolver(model, tol=1e-14, max_iter=2).inverse_hvp(
            torch.ones(model.n_params_, dtype=torch.float64)
        )


def test_lissa_divergence_and_short_depth_are_reported(binary_model, monkeypatch):
    model, _ = binary_model
    v = torch.ones(model.n_params_, dtype=torch.float64)
    with pytest.raises(SolverDivergedError, match="lissa_scale"):
        LiSSASolver(model, depth=400, scale=1e-3)
    # A scale that passes the up-front check (here because the eigenvalue estimate is made to
    # be wrong) still diverges, and the recursion notices.
    largest = LiSSASolver(model, depth=400).largest_eigenvalue
    monkeypatch.setattr(LiSSASolver, "_largest_eigenvalue", lambda self: 0.1 * largest)
    with pytest.raises(SolverDivergedError, match="diverged at step"):
        LiSSASolver(model, depth=400, scale=0.3 * largest).inverse_hvp(v)
    monkeypatch.undo()
    with pytest.warns(LiSSAWarning, match="lissa_depth"):
        short = LiSSASolver(model, depth=5)
    # Kept on the solver too, for front ends that build it in another thread.
    assert len(short.convergence_warnings) == 1 and "lissa_depth" in short.convergence_warnings[0]


def test_lissa_long_enough_has_no_convergence_warning(binary_model):
    model, _ = binary_model
    assert LiSSASolver(model, damping=0.05, depth=600, batch_size=50).convergence_warnings == ()
    assert ExactSolver(model).convergence_warnings == ()


def test_lissa_blowing_up_between_checks_is_reported(binary_model, monkeypatch):
    # The recursion checks its norm every 50 steps; a blow-up after the last check must still
    # raise instead of returning infinities.
    model, _ = binary_model
    solver = LiSSASolver(model, damping=0.05, depth=30, batch_size=50)
    real = LiSSASolver._damped_hvp
    calls = []

    def breaks_after_the_first_step(self, vectors, indices=None):
        calls.append(1)
        out = real(self, vectors, indices)
        return out if len(calls) == 1 else out * float("inf")

    monkeypatch.setattr(LiSSASolver, "_damped_hvp", breaks_after_the_first_step)
    with pytest.raises(SolverDivergedError, match="last steps"):
        solver.inverse_hvp(torch.ones(model.n_params_, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "newton"}, "method"),
        ({"damping": -1.0}, "damping"),
        ({"cg_tol": 0.0}, "cg_tol"),
        ({"lissa_depth": 0}, "lissa_depth"),
        ({"lissa_scale": -3.0}, "lissa_scale"),
    ],
)
def test_solver_config_names_the_bad_field(kwargs, field):
    with pytest.raises(InfluenceExplorerError, match=field):
        SolverConfig(**kwargs)


def test_solver_config_is_hashable():
    assert hash(SolverConfig(method="cg", damping=0.01)) == hash(
        SolverConfig(method="cg", damping=0.01)
    )


def test_unknown_estimate_is_refused(binary_model):
    model, problem = binary_model
    with pytest.raises(InfluenceExplorerError, match="estimate"):
        InfluenceEngine(model).influence_scores(problem.X_test, problem.y_test, estimate="second")
