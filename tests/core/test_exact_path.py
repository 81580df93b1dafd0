"""The exact solver's fast path (symmetric rank-k builds, LAPACK factors, the dual form when
n·r < p, batched solves) against a plain reference written here: the Hessian summed point by
point, a dense Cholesky solve, and one explicit Hessian without the point per training point.
Every estimate (first order, Newton-corrected, exact in the margin), self-influence and leverage,
on problems shaped like the demo (fewer training points than features, so the dual form is the
one taken) and on the kernel SVM, to 1e-10 of each row's largest value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import InfluenceExplorerError
from core.influence import ExactSolver, InfluenceEngine, SolverConfig
from core.linalg import cholesky, cholesky_inverse, row_gram, weighted_gram
from core.models import KernelSVM, LogisticRegression

TOLERANCE = 1e-10


def _demo_like(n: int, d: int, seed: int, n_classes: int = 2) -> tuple[np.ndarray, ...]:
    """Non-negative features with a shared mean and a few strong directions, like pooled CNN
    features (the demo's are 1280-d for 1000 training images); labels from a noisy linear rule."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(8, d))
    weights = rng.normal(size=(d, n_classes))

    def sample(m: int) -> tuple[np.ndarray, np.ndarray]:
        latent = rng.normal(size=(m, 8)) @ basis + 0.5 * rng.normal(size=(m, d))
        X = np.log1p(np.exp(latent)) / np.sqrt(d) * 4.0
        logits = (X - X.mean(0)) @ weights * 3.0 + rng.gumbel(size=(m, n_classes))
        return X, logits.argmax(1)

    X, y = sample(n)
    X_test, y_test = sample(12)
    return X, y, X_test, y_test


def _reference(model, X_test, y_test, damping: float = 0.0) -> dict[str, np.ndarray]:
    """Every estimate from the Hessian summed point by point and dense Cholesky solves."""
    features, labels = model.features_, model.labels_
    n, d = features.shape
    c = model.n_outputs_
    p = d * c
    factors = model.example_hessian_factors(features, labels)  # (n, C, r)
    columns = (features[:, :, None, None] * factors[:, None, :, :]).reshape(n, p, -1)
    weights = model.sample_weight_
    hessian = torch.zeros(p, p, dtype=torch.float64)
    for j in range(n):
        hessian += weights[j] * (columns[j] @ columns[j].T) / n
    hessian += (model.l2 + damping) * torch.eye(p, dtype=torch.float64)
    chol = torch.linalg.cholesky(hessian)
    train_grads = model.per_example_gradients(features, labels)  # (n, p)
    test_features = model.transform(X_test)
    test_grads = model.per_example_gradients(test_features, y_test)  # (m, p)
    first = (test_grads @ torch.cholesky_solve(train_grads.T, chol)).numpy() / n
    # One exact Newton step without each point: H_{-j} = H - (1/n) ∇²ℓ(z_j), solved densely.
    steps = torch.empty(n, p, dtype=torch.float64)
    for j in range(n):
        without = torch.linalg.cholesky(hessian - columns[j] @ columns[j].T / n)
        steps[j] = torch.cholesky_solve(train_grads[j][:, None], without)[:, 0] / n
    corrected = (test_grads @ steps.T).numpy()
    outputs = model.scores(test_features)
    changes = torch.einsum("td,jdc->tjc", test_features, steps.reshape(n, d, c))
    labels_test = torch.as_tensor(y_test)
    margin = model.loss_.value_change(outputs, changes, labels_test).numpy()
    own_changes = torch.einsum("jd,jdc->jc", features, steps.reshape(n, d, c))
    inverse_grads = torch.cholesky_solve(train_grads.T, chol).T
    leverage = torch.stack(
        [torch.trace(columns[j].T @ torch.cholesky_solve(columns[j], chol)) for j in range(n)]
    )
    return {
        "first_order": first,
        "corrected": corrected,
        "margin": margin,
        "self_first_order": ((train_grads * inverse_grads).sum(1) / n).numpy(),
        "self_corrected": ((train_grads * steps).sum(1)).numpy(),
        "self_margin": model.loss_.value_change(
            model.scores(features), own_changes[:, None, :], labels
        )[:, 0].numpy(),
        "leverage": (leverage / n).numpy(),
    }


def _assert_rows_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    actual, expected = np.atleast_2d(actual), np.atleast_2d(expected)
    scale = np.abs(expected).max(axis=1, keepdims=True)
    worst = float((np.abs(actual - expected) / scale).max())
    assert worst <= TOLERANCE, f"{what}: worst relative difference {worst:.2e}"


def _check_engine(engine: InfluenceEngine, X_test, y_test, reference: dict) -> None:
    scores = engine.score_estimates(X_test, y_test)
    for estimate in ("first_order", "corrected", "margin"):
        _assert_rows_close(scores[estimate], reference[estimate], estimate)
        # One estimate at a time takes its own path (no margin: projected test gradients).
        alone = engine.influence_scores(X_test, y_test, estimate=estimate)
        _assert_rows_close(alone, reference[estimate], f"{estimate} alone")
        own = engine.self_influence(estimate)
        _assert_rows_close(own, reference[f"self_{estimate}"], f"self-influence {estimate}")
    _assert_rows_close(engine.leverage(), reference["leverage"], "leverage")
    s_test = engine.inverse_hvp_test(X_test, y_test)
    _assert_rows_close(
        engine.scores_from_stest(s_test, estimate="first_order"),
        reference["first_order"],
        "scores_from_stest",
    )


def _logreg(n: int, d: int, classes: int, l2: float, seed: int, weights=None):
    X, y, X_test, y_test = _demo_like(n, d, seed, classes)
    model = LogisticRegression(l2=l2).fit(X, y, sample_weight=weights)
    return model, X_test, y_test


@pytest.mark.parametrize(
    ("classes", "l2", "damping"),
    [(2, 0.1, 0.0), (2, 1e-3, 0.0), (2, 1e-3, 0.05), (3, 0.01, 0.0)],
    ids=["binary-l2-0.1", "binary-l2-1e-3", "binary-damped", "3-class"],
)
def test_logistic_regression_shaped_like_the_demo(classes, l2, damping):
    # 60 points in 90-d: fewer points than features, as on the demo (1000 in 1280-d).
    model, X_test, y_test = _logreg(60, 90, classes, l2, seed=classes)
    reference = _reference(model, X_test, y_test, damping)
    for form in ("auto", "primal", "dual"):
        engine = InfluenceEngine(model, SolverConfig(damping=damping, exact_form=form))
        assert engine.solver.form == ("dual" if form == "auto" else form)
        _check_engine(engine, X_test, y_test, reference)


def test_sample_weights_and_more_points_than_features():
    # Weighted points (the dual's columns scale by √w_j) ...
    weights = np.random.default_rng(4).choice([1.0, 2.0, 3.0], size=60)
    model, X_test, y_test = _logreg(60, 90, 2, 0.01, seed=4, weights=weights)
    reference = _reference(model, X_test, y_test)
    for form in ("primal", "dual"):
        engine = InfluenceEngine(model, SolverConfig(exact_form=form))
        _check_engine(engine, X_test, y_test, reference)
    # ... and points left out (weight 0, as retraining does), which enter neither form's
    # Hessian; the corrected estimates are not defined for them, the first order is.
    weights[[3, 17, 40]] = 0.0
    model, X_test, y_test = _logreg(60, 90, 2, 0.01, seed=5, weights=weights)
    expected = _reference_first_order(model, X_test, y_test)
    for form in ("primal", "dual"):
        engine = InfluenceEngine(model, SolverConfig(exact_form=form))
        scores = engine.influence_scores(X_test, y_test, estimate="first_order")
        _assert_rows_close(scores, expected, f"first order, {form}, zero weights")
    # More points than features: the primal form is the one taken.
    model, X_test, y_test = _logreg(90, 30, 2, 0.01, seed=6)
    engine = InfluenceEngine(model)
    assert engine.solver.form == "primal"
    _check_engine(engine, X_test, y_test, _reference(model, X_test, y_test))


def _reference_first_order(model, X_test, y_test) -> np.ndarray:
    features, labels = model.features_, model.labels_
    n = features.shape[0]
    factors = model.example_hessian_factors(features, labels)[:, 0, 0]
    hessian = (features.T * (model.sample_weight_ * factors**2 / n)) @ features
    hessian += model.l2 * torch.eye(features.shape[1], dtype=torch.float64)
    train_grads = model.per_example_gradients(features, labels)
    test_grads = model.per_example_gradients(model.transform(X_test), y_test)
    solved = torch.cholesky_solve(train_grads.T, torch.linalg.cholesky(hessian))
    return (test_grads @ solved).numpy() / n


@pytest.mark.parametrize("classes", [2, 3])
def test_kernel_svm(classes):
    rng = np.random.default_rng(10 + classes)
    X = np.tanh(rng.normal(size=(50, 20)))
    y = (X[:, :classes].argmax(1) if classes > 2 else (X[:, 0] + X[:, 1] > 0)).astype(np.int64)
    X_test = np.tanh(rng.normal(size=(10, 20)))
    y_test = (
        X_test[:, :classes].argmax(1) if classes > 2 else (X_test[:, 0] + X_test[:, 1] > 0)
    ).astype(np.int64)
    model = KernelSVM(gamma=0.05, l2=1e-2, temperature=0.1).fit(X, y)
    engine = InfluenceEngine(model)
    # The SVM's features are the rows of the kernel's Cholesky factor (n columns): with two
    # classes n·r = n = p, the primal form; with C the factor has rank C - 1, n·(C - 1) < n·C = p,
    # the dual form.
    assert engine.solver.form == ("primal" if classes == 2 else "dual")
    _check_engine(engine, X_test, y_test, _reference(model, X_test, y_test))


def test_dual_form_is_refused_where_it_does_not_apply():
    model, _, _ = _logreg(90, 30, 2, 0.01, seed=7)
    with pytest.raises(InfluenceExplorerError, match="fewer data-term columns"):
        ExactSolver(model, form="dual")
    with pytest.raises(InfluenceExplorerError, match="exact_form"):
        SolverConfig(exact_form="sideways")
    # The dual form still offers the primal factor, formed when asked for.
    model, _, _ = _logreg(40, 60, 2, 0.01, seed=8)
    solver = ExactSolver(model)
    assert solver.form == "dual"
    hessian = model.hessian()
    torch.testing.assert_close(solver.cholesky @ solver.cholesky.T, hessian, rtol=1e-12, atol=1e-12)
    v = torch.randn(model.n_params_, 3, dtype=torch.float64)
    torch.testing.assert_close(
        solver.inverse_hvp(v), torch.linalg.solve(hessian, v), rtol=1e-10, atol=1e-12
    )
    # Every dense step was timed with the work it needs (what bench.peers sets against the
    # machine's limits): the dual's Gram matrix n²·d and factor n³/3, then the primal's on demand.
    costs = {stage.name: stage for stage in solver.stages.entries}
    assert costs["Gram matrix ΦΦᵀ (n x n), lower triangle"].flops == 40 * 40 * 60
    assert costs["Cholesky factor of M (n·r x n·r)"].flops == pytest.approx(40**3 / 3)
    assert costs["Cholesky factor of H (p x p)"].flops == pytest.approx(60**3 / 3)
    assert all(stage.seconds >= 0 and stage.bytes > 0 for stage in solver.stages.entries)


def test_linear_algebra_pieces_against_torch():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(70, 30, generator=generator, dtype=torch.float64)
    weights = torch.randn(70, generator=generator, dtype=torch.float64)
    weights[::5] = 0.0
    gram = weighted_gram(features, weights)
    torch.testing.assert_close(gram, features.T @ (features * weights[:, None]))
    assert torch.equal(gram, gram.T) and gram.is_contiguous()
    rows = row_gram(features)
    torch.testing.assert_close(rows, features @ features.T)
    assert torch.equal(rows, rows.T)
    spd = features.T @ features + torch.eye(30, dtype=torch.float64)
    factor, info = cholesky(spd)
    assert info == 0 and torch.equal(factor, factor.tril())
    torch.testing.assert_close(factor, torch.linalg.cholesky(spd))
    in_place = spd.clone()
    assert torch.equal(cholesky(in_place, overwrite=True)[0], factor)
    assert torch.equal(in_place, factor)  # factorised in the matrix's own memory
    torch.testing.assert_close(cholesky_inverse(factor), torch.linalg.inv(spd))
    broken = spd.clone()
    broken[29, 3] = float("nan")
    assert cholesky(broken)[1] != 0
    assert cholesky(spd - 1e3 * torch.eye(30, dtype=torch.float64))[1] != 0


def test_a_serving_solvers_stage_log_keeps_only_its_latest_entries() -> None:
    # A server's solver answers queries for its lifetime; its log must not grow with them.
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    engine = InfluenceEngine(LogisticRegression(l2=0.1).fit(X, y))
    log = engine.solver.stages
    log.limit = 5
    for i in range(10):
        engine.influence_scores(X[i : i + 1], y[i : i + 1])
    assert len(log.entries) == 5
    assert all(entry.seconds >= 0 for entry in log.entries)


def _basis_stages(solver: ExactSolver) -> set[str]:
    return {stage.name for stage in solver.stages.entries if "class basis" in stage.name}


@pytest.mark.parametrize(
    ("classes", "damping", "weighted"),
    [(3, 0.0, False), (5, 0.0, True), (4, 0.05, False)],
    ids=["3-class", "5-class-weighted", "4-class-damped"],
)
def test_multiclass_primal_in_the_class_basis(classes, damping, weighted):
    # More points than features: the primal form, which a softmax model forms and factorises
    # in the class basis (d·(C - 1) coordinates plus λ along the all-ones class direction).
    weights = np.random.default_rng(classes).choice([1.0, 2.0], size=120) if weighted else None
    model, X_test, y_test = _logreg(120, 16, classes, 0.01, seed=20 + classes, weights=weights)
    reference = _reference(model, X_test, y_test, damping)
    engine = InfluenceEngine(model, SolverConfig(damping=damping))
    assert engine.solver.form == "primal"
    assert _basis_stages(engine.solver) == {
        "Hessian H in the class basis, symmetric rank-k updates",
        "Cholesky factor of H in the class basis (d·(C-1) square)",
    }
    _check_engine(engine, X_test, y_test, reference)
    # The forms formed the class basis's inverse, which the solver keeps in place of its
    # factor; the solves below and in _check_engine's later calls read it.
    assert engine.solver._basis.factor is None
    assert "inverse Hessian times columns in the class basis" in _basis_stages(engine.solver)
    # The same operator as the full Hessian's factor, which is still offered on demand.
    hessian = model.hessian()
    hessian.diagonal().add_(damping)
    v = torch.randn(
        model.n_params_, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(
        engine.solver.inverse_hvp(v), torch.linalg.solve(hessian, v), rtol=1e-10, atol=1e-13
    )
    torch.testing.assert_close(
        engine.solver.cholesky @ engine.solver.cholesky.T, hessian, rtol=1e-12, atol=1e-13
    )
    # The forms Q_j = (φ_j ⊗ I)ᵀ H⁻¹ (φ_j ⊗ I) whole, their all-ones direction included (the
    # estimates only see them through factors orthogonal to it).
    features = model.features_
    d = features.shape[1]
    units = torch.kron(features, torch.eye(classes, dtype=torch.float64))  # rows φ_j ⊗ e_a
    expected = torch.linalg.solve(hessian, units.T).T.reshape(-1, classes, d * classes)
    expected = torch.einsum("jap,jbp->jab", expected, units.reshape(-1, classes, d * classes))
    torch.testing.assert_close(
        engine.solver.unit_quadratic_forms(), expected, rtol=1e-10, atol=1e-13
    )
    # The test points' unit columns projected onto every training point, all-ones part too.
    test_features = model.transform(X_test)
    test_units = torch.kron(test_features, torch.eye(classes, dtype=torch.float64))
    solved = torch.linalg.solve(hessian, test_units.T)  # (p, m·C), column t·C + b
    expected = torch.einsum("jap,pk->kja", units.reshape(-1, classes, d * classes), solved)
    torch.testing.assert_close(
        engine.solver.project_units(test_features), expected, rtol=1e-10, atol=1e-13
    )
    # The forms above kept the class basis's inverse: test points read it instead of solving
    # with the factor (an upload's explanation), with the same projections.
    assert engine.solver._basis_inverse is not None
    read = "inverse Hessian times unit columns in the class basis"
    before = sum(stage.name == read for stage in engine.solver.stages.entries)
    m, n = len(test_features), features.shape[0]
    per_test = expected.view(m, classes, n, classes)
    for rows in (slice(0, 1), slice(1, 5)):
        torch.testing.assert_close(
            engine.solver.project_units(test_features[rows]),
            per_test[rows].reshape(-1, n, classes),
            rtol=1e-10,
            atol=1e-13,
        )
    assert sum(stage.name == read for stage in engine.solver.stages.entries) == before + 2
    # A caller's own Hessian takes the full factor, with the same scores.
    full = InfluenceEngine(model, SolverConfig(damping=damping))
    full.solver = ExactSolver(model, damping=damping, hessian=model.hessian())
    assert not _basis_stages(full.solver)
    _check_engine(full, X_test, y_test, reference)


def test_class_basis_hessian_is_the_rotated_hessian():
    model, _, _ = _logreg(80, 12, 4, 0.02, seed=30)
    basis = model.class_basis_hessian()
    q = basis.rotation
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(q[:, -1], torch.full((4,), 0.5, dtype=torch.float64))
    # TᵀHT with T = I_d ⊗ Q: the first C - 1 class columns are the matrix, the last λI, and
    # nothing couples them.
    t = torch.kron(torch.eye(12, dtype=torch.float64), q)
    rotated = (t.T @ model.hessian() @ t).view(12, 4, 12, 4)
    torch.testing.assert_close(
        rotated[:, :3, :, :3].reshape(36, 36), basis.matrix, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        rotated[:, 3, :, 3], 0.02 * torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-14
    )
    assert float(rotated[:, :3, :, 3].abs().max()) < 1e-14
    # Binary models (one score column) have no class basis; nor a loss that is not
    # shift-invariant (checked on the losses themselves).
    binary, _, _ = _logreg(40, 6, 2, 0.02, seed=31)
    assert binary.class_basis_hessian() is None
    assert model.loss_.shift_invariant and not binary.loss_.shift_invariant


def test_multiclass_kernel_svm_in_the_class_basis():
    rng = np.random.default_rng(40)
    X = np.tanh(rng.normal(size=(45, 20)))
    y = X[:, :3].argmax(1).astype(np.int64)
    X_test = np.tanh(rng.normal(size=(8, 20)))
    y_test = X_test[:, :3].argmax(1).astype(np.int64)
    model = KernelSVM(gamma=0.05, l2=1e-2, temperature=0.1).fit(X, y)
    engine = InfluenceEngine(model, SolverConfig(exact_form="primal"))
    assert _basis_stages(engine.solver)
    _check_engine(engine, X_test, y_test, _reference(model, X_test, y_test))


def test_an_engine_with_cached_forms_keeps_the_inverse_only_where_it_is_cheap(monkeypatch):
    # Many points and few features: S' costs little next to building H, so an engine given
    # cached forms forms it too; where the share allows none, it keeps the factor and solves.
    # Both give the scores of the engine that formed the forms.
    import core.influence

    model, X_test, y_test = _logreg(900, 6, 4, 0.01, seed=41)
    cold = InfluenceEngine(model, SolverConfig())
    expected = cold.score_estimates(X_test, y_test)
    assert cold.solver._basis.factor is None and cold.quadratic_forms is not None
    forms = cold.quadratic_forms.numpy()
    v = torch.randn(model.n_params_, 3, dtype=torch.float64)

    monkeypatch.setattr(core.influence, "KEEP_INVERSE_SHARE", 0.0)
    solving = InfluenceEngine(model, SolverConfig())
    assert solving.provide_quadratic_forms(forms)
    assert solving.solver._basis.factor is not None and solving.solver._basis_inverse is None
    solved = solving.solver.inverse_hvp(v)
    monkeypatch.undo()

    warm = InfluenceEngine(model, SolverConfig())
    assert warm.provide_quadratic_forms(forms)
    assert warm.solver._basis.factor is None and warm.solver._basis_inverse is not None
    torch.testing.assert_close(warm.solver.inverse_hvp(v), solved, rtol=1e-12, atol=1e-14)
    for engine in (solving, warm):
        got = engine.score_estimates(X_test, y_test)
        for estimate in ("first_order", "corrected", "margin"):
            torch.testing.assert_close(
                torch.as_tensor(got[estimate]),
                torch.as_tensor(expected[estimate]),
                rtol=1e-10,
                atol=1e-13,
            )
    # A binary model has no class basis: nothing to keep.
    binary, _, _ = _logreg(200, 6, 2, 0.01, seed=42)
    assert not InfluenceEngine(binary, SolverConfig()).solver.keep_inverse()
