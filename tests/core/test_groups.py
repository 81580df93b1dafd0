"""Group influence: the three estimates against explicit formulas and against retraining,
k-means, and how groups are formed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import InfluenceExplorerError
from core.groups import (
    GROUP_ESTIMATES,
    GroupConfig,
    count_groups,
    group_experiment,
    kmeans,
    make_groups,
    predicted_params_change,
    size_count,
)
from core.influence import InfluenceEngine
from core.models import KernelSVM, LogisticRegression
from core.validation import retrain_without


@pytest.fixture
def logreg(make_logreg_problem):
    problem = make_logreg_problem(200, 20, seed=3)
    return LogisticRegression(l2=1e-2).fit(problem.X, problem.y), problem


@pytest.fixture
def softmax(make_logreg_problem):
    problem = make_logreg_problem(150, 8, seed=4, n_classes=3)
    return LogisticRegression(l2=1e-2).fit(problem.X, problem.y), problem


@pytest.fixture
def svm(make_svm_problem):
    problem = make_svm_problem(120, 30, seed=5)
    return KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(problem.X, problem.y), problem


def _explicit_group_hessian(model, group):
    """Σ_{j∈U} ∇²_θ ℓ_j by autodiff of each member's loss: independent of the closed-form factors."""
    d, c = model.features_.shape[1], model.n_outputs_
    total = torch.zeros(model.n_params_, model.n_params_, dtype=torch.float64)
    for j in group:
        phi, label = model.features_[j : j + 1], model.labels_[j : j + 1]

        def loss(theta, phi=phi, label=label):
            return model.loss_.value(phi @ theta.reshape(d, c), label)[0]

        total += torch.func.hessian(loss)(model.theta_)
    return total


@pytest.mark.parametrize("name", ["logreg", "softmax", "svm"])
def test_estimates_match_explicit_formulas(name, logreg, softmax, svm):
    model, _ = {"logreg": logreg, "softmax": softmax, "svm": svm}[name]
    engine = InfluenceEngine(model)
    n = model.n_train_
    group = np.array([1, 4, 9, 16, 25, 36, 49])
    H = model.hessian()
    A = _explicit_group_hessian(model, group)
    labels = model.labels_[group]
    g = model.per_example_gradients(model.features_[group], labels).sum(0)
    first = torch.linalg.solve(H, g) / n
    expected = {
        "first_order": first,
        "second_order": first + torch.linalg.solve(H, A @ first) / n,
        "corrected": torch.linalg.solve(H - A / n, g) / n,
    }
    got = predicted_params_change(engine, group)
    for estimate in GROUP_ESTIMATES:
        torch.testing.assert_close(got[estimate], expected[estimate], rtol=1e-8, atol=1e-12)


def test_first_order_group_is_the_sum_of_individual_scores(logreg):
    model, problem = logreg
    engine = InfluenceEngine(model)
    scores = engine.influence_scores(problem.X_test, problem.y_test, estimate="first_order")
    gradients = engine.test_gradients(problem.X_test, problem.y_test)
    rng = np.random.default_rng(0)
    for size in (1, 5, 40):
        group = rng.choice(model.n_train_, size=size, replace=False)
        delta = predicted_params_change(engine, group, ["first_order"])["first_order"]
        np.testing.assert_allclose(
            (gradients @ delta).numpy(), scores[:, group].sum(1), rtol=1e-9, atol=1e-13
        )


def test_singleton_group_corrected_is_the_engines_corrected_score(svm):
    model, problem = svm
    engine = InfluenceEngine(model)
    scores = engine.influence_scores(problem.X_test[:3], problem.y_test[:3], estimate="corrected")
    gradients = engine.test_gradients(problem.X_test[:3], problem.y_test[:3])
    for j in (0, 7, 50):
        delta = predicted_params_change(engine, [j], ["corrected"])["corrected"]
        np.testing.assert_allclose((gradients @ delta).numpy(), scores[:, j], rtol=1e-8)


