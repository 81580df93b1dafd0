"""core.backend on a real Dask cluster: a LocalCluster of 2 single-threaded workers, shared by
the module, against the in-process path.

Synthetic binary and 4-class data of a few thousand points in 8 shards, and the bundled demo
through the explainer and the command line: θ, the Hessian, the three estimates' scores (the
exact-in-the-margin default, the Newton-corrected and the first-order), top-k indices and
leave-one-out retraining agree to 1e-8. Then what goes wrong on clusters: mismatched
versions are refused before work starts, a worker killed mid-job is recovered by Dask, and a job
that keeps killing its workers ends in a message naming the stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from core.backend import ENV_CLUSTER
from core.backend.engine import ShardedInfluenceEngine
from core.backend.models import ShardedLogisticRegression, ShardedNystroemSVM
from core.backend.shards import ShardedData
from core.errors import ClusterError, InfluenceExplorerError
from core.influence import InfluenceEngine, SolverConfig
from core.models import LogisticRegression, NystroemSVM
from core.store import ArtifactStore
from core.validation import verify
from tests.core.test_backend import REPO, _compare, _problem, assert_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed")
    from core.backend.cluster import connect

    with connect("local:2", timeout=120) as connected:
        yield connected


def test_cluster_info_names_address_workers_and_memory(cluster):
    info = cluster.info()
    assert info.mode == "local" and info.address.startswith("tcp://")
    assert info.n_workers == 2 and info.threads == 2
    assert all(w.memory_limit > 0 for w in info.workers)
    assert f"{info.address}: 2 workers, 2 threads" in info.summary()
    # A client made elsewhere (dask-jobqueue, Kubernetes) is used after the same checks.
    from core.backend.cluster import attach

    attached = attach(cluster.client)
    assert attached.info().mode == "attached"
    assert attached.info().address == info.address


@pytest.mark.parametrize("n_classes, stored", [(2, True), (4, False)])
def test_sharded_models_on_the_cluster_equal_in_process(cluster, tmp_path, n_classes, stored):
    X, y, X_test, y_test = _problem(n_classes, n=3000, d=10, seed=n_classes)
    reference = InfluenceEngine(LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y))
    store = ArtifactStore(tmp_path) if stored else None
    data = ShardedData.from_arrays(cluster.runner, X, y, n_shards=8, store=store)
    assert data.n_shards == 8
    sharded = ShardedInfluenceEngine(ShardedLogisticRegression(l2=1e-2).fit(data))
    _compare(reference, sharded, X_test, y_test, modes=("tasks",))


def test_cg_solver_on_distributed_hessian_vector_products(cluster):
    X, y, X_test, y_test = _problem(2, n=2000, d=12, seed=11)
    config = SolverConfig(method="cg", cg_tol=1e-12)
    reference = InfluenceEngine(LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y), config)
    data = ShardedData.from_arrays(cluster.runner, X, y, n_shards=8)
    sharded = ShardedInfluenceEngine(ShardedLogisticRegression(l2=1e-2).fit(data), config)
    assert_close(
        sharded.influence_scores(X_test, y_test, estimate="first_order"),
        reference.influence_scores(X_test, y_test, estimate="first_order"),
        "CG first-order scores",
    )


def test_nystroem_svm_on_the_cluster_broadcasts_landmarks(cluster):
    rng = np.random.default_rng(12)
    X = np.tanh(rng.normal(size=(800, 16)))
    y = (X[:, 0] - X[:, 1] + 0.4 * rng.normal(size=800) > 0).astype(int)
    X_test, y_test = np.tanh(rng.normal(size=(3, 16))), np.array([1, 0, 1])
    options = {"n_components": 60, "temperature": 0.1, "seed": 2}
    reference = NystroemSVM(**options).fit(X, y)
    sharded = ShardedNystroemSVM(**options).fit(
        ShardedData.from_arrays(cluster.runner, X, y, n_shards=8)
    )
    assert_close(sharded.theta_, reference.theta_, "Nyström θ")
    assert_close(
        ShardedInfluenceEngine(sharded).influence_scores(X_test, y_test),
        InfluenceEngine(reference).influence_scores(X_test, y_test),
        "Nyström scores",
    )


# ----------------------------------------------------------------------------- the demo
@pytest.fixture(scope="module")
def demo_cache():
    from tests.prepared_cache import cache_dir, prepare_default_explainer

    directory = cache_dir()
    prepare_default_explainer(directory)
    return directory


class _RecomputeSelection(ArtifactStore):
    """An artifact store that never reuses a cached λ cross-validation."""

    def get_or_create(self, key, build, meta=None):
        if key.kind == "select-logreg-l2":
            return dict(build())
        return super().get_or_create(key, build, meta)


def test_demo_explainer_on_the_cluster_equals_in_process(cluster, demo_cache):
    from core.data import load_demo
    from core.explainer import Explainer, ExplainerConfig

    demo = load_demo()
    store = ArtifactStore(demo_cache)
    local = Explainer(demo, ExplainerConfig(), store=store).prepare()
    # The remote explainer reads the same cache, except λ's cross-validation, which it redoes
    # with every fold fitted on the shards.
    remote = Explainer(
        demo, ExplainerConfig(), store=_RecomputeSelection(demo_cache), cluster=cluster
    ).prepare()
    assert isinstance(remote.models["logreg"].engine, ShardedInfluenceEngine)
    # What the dashboard asks before a heatmap or a refit on changed rows (then in-process).
    assert remote.on_cluster("logreg") and not remote.on_cluster("svm")
    assert not local.on_cluster("logreg")
    with pytest.raises(InfluenceExplorerError, match="shards on the cluster"):
        remote.heatmap("logreg", 0, test_index=0)
    assert local.heatmap("logreg", 0, test_index=0).shape == demo.image_shape
    # Only the test rows are held here: less memory than in-process, by the training features.
    shapes = {s.label: s for s in remote.model_shapes()}
    assert [s.sharded for s in shapes.values()] == [False, True]
    saved = local.preparation_estimate().bytes - remote.preparation_estimate().bytes
    assert saved >= remote.n_train * shapes[remote.models["logreg"].label].n_features * 8 * 2
    near, far = remote.models["logreg"].lambda_curve, local.models["logreg"].lambda_curve
    assert (near.best, near.chosen, near.n) == (far.best, far.chosen, far.n)
    np.testing.assert_allclose(near.mean, far.mean, rtol=1e-6)
    np.testing.assert_allclose(near.accuracy, far.accuracy, atol=1e-12)
    for key, summary in local.summaries().items():
        other = remote.summaries()[key]
        assert (other.train_accuracy, other.test_accuracy) == (
            summary.train_accuracy,
            summary.test_accuracy,
        )
        assert other.hyperparameters == summary.hyperparameters
    # Hard cases besides random ones: the logistic regression's most confident correct test
    # image, its least confident one, and a mistake.
    probabilities = local.test_probabilities("logreg")
    correct = probabilities.argmax(1) == local.test_labels
    confidence = probabilities.max(1)
    picks = sorted(
        {
            int(np.argmax(np.where(correct, confidence, -1))),
            int(np.argmin(confidence)),
            int(np.flatnonzero(~correct)[0]),
        }
    )
    for index in picks:
        assert remote.models["logreg"].engine.estimates == local.models["logreg"].engine.estimates
        for estimate in ("margin", "corrected", "first_order"):
            a = local.explain(test_index=index, k=10, estimate=estimate)
            b = remote.explain(test_index=index, k=10, estimate=estimate)
            for key in a.models:
                assert_close(b.models[key].scores, a.models[key].scores, f"{key} {estimate}")
                assert [i.train_index for i in b.models[key].helpful] == [
                    i.train_index for i in a.models[key].helpful
                ]
                assert [i.train_index for i in b.models[key].harmful] == [
                    i.train_index for i in a.models[key].harmful
                ]
                np.testing.assert_allclose(
                    b.models[key].feature_distances, a.models[key].feature_distances, rtol=1e-12
                )
                # The out-of-distribution check: k-th neighbour merged from the shards.
                near, far = b.models[key].familiarity, a.models[key].familiarity
                assert near.statistic == pytest.approx(far.statistic, rel=1e-10)
                assert (near.percentile, near.unusual) == (far.percentile, far.unusual)
    a = local.verify(test_index=picks[-1], k=5)["logreg"]
    b = remote.verify(test_index=picks[-1], k=5)["logreg"]
    np.testing.assert_array_equal(b.train_indices, a.train_indices)
    assert_close(b.actual, a.actual, "demo leave-one-out")
    assert b.converged


def test_cli_explain_on_a_local_cluster_gives_the_same_scores(demo_cache, capsys):
    from core.cli import main

    options = ["explain", "--test-index", "3", "--json", "--all-scores", "--quiet"]
    options += ["--cache-dir", str(demo_cache)]
    env = {k: v for k, v in os.environ.items() if k != ENV_CLUSTER}
    capsys.readouterr()
    assert main(options) == 0
    local = json.loads(capsys.readouterr().out)
    result = subprocess.run(
        [sys.executable, "-m", "core", *options],
        cwd=REPO,
        env={**env, ENV_CLUSTER: "local:2"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout)
    for key, model in local["models"].items():
        assert_close(remote["models"][key]["scores"], model["scores"], f"CLI {key}")
        assert [i["train_index"] for i in remote["models"][key]["helpful"]] == [
            i["train_index"] for i in model["helpful"]
        ]


def test_three_classes_on_a_local_cluster_explain_and_verify_as_in_process(tmp_path, capsys):
    """Three classes end to end through the command line: the cluster's softmax logistic
    regression and multi-class SVM give the same scores, lists and leave-one-out results."""
    from core.cli import main

    common = ["--classes", "0,2,6", "--max-train-per-class", "60", "--quiet"]
    common += ["--cache-dir", str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if k != ENV_CLUSTER}

    def both(command: list[str], name: str) -> tuple[dict, dict]:
        """The same command in this process, then in another one on a 2-worker LocalCluster;
        their --output documents."""
        local, remote = tmp_path / f"{name}-local.json", tmp_path / f"{name}-remote.json"
        capsys.readouterr()
        assert main([*command, *common, "--output", str(local)]) == 0
        result = subprocess.run(
            [sys.executable, "-m", "core", *command, *common, "--output", str(remote)],
            cwd=REPO,
            env={**env, ENV_CLUSTER: "local:2"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(local.read_text()), json.loads(remote.read_text())

    local, remote = both(["explain", "--test-index", "7", "--k", "5"], "explain")
    assert len(local["models"]) == 2
    for key, model in local["models"].items():
        other = remote["models"][key]
        for estimate, scores in model["scores"].items():
            assert_close(other["scores"][estimate], scores, f"3 classes {key} {estimate}")
        for kind in ("helpful", "harmful"):
            assert [i["train_index"] for i in other[kind]] == [
                i["train_index"] for i in model[kind]
            ]

    local, remote = both(["verify", "--test-index", "7", "--k", "4"], "verify")
    for key, model in local["results"][0]["models"].items():
        other = remote["results"][0]["models"][key]
        assert model["converged"] and other["converged"]
        assert [p["train_index"] for p in other["points"]] == [
            p["train_index"] for p in model["points"]
        ]
        assert_close(
            [p["actual"] for p in other["points"]],
            [p["actual"] for p in model["points"]],
            f"3 classes {key} leave-one-out",
        )


# ----------------------------------------------------------------------------- failures
def test_version_mismatch_is_refused_before_work_starts(cluster):
    from core.backend.cluster import check_cluster

    client = cluster.client
    worker = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]

    def pretend_other_torch(dask_worker):
        from distributed.versions import get_versions

        def versions(packages=None):
            found = get_versions(packages)
            found["packages"]["torch"] = "0.0.1-other"
            return found

        dask_worker._real_versions = dask_worker.handlers["versions"]
        dask_worker.handlers["versions"] = versions

    def restore(dask_worker):
        dask_worker.handlers["versions"] = dask_worker._real_versions

    client.run(pretend_other_torch, workers=[worker])
    try:
        with pytest.raises(ClusterError, match=r"different package versions(.|\n)*torch"):
            check_cluster(cluster)
    finally:
        client.run(restore, workers=[worker])
    check_cluster(cluster)

    def pretend_other_code():
        import core.backend.cluster as module

        module._real_fingerprint = module._kernel_fingerprint
        module._kernel_fingerprint = lambda: "0000000000000000"

    def restore_code():
        import core.backend.cluster as module

        module._kernel_fingerprint = module._real_fingerprint

    client.run(pretend_other_code, workers=[worker])
    try:
        with pytest.raises(ClusterError, match=f"Worker {worker} runs influence-explorer"):
            check_cluster(cluster)
    finally:
        client.run(restore_code, workers=[worker])


def test_worker_killed_mid_job_is_recovered(cluster):
    """Leave-one-out retraining as tasks; a worker holding shards is killed as soon as the
    first retraining reports back. Dask recomputes its shards elsewhere and reruns its tasks;
    the results equal the in-process ones."""
    X, y, X_test, y_test = _problem(2, n=2000, d=10, seed=21)
    reference = InfluenceEngine(LogisticRegression(l2=1e-2).fit(X.astype(np.float64), y))
    data = ShardedData.from_arrays(cluster.runner, X, y, n_shards=8)
    sharded = ShardedInfluenceEngine(ShardedLogisticRegression(l2=1e-2).fit(data))
    client = cluster.client
    holders = client.who_has(data.shards)
    victim = sorted({w for ws in holders.values() for w in ws})[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    killed = threading.Event()
    progress_seen = []

    def progress(done: int, total: int) -> None:
        progress_seen.append((done, total))
        if not killed.is_set():
            os.kill(pid, signal.SIGKILL)
            killed.set()

    expected = verify(reference, X_test[:2], y_test[:2], k=6, batched=False)  # one refit each
    found = sharded.verify(X_test[:2], y_test[:2], k=6, progress=progress, mode="tasks")
    assert killed.is_set() and progress_seen[0][0] < progress_seen[0][1]
    for a, b in zip(found, expected, strict=True):
        np.testing.assert_array_equal(a.train_indices, b.train_indices)
        assert_close(a.actual, b.actual, "leave-one-out after a worker was killed")
    client.wait_for_workers(2, timeout=180)


def test_job_that_keeps_killing_workers_ends_in_a_message_naming_the_stage(cluster):
    client = cluster.client
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    try:
        with (
            pytest.raises(ClusterError, match=r"^Summing the poison: the cluster lost work"),
            cluster.runner.stage("Summing the poison"),
        ):
            cluster.runner.map_sum(os._exit, [[1]])
    finally:
        client.run_on_scheduler(
            lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 3)
        )
    client.wait_for_workers(2, timeout=180)


def test_readme_cluster_example_runs(cluster, tmp_path):
    import contextlib
    import re

    import core.backend

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Past one machine") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    X, y, X_test, y_test = _problem(2, n=600, d=5, seed=30)
    namespace = {
        "X": X,
        "y": y,
        "X_test": X_test,
        "y_test": y_test,
        "store": ArtifactStore(tmp_path),
    }
    # The example starts its own local cluster; here it gets the module's.
    real_connect = core.backend.connect
    core.backend.connect = lambda spec: contextlib.nullcontext(cluster)
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        core.backend.connect = real_connect
    reference = InfluenceEngine(LogisticRegression(l2=1e-3).fit(X.astype(np.float64), y))
    expected = reference.influence_scores(X_test[:1], y_test[:1])[0]
    from core.influence import top_k

    np.testing.assert_array_equal(namespace["best"][0].top.helpful, top_k(expected, 10).helpful)
