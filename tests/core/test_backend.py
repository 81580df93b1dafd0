"""core.backend without a cluster: the switch, and the sharded models and engine run shard by
shard in this process (LocalRunner) against the in-process path.

The same code runs on a Dask cluster in tests/core/test_backend_cluster.py; here every formula
is checked quickly, including the paths too slow to repeat over a cluster's round trips
(Newton-CG fits, LiSSA minibatches).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.backend import ENV_CLUSTER, ClusterSpec, cluster_spec
from core.backend.engine import ShardedInfluenceEngine
from core.backend.models import (
    ShardedLogisticRegression,
    ShardedNystroemSVM,
)
from core.backend.runner import LocalRunner, add_parts
from core.backend.shards import ArrayImages, ShardedData, extract_features, split_rows
from core.errors import ClusterError, InfluenceExplorerError, NonFiniteFeaturesError
from core.influence import (
    ExactSolver,
    InfluenceEngine,
    SolverConfig,
    top_k,
    top_k_by_magnitude,
)
from core.models import LogisticRegression, NystroemSVM
from core.store import ArtifactStore
from core.validation import verify

REPO = Path(__file__).resolve().parents[2]
#: Sharded and in-process results agree to this (relative to the largest value compared).
TOL = 1e-8


def assert_close(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected).max()), 1e-300)
    error = float(np.abs(actual - expected).max())
    assert error <= TOL * scale, f"{what}: max |difference| {error:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------- the switch
@pytest.mark.parametrize(
    "text, kind, workers, address",
    [
        ("local:2", "local", 2, None),
        (" local:16 ", "local", 16, None),
        ("tcp://10.0.0.5:8786", "remote", None, "tcp://10.0.0.5:8786"),
        ("tls://scheduler.example.org:8786", "remote", None, "tls://scheduler.example.org:8786"),
        ("tcp://[::1]:8786", "remote", None, "tcp://[::1]:8786"),
    ],
)
def test_cluster_spec_parses_the_three_forms(text, kind, workers, address):
    spec = ClusterSpec.parse(text)
    assert (spec.kind, spec.n_workers, spec.address) == (kind, workers, address)


@pytest.mark.parametrize(
    "text",
    ["local", "local:0", "local:-1", "local:x", "udp://h:1", "tcp://h", "tcp://h:99999", "8786"],
)
def test_cluster_spec_refuses_anything_else_naming_the_forms(text):
    with pytest.raises(ClusterError, match=r"local:N.*tcp://HOST:PORT.*tls://HOST:PORT"):
        ClusterSpec.parse(text)


def test_cluster_option_overrides_the_environment_and_unset_means_in_process():
    assert cluster_spec(None, {}) is None
    assert cluster_spec(None, {ENV_CLUSTER: "  "}) is None
    assert cluster_spec(None, {ENV_CLUSTER: "local:3"}) == ClusterSpec("local", n_workers=3)
    assert cluster_spec("tcp://h:1", {ENV_CLUSTER: "local:3"}).address == "tcp://h:1"
    with pytest.raises(ClusterError, match="--cluster='nope'"):
        cluster_spec("nope", {})
    with pytest.raises(ClusterError, match=f"{ENV_CLUSTER}='nope'"):
        cluster_spec(None, {ENV_CLUSTER: "nope"})


def test_unreachable_scheduler_is_a_clear_error_within_seconds():
    from core.backend.cluster import connect

    start = time.perf_counter()
    with pytest.raises(
        ClusterError, match=r"Could not reach the scheduler at tcp://127\.0\.0\.1:9"
    ):
        connect("tcp://127.0.0.1:9", timeout=3)
    assert time.perf_counter() - start < 30


def test_in_process_description_names_the_switch():
    from core.backend.cluster import IN_PROCESS, cluster_info

    assert cluster_info(None) is IN_PROCESS
    assert "INFLUENCE_CLUSTER" in IN_PROCESS.summary()
    assert IN_PROCESS.n_workers == 0


@pytest.mark.slow
def test_unset_runs_in_process_without_importing_dask(tiny_idx_dataset, tmp_path):
    # A fresh interpreter: nothing else in it has imported Dask.
    code = (
        "import sys\n"
        "from core.cli import main\n"
        f"status = main(['explain', '--dataset', {str(tiny_idx_dataset)!r}, '--test-index', '0',"
        f" '--cache-dir', {str(tmp_path)!r}, '--quiet', '--json', '--logreg-l2', '0.01'])\n"
        "assert status == 0, status\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_CLUSTER}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_cli_cluster_option_is_refused_by_commands_that_run_in_process(run_cli, capsys):
    status, _, err = run_cli("mislabel", "--cluster", "local:2", capsys=capsys)
    assert status == 2
    assert "--cluster works with precompute, explain, verify" in err


# ----------------------------------------------------------------------------- shards
def test_shards_split_locate_take_and_gather_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(103, 4)).astype(np.float32)
    y = rng.integers(0, 3, 103)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=8)
    assert data.sizes == tuple(b - a for a, b in split_rows(103, 8))
    assert data.shape == (103, 4) and data.dtype == "<f4" and data.label_range == (0, 2)
    picked = np.array([101, 3, 50, 3, 0])
    features, labels = data.rows(picked)
    np.testing.assert_array_equal(features, X[picked].astype(np.float64))
    np.testing.assert_array_equal(labels, y[picked])
    subset = data.take(picked, n_shards=2)
    np.testing.assert_array_equal(subset.gather(), X[picked].astype(np.float64))
    np.testing.assert_array_equal(subset.labels(), y[picked])
    np.testing.assert_array_equal(data[np.arange(103) % 2 == 0], X[::2].astype(np.float64))
    with pytest.raises(InfluenceExplorerError, match=r"in \[0, 103\)"):
        data.locate([103])


def test_shards_through_the_store_and_a_damaged_shard_is_named(tmp_path):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 2, 40)
    store = ArtifactStore(tmp_path)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=4, store=store)
    assert len(list(tmp_path.glob("shard-*.artifact"))) == 4
    np.testing.assert_array_equal(data.gather(), X.astype(np.float64))
    from core.backend.shards import _load_shard, make_shard, shard_key

    start, stop = split_rows(40, 4)[0]
    key = shard_key("arrays", 0, make_shard(start, X[start:stop], y[start:stop]))
    path = store.path_for(key)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InfluenceExplorerError, match=r"missing or damaged.*shared file system"):
        _load_shard(store, key, 0)


def test_features_computed_per_image_shard_are_written_to_the_store(tmp_path, monkeypatch):
    from core.backend import shards as shards_module
    from core.features import PixelFeaturizer

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(10, 5, 5, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, 10)
    store = ArtifactStore(tmp_path)
    data = extract_features(
        LocalRunner(),
        "pixels",
        [ArrayImages(images[:6]), ArrayImages(images[6:])],
        [labels[:6], labels[6:]],
        store=store,
        dataset_hash="test",
        part="train",
    )
    np.testing.assert_array_equal(data.gather(), PixelFeaturizer().transform(images))
    np.testing.assert_array_equal(data.labels(), labels)
    assert len(list(tmp_path.glob("features-*.artifact"))) == 2
    # A worker with a GPU computes there; without one on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert shards_module.worker_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert shards_module.worker_device() == "cpu"


def test_featurizer_on_an_explicit_cpu_device_gives_the_same_features():
    from core.features import get_featurizer

    featurizer = get_featurizer("efficientnet-lite0")
    images = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        featurizer.transform(images, device="cpu"), featurizer.transform(images)
    )


def test_add_parts_sums_nested_partials():
    total = add_parts((1.0, torch.ones(2)), (2.0, torch.full((2,), 3.0)))
    assert total[0] == 3.0 and torch.equal(total[1], torch.full((2,), 4.0))


# ----------------------------------------------------------------------------- models and engine
def _problem(n_classes: int, n: int = 1200, d: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, n_classes)) * 1.5
    X = (rng.normal(size=(n, d)) * 3 / np.sqrt(d)).astype(np.float32)
    y = (X @ W + rng.gumbel(size=(n, n_classes))).argmax(1)
    X_test = rng.normal(size=(6, d)) * 3 / np.sqrt(d)
    y_test = (X_test @ W).argmax(1)
    y_test[0] = (y_test[0] + 1) % n_classes  # a mistake among the test points
    return X, y, X_test, y_test


def _compare(reference, sharded, X_test, y_test, k=8, modes=("tasks", "sequential")):
    """θ, Hessian, every estimate's scores and top k, self-influence, leverages, parameter and
    output changes, and leave-one-out retraining agree."""
    assert_close(sharded.model.theta_, reference.model.theta_, "θ")
    assert_close(sharded.model.hessian(), reference.model.hessian(), "Hessian")
    assert sharded.estimates == reference.estimates == ("margin", "corrected", "first_order")
    assert sharded.default_estimate == reference.default_estimate == "margin"
    for estimate in sharded.estimates:
        expected = reference.influence_scores(X_test, y_test, estimate=estimate)
        assert_close(
            sharded.influence_scores(X_test, y_test, estimate=estimate), expected, estimate
        )
        found_rows = sharded.top_k_scores(X_test, y_test, k, estimate=estimate)
        for row, found in zip(expected, found_rows, strict=True):
            best = top_k(row, k)
            np.testing.assert_array_equal(found.top.helpful, best.helpful)
            np.testing.assert_array_equal(found.top.harmful, best.harmful)
            assert_close(found.top.helpful_scores, best.helpful_scores, "top-k scores")
            np.testing.assert_array_equal(found.by_magnitude, top_k_by_magnitude(row, k))
        assert_close(sharded.self_influence(estimate), reference.self_influence(estimate), "self")
    assert_close(sharded.leverage(), reference.leverage(), "leverage")
    assert_close(sharded.params_change([0, 5]), reference.params_change([0, 5]), "params")
    assert_close(
        sharded.predicted_output_changes(X_test),
        reference.predicted_output_changes(X_test),
        "output changes",
    )
    # The sharded retrains are one refit each, so the in-process ones are too (batched ones stop
    # elsewhere within the tolerance: tests/core/test_batched_retraining.py).
    expected = verify(reference, X_test[:2], y_test[:2], k=4, batched=False)
    for mode in modes:
        found = sharded.verify(X_test[:2], y_test[:2], k=4, mode=mode)
        for a, b in zip(found, expected, strict=True):
            np.testing.assert_array_equal(a.train_indices, b.train_indices)
            assert_close(a.actual, b.actual, f"leave-one-out ({mode})")
            for estimate in sharded.estimates:
                assert_close(a.predicted[estimate], b.predicted[estimate], f"verify {estimate}")
            assert a.selected_by == b.selected_by == "margin"
            assert a.converged


@pytest.mark.slow
@pytest.mark.parametrize("n_classes", [2, 4])
def test_sharded_logistic_regression_equals_in_process_shard_by_shard(n_classes):
    X, y, X_test, y_test = _problem(n_classes)
    reference = InfluenceEngine(LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y))
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=8)
    sharded = ShardedInfluenceEngine(ShardedLogisticRegression(l2=1e-2).fit(data, y))
    assert sharded.model.fit_info_.converged
    _compare(reference, sharded, X_test, y_test)


def _assert_within(actual, expected, tol: float, what: str) -> None:
    """|actual - expected| <= tol x the largest |expected| of the same test point (row), so a
    confidently classified point's tiny scores are compared on their own scale."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    rows_a, rows_e = np.atleast_2d(actual), np.atleast_2d(expected)
    for t, (a, e) in enumerate(zip(rows_a, rows_e, strict=True)):
        scale = max(float(np.abs(e).max()), 1e-300)
        error = float(np.abs(a - e).max())
        assert error <= tol * scale, f"{what}[{t}]: max |difference| {error:.3g} vs {scale:.3g}"


