"""Fragility lab: the network objective's derivatives against torch.func, the solvers and the
eigenvalue estimate on it, batched retraining, a tiny grid end to end, the results file and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from core.cli import main
from core.errors import InfluenceExplorerError
from core.fragility import (
    FragilityConfig,
    GroundTruthConfig,
    Setting,
    SolverSettings,
    TrainingConfig,
    correlation_series,
    load_results,
    results_from_dict,
    results_to_dict,
    run_fragility,
    run_setting,
    save_results,
    solver_comparison,
)
from core.influence import (
    CGSolver,
    ExactSolver,
    InfluenceEngine,
    LiSSASolver,
    SolverConfig,
    make_solver,
)
from core.linalg import lanczos_spectrum, spectrum_from_hessian
from core.networks import (
    Architecture,
    NetworkObjective,
    ParameterLayout,
    SGDSchedule,
    build_network,
    torch_threads,
    train_sgd,
)


@pytest.fixture(autouse=True)
def one_torch_thread_and_a_fixed_seed():
    """These networks are tiny: OpenMP threads cost far more than they bring (as in the CLI).
    The seed makes the random test vectors, and so LiSSA's error, the same on every run."""
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture
def make_network_problem():
    """Factory: make_network_problem(n, size, depth, width, seed) -> (network, X, y)."""

    def make(n: int = 16, size: int = 6, depth: int = 2, width: int = 2, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        X = torch.rand(n, 1, size, size, generator=generator) * 2 - 1
        y = (X.mean((1, 2, 3)) + 0.1 * torch.randn(n, generator=generator) > 0).long()
        network = build_network(Architecture(depth, width), (size, size, 1), 2, seed=seed)
        return network, X, y

    return make


def _objective_by_hand(network, X, y, l2):
    """R(θ) over the flat parameters, written directly with functional_call."""
    net64 = build_network(network.architecture, (X.shape[2], X.shape[3], 1), 2, seed=0).double()
    layout = ParameterLayout(net64)
    X64 = X.double()
    sign = (2 * y - 1).double()

    def objective(theta, rows=None):
        xs, ss = (X64, sign) if rows is None else (X64[rows], sign[rows])
        scores = functional_call(net64, layout.unflatten(theta), (xs,))[:, 0]
        return torch.nn.functional.softplus(-ss * scores).mean() + 0.5 * l2 * theta @ theta

    return objective, ParameterLayout(network).flatten(network)


def test_hvp_and_hessian_match_torch_func_hessian(make_network_problem):
    network, X, y = make_network_problem()
    objective = NetworkObjective(network, X, y, l2=0.01)
    by_hand, theta = _objective_by_hand(network, X, y, 0.01)
    expected = torch.func.hessian(by_hand)(theta)
    torch.testing.assert_close(objective.hessian(), expected, rtol=1e-9, atol=1e-11)
    v = torch.randn(objective.n_params_, 3, dtype=torch.float64)
    torch.testing.assert_close(objective.hvp(v), expected @ v, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(objective.hvp(v[:, 0]), expected @ v[:, 0], rtol=1e-9, atol=1e-11)
    rows = torch.tensor([1, 4, 5, 9])
    batch = torch.func.hessian(lambda t: by_hand(t, rows))(theta)
    torch.testing.assert_close(objective.hvp(v, rows), batch @ v, rtol=1e-9, atol=1e-11)
    assert objective.objective() == pytest.approx(float(by_hand(theta)), rel=1e-12)


def test_softmax_network_hessian_matches_torch_func(make_network_problem):
    network, X, _ = make_network_problem(n=12)
    y = torch.arange(12) % 3
    network = build_network(Architecture(1, 2), (6, 6, 1), 3, seed=1)
    objective = NetworkObjective(network, X, y, l2=0.01)
    layout = ParameterLayout(network)
    net64 = build_network(Architecture(1, 2), (6, 6, 1), 3, seed=1).double()

    def by_hand(theta):
        scores = functional_call(net64, layout.unflatten(theta), (X.double(),))
        loss = torch.nn.functional.cross_entropy(scores, y)
        return loss + 0.5 * 0.01 * theta @ theta

    expected = torch.func.hessian(by_hand)(layout.flatten(network))
    torch.testing.assert_close(objective.hessian(), expected, rtol=1e-9, atol=1e-11)


def test_per_example_gradients_average_to_the_objective_gradient(make_network_problem):
    network, X, y = make_network_problem()
    objective = NetworkObjective(network, X, y, l2=0.05)
    gradients = objective.per_example_gradients(X, y)
    assert gradients.shape == (X.shape[0], objective.n_params_)
    torch.testing.assert_close(
        gradients.mean(0) + 0.05 * objective.theta_, objective.objective_gradient()
    )


def test_the_engine_scores_a_network_as_the_formula_says(make_network_problem):
    """One engine for convex models and networks: first-order scores of a CNN's objective equal
    (1/n) ∇ℓ_jᵀ (H + δI)⁻¹ ∇ℓ_test with everything from torch.func, δ from the damping margin."""
    network, X, y = make_network_problem(n=14, depth=2, width=2, seed=5)
    objective = NetworkObjective(network, X, y, l2=0.0)
    by_hand, theta = _objective_by_hand(network, X, y, 0.0)
    hessian = torch.func.hessian(by_hand)(theta)
    smallest = float(torch.linalg.eigvalsh(hessian)[0])
    assert smallest < 0, "an untrained network's Hessian should be indefinite"
    engine = InfluenceEngine(objective, SolverConfig(damping_margin=0.05))
    damping = -smallest + 0.05
    assert engine.solver.damping == pytest.approx(damping, rel=1e-9)
    assert engine.estimates == ("first_order",)

    net64 = build_network(network.architecture, (6, 6, 1), 2, seed=0).double()
    layout = ParameterLayout(net64)

    def loss_of(theta_, x, label):
        score = functional_call(net64, layout.unflatten(theta_), (x[None].double(),))[0, 0]
        return torch.nn.functional.softplus(-(2 * label - 1) * score)

    gradients = torch.stack([torch.func.grad(loss_of)(theta, X[i], y[i]) for i in range(len(y))])
    test_rows = [2, 7]
    s_test = torch.linalg.solve(
        hessian + damping * torch.eye(len(theta), dtype=torch.float64), gradients[test_rows].T
    )
    expected = (gradients @ s_test).T / len(y)
    scores = engine.influence_scores(X[test_rows], y[test_rows], estimate="first_order")
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-8, atol=1e-12)

    cg = InfluenceEngine(objective, SolverConfig(method="cg", damping=damping, cg_tol=1e-12))
    np.testing.assert_allclose(
        cg.influence_scores(X[test_rows], y[test_rows], estimate="first_order"),
        expected.numpy(),
        rtol=1e-7,
        atol=1e-12,
    )
    with pytest.raises(InfluenceExplorerError, match="first_order"):
        engine.influence_scores(X[test_rows], y[test_rows], estimate="corrected")


def test_damping_margin_by_lanczos_for_the_iterative_solvers(make_network_problem):
    network, X, y = make_network_problem(n=14, depth=2, width=2, seed=5)
    objective = NetworkObjective(network, X, y, l2=0.0)
    exact = spectrum_from_hessian(objective.hessian())
    solver = make_solver(
        objective, SolverConfig(method="cg", damping_margin=0.05, lanczos_iterations=200)
    )
    assert solver.spectrum is not None and solver.spectrum.method == "lanczos"
    # With a full Krylov space Lanczos finds λ_min, so the damped Hessian's smallest eigenvalue
    # is the margin.
    assert solver.damping == pytest.approx(-exact.smallest + 0.05, rel=1e-6)


def test_last_layer_scope_is_the_head_block_of_the_hessian(make_network_problem):
    network, X, y = make_network_problem()
    full = NetworkObjective(network, X, y, l2=0.01).hessian()
    last = NetworkObjective(network, X, y, l2=0.01, scope="last")
    p_head = last.n_params_
    assert p_head == network.head.weight.numel() + network.head.bias.numel()
    # The head's parameters come last in named_parameters order.
    torch.testing.assert_close(last.hessian(), full[-p_head:, -p_head:], rtol=1e-9, atol=1e-11)
    assert float(torch.linalg.eigvalsh(last.hessian())[0]) >= 0.01 - 1e-9  # convex + λ


def test_lanczos_extreme_eigenvalues_match_eigvalsh(make_network_problem):
    network, X, y = make_network_problem(depth=2, width=3, seed=3)
    objective = NetworkObjective(network, X, y, l2=0.0)
    exact = spectrum_from_hessian(objective.hessian())
    assert exact.smallest < 0, "an untrained network's Hessian should be indefinite"
    full = lanczos_spectrum(objective.hvp, objective.n_params_, objective.n_params_)
    assert full.smallest == pytest.approx(exact.smallest, rel=1e-6, abs=1e-9)
    assert full.largest == pytest.approx(exact.largest, rel=1e-6)
    short = lanczos_spectrum(objective.hvp, objective.n_params_, 30)
    # Ritz values lie inside the spectrum and the extremes converge first.
    assert exact.smallest - 1e-9 <= short.smallest <= 0.5 * exact.smallest
    assert short.largest == pytest.approx(exact.largest, rel=1e-3)


def test_exact_cg_and_lissa_solve_the_damped_network_hessian(make_network_problem, report):
    network, X, y = make_network_problem(n=24)
    objective = NetworkObjective(network, X, y, l2=0.01)
    smallest = spectrum_from_hessian(objective.hessian()).smallest
    damping = max(0.0, -smallest) + 0.2
    v = torch.randn(objective.n_params_, 2, dtype=torch.float64)
    exact = ExactSolver(objective, damping).inverse_hvp(v)
    damped = objective.hessian() + damping * torch.eye(objective.n_params_, dtype=torch.float64)
    torch.testing.assert_close(damped @ exact, v, rtol=1e-9, atol=1e-10)
    cg = CGSolver(objective, damping, tol=1e-10).inverse_hvp(v)
    torch.testing.assert_close(cg, exact, rtol=1e-7, atol=1e-9)
    lissa = LiSSASolver(objective, damping, depth=200, batch_size=16, repeats=2, seed=0)
    error = float((lissa.inverse_hvp(v) - exact).norm() / exact.norm())
    report(f"LiSSA vs exact on a tiny CNN (damping {damping:.3g}): relative error {error:.3f}")
    # Converged in depth (contraction 0.85 per step); what is left is minibatch noise.
    assert error < 0.2


def test_batched_sgd_uses_common_random_numbers(make_network_problem):
    network, X, y = make_network_problem(n=20)
    theta0 = ParameterLayout(network).flatten(network, torch.float32)
    weights = torch.ones(3, 20)
    weights[2, 7] = 0.0
    schedule = SGDSchedule(epochs=3, batch_size=5, learning_rate=0.1, momentum=0.9)
    thetas = train_sgd(network, theta0[None].repeat(3, 1), X, y, weights, 0.01, schedule, seed=4)
    again = train_sgd(network, theta0[None].repeat(3, 1), X, y, weights, 0.01, schedule, seed=4)
    torch.testing.assert_close(thetas, again, rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(thetas[0], thetas[1], rtol=0, atol=1e-6)  # same weights, same run
    assert float((thetas[2] - thetas[0]).norm()) > 1e-4  # removing a point changes the run
    assert float((thetas[0] - theta0).norm()) > 1e-3


def test_configs_check_their_fields():
    with pytest.raises(InfluenceExplorerError, match="depth"):
        Architecture(0, 4)
    with pytest.raises(InfluenceExplorerError, match="activation"):
        Architecture(1, 4, "sigmoid")
    with pytest.raises(InfluenceExplorerError, match="solvers"):
        SolverSettings(solvers=("newton",))
    with pytest.raises(InfluenceExplorerError, match="retrain_fraction"):
        GroundTruthConfig(retrain_fraction=0.0)
    with pytest.raises(InfluenceExplorerError, match="weight_decays"):
        FragilityConfig(weight_decays=(-1.0,))
    with pytest.raises(InfluenceExplorerError, match="architecture"):
        Setting("cnn", 1e-3)
    assert hash(FragilityConfig.quick()) == hash(FragilityConfig.quick())  # a cache key


#: A grid small enough for the test run: 7x7 pixels, 200 images, two 2-channel CNNs.
TINY = FragilityConfig(
    n_train=200,
    image_size=7,
    architectures=(Architecture(1, 2), Architecture(2, 2)),
    weight_decays=(1e-2, 0.0),
    training=TrainingConfig(epochs=20),
    ground_truth=GroundTruthConfig(top_k=8, seeds=2),
    influence=SolverSettings(lissa_depth=100),
)


@pytest.fixture(scope="module")
def tiny_results():
    stages = []
    results = run_fragility(TINY, lambda done, total, stage: stages.append((done, total)))
    return results, stages


def test_tiny_grid_table_has_the_papers_shape(tiny_results, report):
    results, stages = tiny_results
    table = results.table()
    # Rows: two convex models, then each CNN with each solver; columns: 2 test points x 2 λ.
    assert table.shape == (2 + 2 * 3, 4)
    assert [r.label for r in table.rows[:2]] == [
        "Logistic regression (pixels)",
        "RBF SVM (pixels)",
    ]
    assert table.columns == (
        ("high_loss", 1e-2),
        ("high_loss", 0.0),
        ("median_loss", 1e-2),
        ("median_loss", 0.0),
    )
    text = table.to_text()
    assert "high-loss test point" in text and "CNN d2 w2 · LiSSA" in text
    report("tiny fragility grid:\n" + text)
    for row in table.rows[:2]:
        for (_, wd), cell in zip(table.columns, row.cells, strict=True):
            if wd > 0:
                assert cell.pearson >= 0.95, (row.label, cell)
    for row in table.rows[2:]:
        for cell in row.cells:
            assert math.isfinite(cell.pearson) and -1 <= cell.pearson <= 1
            assert math.isfinite(cell.spearman) and -1 <= cell.spearman <= 1
    assert stages and all(0 <= d <= t for d, t in stages) and stages[-1][0] == stages[-1][1]


def test_tiny_grid_reports_damping_curvature_and_ground_truth(tiny_results):
    results, _ = tiny_results
    for s in results.settings:
        if s.model != "cnn":
            continue
        curvature = s.curvature[0]
        assert curvature.method == "eigvalsh" and curvature.n_params == s.n_params
        for r in s.solvers:
            assert r.damping == pytest.approx(max(0.0, -curvature.smallest_eigenvalue) + 0.01)
            for p in r.points:
                assert len(p.predicted) == len(p.actual) == 8
        assert s.solver("cg").points[0].relative_error < 1e-4
        assert s.ground_truth.n_retrained >= 8 and len(s.ground_truth.seed_pearson) == 2
    # The convex models without weight decay have no finite optimum on these pixels.
    assert any(s.skipped for s in results.settings if s.model != "cnn")


def test_results_file_round_trips(tiny_results, tmp_path):
    results, _ = tiny_results
    path = save_results(results, tmp_path / "results.json")
    loaded = load_results(path)
    assert loaded.config == results.config
    assert loaded.table().to_text() == results.table().to_text()
    assert results_to_dict(loaded) == results_to_dict(results)
    damaged = json.loads(path.read_text())
    damaged["format_version"] = 99
    with pytest.raises(InfluenceExplorerError, match="format version"):
        results_from_dict(damaged)
    with pytest.raises(InfluenceExplorerError, match="No fragility results"):
        load_results(tmp_path / "missing.json")


def test_trust_page_views(tiny_results):
    results, _ = tiny_results
    series = correlation_series(results, "depth", solver="exact", test_point="high_loss")
    assert len(series) == 2  # one per weight decay
    assert all([p.x for p in s.points] == [1, 2] for s in series)
    assert correlation_series(results, "width") == ()  # one width only
    comparisons = solver_comparison(results, "lissa", "exact")
    assert len(comparisons) == 2 * 2 * 2  # networks x weight decays x test points
    assert all(-1 <= c.score_pearson <= 1 for c in comparisons)
    records = results.records()
    assert {"depth", "width", "solver", "test_point", "pearson"} <= set(records[0])


def test_run_setting_reports_progress():
    config = dataclasses.replace(TINY, ground_truth=GroundTruthConfig(top_k=5, seeds=1))
    seen = []
    result = run_setting(
        Setting("cnn", 1e-2, Architecture(1, 2)),
        dataclasses.replace(config, influence=SolverSettings(solvers=("exact",))),
        progress=lambda done, total, stage: seen.append((done, total, stage)),
    )
    assert [s.solver for s in result.solvers] == ["exact"]
    assert seen[-1][0] == seen[-1][1] and any("training" in s for _, _, s in seen)


def _tiny_cli_options(tmp_path):
    return [
        "--n-train", "100", "--image-size", "7", "--depths", "1", "--base-width", "2",
        "--weight-decays", "0.01", "--epochs", "10", "--top-k", "5", "--seeds", "1",
        "--lissa-depth", "50", "--quiet", "--output", str(tmp_path / "out.json"),
    ]  # fmt: skip


def test_cli_quick_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    status = main(["fragility", "--quick", "--json", *_tiny_cli_options(tmp_path)])
    assert torch.get_num_threads() == threads  # restored after the run
    assert status == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["results_file"] == str(tmp_path / "out.json")
    assert len(payload["table"]["columns"]) == 2
    labels = [row["model"] for row in payload["table"]["rows"]]
    assert labels[0] == "Logistic regression (pixels)" and "CNN d1 w2 · exact" in labels
    assert load_results(tmp_path / "out.json").config.n_train == 100


def test_cli_human_report(tmp_path, capsys):
    options = _tiny_cli_options(tmp_path)
    status = main(["fragility", "--quick", "--solvers", "exact", "--no-convex", *options])
    assert status == 0
    out = capsys.readouterr().out
    assert "Pearson / Spearman" in out and "damping" in out and "CNN d1 w2 · exact" in out


@pytest.mark.parametrize(
    "options, message",
    [
        (["--solvers", "newton"], "solvers are"),
        (["--weight-decays", "a,b"], "numbers"),
        (["--depths", "x"], "integers"),
        (["--classes", "Shirt"], "at least two"),
    ],
)
def test_cli_rejects_bad_options(options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fragility", "--quick", *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--depths", "0"], "depth"),
        (["--weight-decays", "-1"], "weight_decays"),
        (["--classes", "Shirt,Nope"], "No class named"),
        (["--threads", "0"], "threads"),
    ],
)
def test_cli_reports_bad_values_with_status_2(options, message, tmp_path, capsys):
    status = main(["fragility", "--quick", "--output", str(tmp_path / "x.json"), *options])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bundled_results_load_when_present():
    from core.fragility import bundled_results_path

    path = bundled_results_path()
    if not path.exists():
        pytest.skip("docs/fragility-results.json not generated yet")
    results = load_results(path)
    assert results.table().shape[1] == 2 * len(results.config.weight_decays)
    assert np.isfinite([r["pearson"] for r in results.records()]).any()
