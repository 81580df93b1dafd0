"""Leave-one-out ground truth: influence estimates against actual retraining on problems of
realistic shape (n of a few hundred, d comparable to n, weak regularisation)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from core.errors import InfluenceExplorerError
from core.influence import InfluenceEngine
from core.models import KernelSVM, LogisticRegression
from core.validation import agreement, loo_retrain, retrain_without, verify


def _check_and_report(name, results, report):
    for r in results:
        report(
            f"LOO {name} test#{r.test_position} (top {r.agreement['margin'].n}, retrain "
            f"{r.seconds:.1f}s): "
            + " | ".join(
                f"{e} Spearman {a.spearman:.4f} slope {a.slope:.3f}" for e, a in r.agreement.items()
            )
        )
        assert r.converged
        assert r.selected_by == "margin"
        assert set(r.agreement) == {"margin", "corrected", "first_order"}
        for estimate in ("margin", "corrected"):
            assert r.agreement[estimate].spearman >= 0.99
            assert 0.9 <= r.agreement[estimate].slope <= 1.1


def test_loo_binary_logistic_regression(make_logreg_problem, report):
    problem = make_logreg_problem(300, 300, seed=21)
    model = LogisticRegression(l2=1e-3).fit(problem.X, problem.y)
    results = verify(InfluenceEngine(model), problem.X_test[:3], problem.y_test[:3], k=50)
    _check_and_report("logreg binary n=300 d=300 λ=1e-3", results, report)


def test_loo_multiclass_logistic_regression(make_logreg_problem, report):
    problem = make_logreg_problem(240, 60, seed=22, n_classes=3)
    model = LogisticRegression(l2=1e-3).fit(problem.X, problem.y)
    results = verify(InfluenceEngine(model), problem.X_test[:2], problem.y_test[:2], k=50)
    _check_and_report("logreg 3-class n=240 d=60 λ=1e-3", results, report)


@pytest.mark.parametrize("temperature", [0.01, 0.001])
def test_loo_kernel_svm(make_svm_problem, report, temperature):
    problem = make_svm_problem(300, 100, seed=23)
    model = KernelSVM(gamma=0.1, l2=1e-3, temperature=temperature).fit(problem.X, problem.y)
    results = verify(InfluenceEngine(model), problem.X_test[:3], problem.y_test[:3], k=50)
    _check_and_report(f"kernel SVM n=300 D=100 t={temperature}", results, report)


def test_retrain_without_a_group_matches_a_direct_fit(make_logreg_problem):
    problem = make_logreg_problem(100, 10, seed=24)
    model = LogisticRegression(l2=1e-2).fit(problem.X, problem.y)
    group = np.array([3, 9, 41])
    result = retrain_without(model, [group], problem.X_test, problem.y_test)
    keep = np.setdiff1d(np.arange(100), group)
    n = 100
    direct = LogisticRegression(l2=1e-2 * n / len(keep)).fit(problem.X[keep], problem.y[keep])
    expected = direct.loss(problem.X_test, problem.y_test) - model.loss(
        problem.X_test, problem.y_test
    )
    np.testing.assert_allclose(result.actual[0], expected, rtol=1e-6, atol=1e-12)
    assert result.converged and result.iterations[0] >= 1


def test_loo_progress_and_each_point_retrained_once(make_logreg_problem, monkeypatch):
    problem = make_logreg_problem(80, 8, seed=25)
    model = LogisticRegression(l2=1e-2).fit(problem.X, problem.y)
    calls = []
    original = LogisticRegression.refit
    original_batch = LogisticRegression.refit_without

    def counting_refit(self, **kwargs):
        calls.append(1)
        return original(self, **kwargs)

    def counting_batch(self, groups, **kwargs):
        calls.extend([1] * len(groups))
        return original_batch(self, groups, **kwargs)

    # Retrains are solved together (refit_without), one at a time only where that fails.
    monkeypatch.setattr(LogisticRegression, "refit", counting_refit)
    monkeypatch.setattr(LogisticRegression, "refit_without", counting_batch)
    seen = []
    results = verify(
        InfluenceEngine(model),
        problem.X_test[:3],
        problem.y_test[:3],
        k=10,
        progress=lambda done, total: seen.append((done, total)),
    )
    union = np.unique(np.concatenate([r.train_indices for r in results]))
    assert len(calls) == len(union) < 30
    assert seen[-1] == (len(union), len(union))
    assert all(len(r.train_indices) == 10 for r in results)


def test_loo_retrain_refuses_bad_indices(make_logreg_problem):
    problem = make_logreg_problem(30, 4, seed=26)
    model = LogisticRegression(l2=1e-2).fit(problem.X, problem.y)
    with pytest.raises(InfluenceExplorerError, match="Training indices"):
        loo_retrain(model, [30], problem.X_test, problem.y_test)


def test_agreement_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 2.0 * x + 0.5 + rng.normal(scale=0.1, size=40)
    a = agreement(x, y)
    assert a.pearson == pytest.approx(stats.pearsonr(x, y).statistic)
    assert a.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    # slope: through the origin, Σxy/Σx² (what "predicted ≈ actual" means); the fitted line
    # keeps its own slope and intercept.
    assert a.slope == pytest.approx(float(x @ y / (x @ x)), rel=1e-12)
    fitted = stats.linregress(x, y)
    assert a.affine_slope == pytest.approx(fitted.slope) and a.intercept == pytest.approx(
        fitted.intercept
    )
    # An offset with the right slope is not agreement: the slope through the origin shows it.
    offset = agreement(np.abs(x) + 1.0, np.abs(x) + 3.0)
    assert offset.affine_slope == pytest.approx(1.0) and offset.slope > 1.5
    assert np.isnan(agreement([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).pearson)