def _svm_problem(n_classes: int, n: int = 240, d: int = 12, seed: int = 11):
    rng = np.random.default_rng(seed)
    X = np.tanh(rng.normal(size=(n, d)))
    centres = rng.normal(size=(n_classes, d))
    y = (X @ centres.T + 0.3 * rng.normal(size=(n, n_classes))).argmax(1)
    X_test = np.tanh(rng.normal(size=(5, d)))
    X_test[0] = X[np.argmax(np.abs(X @ centres.T).max(1))]  # a confidently classified point
    y_test = (X_test @ centres.T).argmax(1)
    y_test[1] = (y_test[1] + 1) % n_classes  # a mistake
    return X, y, X_test, y_test


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_every_estimate_on_shards_equals_in_process(kind, n_classes):
    # The default "margin" estimate, the corrected and the first-order one, binary and 3-class,
    # for the softmax/sigmoid log-loss and the (Crammer-Singer) smooth hinge, whose loss is
    # curved on the scale of the output changes: scores, top k and self-influence to 1e-10.
    if kind == "logreg":
        X, y, X_test, y_test = _problem(n_classes, n=300, d=6, seed=12)
        reference = LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y)
        data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=5)
        model = ShardedLogisticRegression(l2=1e-2).fit(data)
    else:
        X, y, X_test, y_test = _svm_problem(n_classes)
        reference = NystroemSVM(n_components=60, gamma="median", seed=2).fit(X, y)
        data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=5)
        model = ShardedNystroemSVM(n_components=60, gamma="median", seed=2).fit(data)
        assert model.gamma_ == pytest.approx(reference.gamma_, rel=1e-12)
        assert model.platt_ == pytest.approx(reference.platt_, rel=1e-8)
    local, sharded = InfluenceEngine(reference), ShardedInfluenceEngine(model)
    assert sharded.estimates == local.estimates
    assert sharded.default_estimate == "margin"
    expected = local.score_estimates(X_test, y_test)
    found = sharded.score_estimates(X_test, y_test)
    given = sharded.score_estimates(X_test, y_test, features=reference.transform(X_test))
    for estimate in local.estimates:
        _assert_within(found[estimate], expected[estimate], 1e-10, estimate)
        _assert_within(given[estimate], expected[estimate], 1e-10, f"{estimate}, features given")
        alone = sharded.influence_scores(X_test, y_test, estimate=estimate)
        _assert_within(alone, expected[estimate], 1e-10, f"{estimate} alone")
        _assert_within(
            sharded.self_influence(estimate), local.self_influence(estimate), 1e-10, "self"
        )
    # The margin estimate is not the corrected one here (else the test could not tell them
    # apart), and its top k per shard merge into the in-process lists.
    differences = [
        np.abs(m - c).max() / np.abs(m).max()
        for m, c in zip(expected["margin"], expected["corrected"], strict=True)
    ]
    assert max(differences) > 1e-3
    for row, top in zip(expected["margin"], sharded.top_k_scores(X_test, y_test, 6), strict=True):
        np.testing.assert_array_equal(top.top.helpful, top_k(row, 6).helpful)
        np.testing.assert_array_equal(top.top.harmful, top_k(row, 6).harmful)
        np.testing.assert_array_equal(top.by_magnitude, top_k_by_magnitude(row, 6))
    _assert_within(
        sharded.scores_at(X_test, y_test, [3, 0, 150]),
        expected["margin"][:, [3, 0, 150]],
        1e-10,
        "scores at",
    )