def test_second_order_is_closer_to_actual_than_first_order(logreg, report):
    model, problem = logreg
    engine = InfluenceEngine(model)
    config = GroupConfig(sizes=(0.01, 0.05, 0.1, 0.25), groups_per_size=3, seed=1)
    scores = engine.influence_scores(problem.X_test[:1], problem.y_test[:1])[0]
    groups = make_groups(config, labels=problem.y, features=problem.X, scores=scores)
    result = group_experiment(engine, groups, problem.X_test, problem.y_test, test_position=0)
    assert result.converged
    linear = result.mean_absolute_error()
    at_params = result.mean_absolute_error(at_params=True)
    report(
        "groups (logreg n=200 d=20, {} groups): mean |error| first {:.2e}, second {:.2e}, "
        "corrected {:.2e}; at the predicted parameters {:.2e} / {:.2e} / {:.2e}".format(
            len(groups), *linear.values(), *at_params.values()
        )
    )
    assert linear["second_order"] < linear["first_order"]
    assert at_params["second_order"] < at_params["first_order"]
    assert at_params["corrected"] < at_params["second_order"]
    # Every estimate ranks the groups well; the first order under-estimates the large ones.
    for estimate in GROUP_ESTIMATES:
        assert result.agreement[estimate].spearman > 0.9
    largest = result.size_trend[-1]
    assert largest.ratio["first_order"] > largest.ratio["second_order"] > 1.0


def test_experiment_actuals_match_direct_refits(softmax):
    model, problem = softmax
    engine = InfluenceEngine(model)
    groups = make_groups(
        GroupConfig(kinds=("random", "class"), sizes=(0.1, 0.2), groups_per_size=1),
        labels=problem.y,
    )
    result = group_experiment(
        engine, groups, problem.X_test, problem.y_test, test_position=2, test_label=1
    )
    for i, group in enumerate(groups):
        weights = torch.ones(model.n_train_, dtype=torch.float64)
        weights[torch.as_tensor(group.indices)] = 0
        refit = model.refit(sample_weight=weights, tol=1e-11)
        loss = refit.loss(problem.X_test[2:3], [1])[0] - model.loss(problem.X_test[2:3], [1])[0]
        assert result.actual[i] == pytest.approx(loss, abs=1e-9)
        assert result.actual_test_accuracy[i] == pytest.approx(
            refit.accuracy(problem.X_test, problem.y_test)
        )
        test_loss = refit.loss(problem.X_test, problem.y_test) - model.loss(
            problem.X_test, problem.y_test
        )
        assert result.actual_test_loss[i] == pytest.approx(test_loss.mean(), abs=1e-9)
    assert result.base_test_accuracy == pytest.approx(
        model.accuracy(problem.X_test, problem.y_test)
    )
    assert set(result.agreement_by_kind) == {"random", "class"}
    assert [t.target_size for t in result.size_trend] == [15, 30]


def test_group_experiment_uses_retrain_without(logreg):
    model, problem = logreg
    engine = InfluenceEngine(model)
    groups = make_groups(GroupConfig(kinds=("random",), sizes=(0.05,)), labels=problem.y)
    result = group_experiment(engine, groups, problem.X_test, problem.y_test, test_position=0)
    direct = retrain_without(
        model, [g.indices for g in groups], problem.X_test[:1], problem.y_test[:1]
    )
    np.testing.assert_allclose(result.actual, direct.actual[:, 0], atol=1e-10)


def test_kmeans_is_deterministic_and_finds_separated_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.concatenate([c + rng.normal(scale=0.5, size=(30, 2)) for c in centres])
    first = kmeans(X, 3, seed=7)
    again = kmeans(X, 3, seed=7)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.centers, again.centers)
    truth = np.repeat(np.arange(3), 30)
    for blob in range(3):
        assert len(np.unique(first.labels[truth == blob])) == 1
    assert len(np.unique(first.labels)) == 3
    assert first.inertia == pytest.approx(
        sum(((X[first.labels == c] - first.centers[c]) ** 2).sum() for c in range(3))
    )


def test_kmeans_keeps_every_cluster_non_empty_and_refuses_bad_input():
    X = np.zeros((6, 2))
    X[3:] = 1.0  # only two distinct points for four clusters
    result = kmeans(X, 4, seed=0)
    assert sorted(np.bincount(result.labels, minlength=4) > 0) == [True] * 4
    with pytest.raises(InfluenceExplorerError, match="n_clusters"):
        kmeans(X, 7)
    with pytest.raises(InfluenceExplorerError, match="finite"):
        kmeans(np.full((3, 2), np.nan), 2)


