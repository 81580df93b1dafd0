"""The fragility study's networks: the objective's derivatives against torch.func for every
family, float32 against float64, the solvers and the eigenvalue estimate on it, batched
retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from core.errors import InfluenceExplorerError
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
    # A network supports only the first-order estimate, so it is the engine's default; asking for
    # the Newton-corrected one names the estimate that works.
    np.testing.assert_array_equal(engine.influence_scores(X[test_rows], y[test_rows]), scores)
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


# ---------------------------------------------------------------------------- families
def test_lenet5_is_lecuns_network_on_28x28():
    """On 28x28 with ten classes LeNet-5 has its well-known 61,706 parameters; on 14x14 the
    second pooling is left out and the layers keep their widths."""
    network = build_network(Architecture.lenet5(), (28, 28, 1), 10, seed=0)
    assert ParameterLayout(network).n_params == 61_706
    small = build_network(Architecture.lenet5(), (14, 14, 1), 2, seed=0)
    assert small.body[6].in_features == 16 * 3 * 3  # conv2 gives 3x3, not pooled further
    assert small(torch.zeros(5, 1, 14, 14)).shape == (5, 1)
    with pytest.raises(InfluenceExplorerError, match="at least 12x12"):
        build_network(Architecture.lenet5(), (8, 8, 1), 2, seed=0)


def test_resnet_blocks_start_as_the_identity_and_have_no_batchnorm():
    network = build_network(Architecture.resnet(14, 2), (14, 14, 1), 2, seed=0)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.modules())
    blocks = [m for m in network.modules() if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 6  # (14 - 2) / 6 = 2 blocks per stage, three stages
    x = torch.randn(3, 2, 8, 8)
    first = blocks[0]
    torch.testing.assert_close(first(x), torch.relu(x))  # identity shortcut, zero branch
    widening = blocks[2]  # first block of stage two: stride 2, 2 -> 4 channels
    out = widening(x)
    assert out.shape == (3, 4, 4, 4)
    torch.testing.assert_close(out[:, :2], torch.relu(x[:, :, ::2, ::2]))
    assert float(out[:, 2:].detach().abs().max()) == 0.0
    assert network(torch.zeros(2, 1, 14, 14)).shape == (2, 1)
    assert Architecture.resnet(14, 2).label == "ResNet-14 w2"


@pytest.mark.parametrize(
    "architecture, size",
    [(Architecture.lenet5(width=1), 12), (Architecture.resnet(8, 1), 6)],
    ids=["lenet5", "resnet8"],
)
def test_new_families_hessian_vector_products_match_autograd(architecture, size):
    """The objective's HVPs (forward-over-reverse) for a narrow LeNet-5 and ResNet-8 against
    reverse-over-reverse autograd of the objective written by hand; the ResNet's (small) dense
    Hessian against torch.func.hessian."""
    torch.manual_seed(1)
    X = torch.rand(6, 1, size, size) * 2 - 1
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    network = build_network(architecture, (size, size, 1), 2, seed=2)
    with torch.no_grad():  # a trained-looking network: the residual branches are not zero
        for p in network.parameters():
            p.add_(0.3 * torch.randn_like(p))
    objective = NetworkObjective(network, X, y, l2=0.01)
    net64 = build_network(architecture, (size, size, 1), 2, seed=2).double()
    layout = ParameterLayout(net64)
    sign = (2 * y - 1).double()

    def by_hand(theta):
        scores = functional_call(net64, layout.unflatten(theta), (X.double(),))[:, 0]
        return torch.nn.functional.softplus(-sign * scores).mean() + 0.005 * theta @ theta

    theta = ParameterLayout(network).flatten(network)
    v = torch.randn(objective.n_params_, 2, dtype=torch.float64)
    expected = torch.stack(
        [torch.autograd.functional.hvp(by_hand, theta, v[:, i])[1] for i in range(2)], 1
    )
    torch.testing.assert_close(objective.hvp(v), expected, rtol=1e-8, atol=1e-10)
    if architecture.family == "resnet":
        assert objective.n_params_ < 400
        hessian = torch.func.hessian(by_hand)(theta)
        torch.testing.assert_close(objective.hessian(), hessian, rtol=1e-8, atol=1e-10)


def test_float32_objective_agrees_with_float64_to_single_precision(make_network_problem):
    network, X, y = make_network_problem(n=20, depth=2, width=3, seed=4)
    exact = NetworkObjective(network, X, y, l2=0.01)
    single = NetworkObjective(network, X, y, l2=0.01, dtype=torch.float32)
    v = torch.randn(exact.n_params_, 3, dtype=torch.float64)
    out = single.hvp(v)
    assert out.dtype == torch.float64 and single.theta_.dtype == torch.float64
    torch.testing.assert_close(out, exact.hvp(v), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        single.loss_gradients(X, y), exact.loss_gradients(X, y), rtol=1e-4, atol=1e-6
    )
    damping = max(0.0, -spectrum_from_hessian(exact.hessian()).smallest) + 0.1
    cg = InfluenceEngine(single, SolverConfig(method="cg", damping=damping, cg_tol=1e-5))
    reference = InfluenceEngine(exact, SolverConfig(method="cg", damping=damping, cg_tol=1e-10))
    np.testing.assert_allclose(
        cg.influence_scores(X[:2], y[:2], estimate="first_order"),
        reference.influence_scores(X[:2], y[:2], estimate="first_order"),
        rtol=1e-3,
        atol=1e-7,
    )
    with pytest.raises(InfluenceExplorerError, match="dtype"):
        NetworkObjective(network, X, y, l2=0.01, dtype=torch.float16)


def test_training_in_groups_of_copies_changes_nothing(make_network_problem, monkeypatch):
    """Copies are vmapped in groups that fit a memory budget; the grouping is invisible."""
    import core.networks as networks

    network, X, y = make_network_problem(n=20)
    theta0 = ParameterLayout(network).flatten(network, torch.float32)[None].repeat(5, 1)
    weights = torch.ones(5, 20)
    weights[torch.arange(1, 5), torch.tensor([3, 7, 11, 19])] = 0.0
    schedule = SGDSchedule(epochs=2, batch_size=5, learning_rate=0.1, momentum=0.9)
    together = train_sgd(network, theta0, X, y, weights, 0.01, schedule, seed=1)
    monkeypatch.setattr(networks, "TRAINING_ACTIVATION_BUDGET", 1)  # one copy per group
    apart = train_sgd(network, theta0, X, y, weights, 0.01, schedule, seed=1)
    torch.testing.assert_close(apart, together, rtol=1e-6, atol=1e-7)