def test_a_multiclass_engine_on_shards_works_in_the_class_basis():
    # The cluster's ten-class path: the Hessian's class-basis blocks are summed over shards and
    # the workers form each point's C x C forms from the inverse S' = (H' + δI)⁻¹ instead of
    # solving for φ_j ⊗ I. Same as in-process to 1e-10, and as forming them from the whole
    # inverse (no basis), which a loss without the basis takes.
    X, y, X_test, y_test = _problem(4, n=400, d=7, seed=13)
    reference = LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=5)
    model = ShardedLogisticRegression(l2=1e-2).fit(data)
    assert model.feature_shape() == reference.feature_shape() == (400, 7)
    found, expected = model.class_basis_hessian(), reference.class_basis_hessian()
    assert found is not None and expected is not None
    assert found.matrix.shape == (7 * 3, 7 * 3)
    assert_close(found.matrix, expected.matrix, "class-basis Hessian")
    np.testing.assert_array_equal(found.rotation.numpy(), expected.rotation.numpy())
    engine = ShardedInfluenceEngine(model)
    names = [entry.name for entry in engine.solver.stages.entries]
    assert any("class basis" in name for name in names), names
    whole = ShardedInfluenceEngine(model, ExactSolver(model, hessian=model.hessian()))
    # What a leave-one-out task preconditions with: (H + δI)⁻¹ from the basis's factor, and
    # (after the forms below) from its kept inverse, and from the whole factor.
    vectors = torch.randn(28, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    local_solution = InfluenceEngine(reference).solver.inverse_hvp(vectors)
    before = engine.solver.operator()
    assert before.factor is not None and before.inverse is None
    assert_close(before(vectors), local_solution, "operator, factor")
    assert_close(whole.solver.operator()(vectors[:, 0]), local_solution[:, 0], "operator, whole")
    assert whole.solver.inverse_for_forms().rotation is None
    assert engine.solver.inverse_for_forms().rotation is not None
    local = InfluenceEngine(reference)
    scores = local.score_estimates(X_test, y_test)
    for sharded in (engine, whole):
        for estimate, values in sharded.score_estimates(X_test, y_test).items():
            _assert_within(values, scores[estimate], 1e-10, estimate)
        _assert_within(sharded.self_influence(), local.self_influence(), 1e-10, "self")
        _assert_within(sharded.leverage(), local.leverage(), 1e-10, "leverage")
    assert engine.solver.operator().inverse is not None
    assert_close(engine.solver.operator()(vectors), local_solution, "operator, inverse")
    # Curvature that is not shift-invariant to rounding gets no basis (checked on the shards).
    skewed = ShardedLogisticRegression(l2=1e-2).fit(data)
    assert skewed.class_basis_hessian() is not None
    skewed._train_terms.handles[0].derivs.d2[0, 0, 0] += 1.0
    assert skewed.class_basis_hessian() is None


@pytest.mark.parametrize("k", [1, 7, 20, 35])
def test_top_k_merged_from_shards_for_every_k_up_to_past_the_training_set(k):
    # k equal to n is where dask's argtopk gives up; every k must match the in-process lists.
    X, y, X_test, y_test = _problem(2, n=20, d=3, seed=9)
    reference = InfluenceEngine(LogisticRegression(l2=0.1).fit(X.astype(np.float64), y))
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=8)
    sharded = ShardedInfluenceEngine(ShardedLogisticRegression(l2=0.1).fit(data))
    expected = reference.influence_scores(X_test, y_test)
    for row, found in zip(expected, sharded.top_k_scores(X_test, y_test, k), strict=True):
        np.testing.assert_array_equal(found.top.helpful, top_k(row, k).helpful)
        np.testing.assert_array_equal(found.top.harmful, top_k(row, k).harmful)
        np.testing.assert_array_equal(found.by_magnitude, top_k_by_magnitude(row, k))