def test_make_groups_kinds_and_sizes():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 100)
    features = rng.normal(size=(200, 3))
    scores = rng.normal(size=200)
    config = GroupConfig(
        kinds=("random", "class", "cluster", "helpful", "harmful"),
        sizes=(0.0025, 0.05, 0.25),
        groups_per_size=2,
        custom=(5, 3, 5),
        seed=3,
    )
    groups = make_groups(config, labels=labels, features=features, scores=scores)
    by_kind = {k: [g for g in groups if g.kind == k] for k in config.kinds}
    assert [g.size for g in by_kind["random"]] == [1, 1, 10, 10, 50, 50]
    assert all(len(np.unique(labels[g.indices])) == 1 for g in by_kind["class"])
    assert {int(labels[g.indices[0]]) for g in by_kind["class"]} == {0, 1}
    assert [g.target_size for g in by_kind["cluster"]] == [1, 1, 10, 10, 50, 50]
    assert set(by_kind["helpful"][1].indices) == set(np.argsort(-scores)[:10])
    assert set(by_kind["harmful"][2].indices) == set(np.argsort(scores)[:50])
    assert by_kind["custom"][0].indices.tolist() == [3, 5]
    for group in groups:
        assert np.all(np.diff(group.indices) > 0)
    again = make_groups(config, labels=labels, features=features, scores=scores)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(groups, again, strict=True))
    assert size_count(0.0025, 1000) == 2 and size_count(0.25, 1000) == 250


@pytest.mark.parametrize(
    ("config", "n"),
    [
        (GroupConfig(sizes=(0.0025, 0.05, 0.25), groups_per_size=2, custom=(5, 3)), 200),
        # Two fractions that round to the same size count once; a 1-point size has 200 clusters.
        (GroupConfig(kinds=("random", "cluster"), sizes=(0.001, 0.004), groups_per_size=3), 200),
        # Clusters of half the set: only 2 exist, though 4 per size were asked for.
        (GroupConfig(kinds=("cluster", "class"), sizes=(0.5,), groups_per_size=4), 40),
        (GroupConfig(kinds=("helpful", "harmful"), sizes=(0.01, 0.1)), 300),
        (GroupConfig(kinds=(), custom=(0, 1, 2)), 50),
    ],
)
def test_count_groups_says_how_many_groups_make_groups_forms(config, n):
    rng = np.random.default_rng(2)
    labels = np.arange(n) % 2
    groups = make_groups(
        config,
        labels=labels,
        features=rng.normal(size=(n, 3)),
        scores=rng.normal(size=n),
    )
    assert count_groups(config, n) == len(groups)


def test_bad_group_configs_are_refused():
    with pytest.raises(InfluenceExplorerError, match="kinds"):
        GroupConfig(kinds=("everything",))
    with pytest.raises(InfluenceExplorerError, match="sizes"):
        GroupConfig(sizes=(0.5, 1.5))
    with pytest.raises(InfluenceExplorerError, match="custom"):
        GroupConfig(kinds=("custom",))
    with pytest.raises(InfluenceExplorerError, match="groups_per_size"):
        GroupConfig(groups_per_size=0)
    with pytest.raises(InfluenceExplorerError, match="in \\[0, 10\\)"):
        make_groups(GroupConfig(kinds=(), custom=(3, 12)), labels=np.zeros(10))
    with pytest.raises(InfluenceExplorerError, match="scores"):
        make_groups(GroupConfig(kinds=("helpful",)), labels=np.zeros(10))
    assert hash(GroupConfig()) == hash(GroupConfig())


def test_cli_groups_returns_json(run_cli, capsys):
    status, payload, _ = run_cli(
        "groups",
        "--sizes",
        "0.1,0.25",
        "--groups-per-size",
        "1",
        "--indices",
        "0,1,2",
        capsys=capsys,
    )
    assert status == 0
    assert payload["n_train"] == 24 and payload["classes"] == ["T-shirt/top", "Shirt"]
    for key in ("svm", "logreg"):
        model = payload["models"][key]
        assert set(model["agreement"]) == set(GROUP_ESTIMATES)
        kinds = [g["kind"] for g in model["groups"]]
        assert kinds.count("custom") == 1 and kinds.count("random") == 2
        assert {"random", "class", "cluster", "helpful", "harmful"} <= set(kinds)
        assert [t["target_size"] for t in model["size_trend"]] == [2, 3, 6]
        assert model["converged"]


def test_cli_groups_refuses_bad_options(run_cli, capsys):
    for options, message in (
        (("--sizes", "0.1,2"), "sizes"),
        (("--kinds", "random,everything"), "--kinds"),
        (("--groups-per-size", "0"), "groups_per_size"),
        (("--indices", "1,x"), "--indices"),
        (("--test-index", "999"), "--test-index"),
    ):
        status, _, err = run_cli("groups", *options, capsys=capsys)
        assert status == 2, options
        assert message in err and err.startswith("influence groups: error:")