def test_newton_cg_fit_and_cg_solver_equal_in_process(monkeypatch):
    # Past DENSE_NEWTON_MAX_PARAMS the Newton step is CG on (here: summed per shard) HVPs.
    import core.models

    monkeypatch.setattr(core.models, "DENSE_NEWTON_MAX_PARAMS", 8)
    X, y, X_test, y_test = _problem(3, n=900, d=8, seed=4)
    reference = LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=5)
    sharded = ShardedLogisticRegression(l2=1e-2).fit(data)
    assert_close(sharded.theta_, reference.theta_, "Newton-CG θ")
    config = SolverConfig(method="cg", cg_tol=1e-12)
    a = InfluenceEngine(reference, config).influence_scores(X_test, y_test, estimate="first_order")
    engine = ShardedInfluenceEngine(sharded, config)
    assert engine.estimates == ("first_order",)
    assert_close(engine.influence_scores(X_test, y_test, estimate="first_order"), a, "CG scores")
    with pytest.raises(InfluenceExplorerError, match="needs the exact solver"):
        engine.influence_scores(X_test, y_test, estimate="corrected")
    with pytest.raises(InfluenceExplorerError, match="Self-influence on a cluster needs the exact"):
        engine.self_influence("first_order")


def test_lissa_minibatches_map_to_the_shards_holding_them():
    X, y, _, _ = _problem(2, n=600, d=6, seed=5)
    config = SolverConfig(method="lissa", lissa_depth=300, damping=0.2, lissa_scale=10.0)
    reference = InfluenceEngine(LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y), config)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=7)
    sharded = ShardedInfluenceEngine(ShardedLogisticRegression(l2=1e-2).fit(data), config)
    v = torch.linspace(-1, 1, 6, dtype=torch.float64)
    assert_close(sharded.solver.inverse_hvp(v), reference.solver.inverse_hvp(v), "LiSSA")


def test_sharded_nystroem_svm_equals_in_process():
    rng = np.random.default_rng(6)
    X = np.tanh(rng.normal(size=(500, 20)))
    y = (X[:, 0] + 0.4 * rng.normal(size=500) > 0).astype(int)
    X_test = np.tanh(rng.normal(size=(4, 20)))
    y_test = np.array([0, 1, 1, 0])
    reference = NystroemSVM(n_components=80, seed=3).fit(X, y)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=6)
    sharded = ShardedNystroemSVM(n_components=80, seed=3).fit(data)
    np.testing.assert_array_equal(sharded.landmark_indices_, reference.landmark_indices_)
    assert_close(sharded.theta_, reference.theta_, "Nyström θ")
    assert sharded.platt_ == pytest.approx(reference.platt_, rel=1e-8)
    np.testing.assert_allclose(
        sharded.predict_proba(X_test), reference.predict_proba(X_test), rtol=1e-8
    )
    for estimate in ("corrected", "first_order"):
        assert_close(
            ShardedInfluenceEngine(sharded).influence_scores(X_test, y_test, estimate=estimate),
            InfluenceEngine(reference).influence_scores(X_test, y_test, estimate=estimate),
            f"Nyström {estimate}",
        )


def test_intercept_and_sample_weights_are_honoured():
    X, y, _, _ = _problem(2, n=300, d=5, seed=7)
    w = np.ones(300)
    w[[3, 100, 299]] = 0.0
    reference = LogisticRegression(l2=1e-2, fit_intercept=True).fit(X.astype(np.float64), y, w)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=4)
    sharded = ShardedLogisticRegression(l2=1e-2, fit_intercept=True).fit(data, sample_weight=w)
    assert_close(sharded.theta_, reference.theta_, "θ with intercept and weights")
    np.testing.assert_array_equal(sharded.sample_weight_.numpy(), w)


def test_bad_inputs_get_clear_messages(monkeypatch):
    X, y, X_test, y_test = _problem(2, n=200, d=4, seed=8)
    bad = X.copy()
    bad[17, 2] = np.nan
    with pytest.raises(NonFiniteFeaturesError, match="NaN or infinite values in 1 rows"):
        ShardedLogisticRegression().fit(ShardedData.from_arrays(LocalRunner(), bad, y, n_shards=3))
    with pytest.raises(InfluenceExplorerError, match="fits sharded data"):
        ShardedLogisticRegression().fit(X, y)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=3)
    with pytest.raises(InfluenceExplorerError, match="y does not match"):
        ShardedLogisticRegression().fit(data, 1 - y)
    model = ShardedLogisticRegression(l2=1e-2).fit(data)
    engine = ShardedInfluenceEngine(model)
    from core.backend import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_SCORE_ENTRIES", 100)
    with pytest.raises(InfluenceExplorerError, match="use top_k_scores"):
        engine.influence_scores(X_test, y_test)
    monkeypatch.setattr(engine_module, "DENSE_SOLVER_MAX_PARAMS", 3)
    with pytest.raises(InfluenceExplorerError, match=r"method='cg'.*--solver cg"):
        ShardedInfluenceEngine(model, SolverConfig(method="exact"))
    assert isinstance(
        ShardedInfluenceEngine(model).solver,
        type(InfluenceEngine(LogisticRegression().fit(X, y), SolverConfig(method="cg")).solver),
    )
    with pytest.raises(InfluenceExplorerError, match="heatmap"):
        engine.perturbation_influence(X_test, y_test, [0])
    with pytest.raises(InfluenceExplorerError, match="in shards on the workers"):
        _ = model.training_inputs_


@pytest.mark.parametrize("n_shards", [7, 40])  # 40: shards of 7-8 rows, fewer than k
def test_neighbour_distance_merged_from_shards_equals_in_process(n_shards):
    from core.backend.explainer import ShardedNeighbourDistance
    from core.ood import NeighbourDistance

    rng = np.random.default_rng(10)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    reference, queries = rng.normal(size=(40, 6)), rng.normal(size=(5, 6)) * 3
    expected = NeighbourDistance(X, reference, k=10, max_reference=30, seed=1)
    data = ShardedData.from_arrays(LocalRunner(), X, np.zeros(300, dtype=int), n_shards=n_shards)
    found = ShardedNeighbourDistance(data, reference, k=10, max_reference=30, seed=1)
    np.testing.assert_allclose(found.reference, expected.reference, rtol=1e-12)
    for a, b in zip(found.check(queries), expected.check(queries), strict=True):
        assert a.statistic == pytest.approx(b.statistic, rel=1e-12)
        assert (a.percentile, a.unusual) == (b.percentile, b.unusual)
    # One query's distances to every training point, and its familiarity, as in-process.
    for query in queries:
        near, far = found.query(query[None]), expected.query(query[None])
        np.testing.assert_allclose(near.distances, far.distances, rtol=1e-8)
        # One pass for both, as in-process: the statistic is check's to rounding.
        checked = found.check(query[None])[0]
        assert near.familiarity.statistic == pytest.approx(checked.statistic, rel=1e-12)
        assert near.familiarity.statistic == pytest.approx(far.familiarity.statistic, rel=1e-12)
        assert near.familiarity.threshold == pytest.approx(far.familiarity.threshold, rel=1e-12)
        for field in ("percentile", "unusual", "k"):
            assert getattr(near.familiarity, field) == getattr(far.familiarity, field), field
    # A training image itself and a near-duplicate: the expansion cancels there, so those rows'
    # distances are recomputed directly (0 exactly for the image itself).
    rows = X.astype(np.float64)
    for query in (rows[5], rows[5] + 1e-6):
        direct = np.linalg.norm(rows - query, axis=1)
        near = found.query(query[None])
        np.testing.assert_allclose(near.distances, direct, rtol=1e-8, atol=0)
        np.testing.assert_allclose(near.distances, expected.query(query[None]).distances, rtol=1e-8)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_lambda_cross_validation_on_shards_follows_the_in_process_rule(n_classes):
    # The same folds, fits (λ and tolerance rescaled for the zero-weighted held-out rows) and
    # held-out values, so the same curve and the same one-standard-error choice.
    from core.backend.selection import held_out_values as sharded_values
    from core.selection import SelectionConfig, curve_from_values, held_out_values

    X, y, _, _ = _problem(n_classes, n=240, d=6, seed=13)
    config = SelectionConfig(grid=(1e-3, 1e-2, 1e-1, 1.0), folds=3, repeats=2, seed=4)
    expected = held_out_values(X.astype(np.float64), y, config)
    data = ShardedData.from_arrays(LocalRunner(), X, y, n_shards=4)
    calls = []
    found = sharded_values(data, y, config, progress=lambda done, total: calls.append(total))
    np.testing.assert_array_equal(found["correct"], expected["correct"])
    np.testing.assert_allclose(found["log_loss"], expected["log_loss"], rtol=1e-6, atol=1e-9)
    a, b = curve_from_values(found, config), curve_from_values(expected, config)
    assert (a.best, a.chosen) == (b.best, b.chosen)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-7)
    assert calls and calls[-1] == 2 * 3 * 4
    with pytest.raises(InfluenceExplorerError, match="do not match the labels"):
        sharded_values(data, np.roll(y, 1), config)


@pytest.mark.parametrize("status", ["closed", "connecting"])
def test_work_for_a_client_that_lost_its_scheduler_is_refused_naming_the_stage(status):
    # Dask's own failure is an AttributeError deep in the client (seen: "'NoneType' object has
    # no attribute 'scatter'" after the scheduler was stopped under a running dashboard).
    from types import SimpleNamespace

    from core.backend.runner import DaskRunner

    client = SimpleNamespace(status="running", scheduler=SimpleNamespace(address="tcp://h:8786"))
    runner = DaskRunner(client)
    client.status, client.scheduler = status, None
    for call in (
        lambda: runner.broadcast(1),
        lambda: runner.submit(abs, -1),
        lambda: runner.map(abs, [[1, 2]]),
        lambda: runner.map_sum(abs, [[1, 2]]),
        lambda: runner.gather([]),
    ):
        with runner.stage("Scoring training points"), pytest.raises(ClusterError) as raised:
            call()
        assert str(raised.value).startswith(
            f"Scoring training points: the Dask scheduler tcp://h:8786 is not reachable (the "
            f"client is {status})."
        )
