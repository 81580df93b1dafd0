"""The memory budget: how operators write it, what it admits and refuses, and its estimates
against what the work was measured to take."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from core.budget import (
    ENV_MEMORY_BUDGET,
    MemoryBudget,
    ModelShape,
    WorkEstimate,
    format_bytes,
    parse_budget,
    preparation_estimate,
    refit_estimate,
    resident_bytes,
)
from core.errors import InfluenceExplorerError, MemoryBudgetError
from tests.prepared_cache import REPO, cache_dir, prepare_default_explainer

MIB = 2**20
GIB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6G", 6 * GIB),
        ("6GiB", 6 * GIB),
        ("1500M", 1500 * MIB),
        ("1500mb", 1500 * MIB),
        ("2000000000", 2_000_000_000),
        ("40%", int(0.4 * 10 * GIB)),
        ("0.25", int(0.25 * 10 * GIB)),
    ],
)
def test_a_budget_is_written_as_a_size_or_a_share_of_the_machine(text: str, expected: int) -> None:
    assert parse_budget(text, machine=10 * GIB) == expected


@pytest.mark.parametrize("text", ["lots", "6 X", "", "nan", "-1G", "10M", "0.000001", "inf"])
def test_a_budget_that_is_not_a_size_or_too_small_is_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(MemoryBudgetError, match=ENV_MEMORY_BUDGET):
        parse_budget(text, machine=10 * GIB)


def test_the_default_budget_is_half_the_machine_and_the_variable_sets_it() -> None:
    default = MemoryBudget.from_environment({})
    assert 0 < default.limit < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert MemoryBudget.from_environment({ENV_MEMORY_BUDGET: "3G"}).limit == 3 * GIB
    assert issubclass(MemoryBudgetError, InfluenceExplorerError)


def test_admitted_work_is_reserved_until_it_ends_and_work_that_does_not_fit_is_refused() -> None:
    budget = MemoryBudget(1000 * MIB, resident=lambda: 200 * MIB)
    work = WorkEstimate("retraining", 300 * MIB, {"the Hessian": 300 * MIB}, "Use fewer images.")
    with budget.reserved_for(work):
        assert budget.free() == 500 * MIB
        second = budget.reserve(work)
        assert budget.free() == 200 * MIB and budget.running == 2
        with pytest.raises(MemoryBudgetError) as refused:
            budget.reserve(work)
        message = str(refused.value)
        for part in ("retraining", "300 MiB", "200 MiB", "mostly the Hessian", "Use fewer images."):
            assert part in message, (part, message)
        assert "600 MiB reserved by work in progress" in message
        budget.release(second)
    assert budget.reserved == 0 and budget.free() == 800 * MIB


def test_reservations_from_many_threads_never_exceed_the_budget() -> None:
    budget = MemoryBudget(1000 * MIB, resident=lambda: 0)
    work = WorkEstimate("w", 100 * MIB)
    admitted: list[object] = []
    lock = threading.Lock()

    def grab() -> None:
        try:
            reservation = budget.reserve(work)
        except MemoryBudgetError:
            return
        with lock:
            admitted.append(reservation)

    threads = [threading.Thread(target=grab) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 10 and budget.reserved == 1000 * MIB


def test_the_kernel_models_estimate_grows_with_the_square_of_the_training_set() -> None:
    def need(n: int) -> int:
        svm = ModelShape("RBF SVM", n, n, 1)
        return refit_estimate("retraining", (svm,), new_engine=False).bytes

    # 8 bytes x n^2 x (2 Hessian copies + 2 kernel copies), on top of a fixed slack.
    assert need(20_000) - need(10_000) > 0.9 * 32 * (20_000**2 - 10_000**2)
    estimate = preparation_estimate(
        n_train=12_000,
        n_test=2_000,
        pixel_dim=64 * 64,
        models=(ModelShape("RBF SVM", 12_000, 12_000, 1),),
        backbone="efficientnet-lite0",
    )
    assert estimate.largest.startswith("RBF SVM: 12,000 x 12,000")
    assert estimate.bytes > 6 * GIB
    assert format_bytes(estimate.bytes).endswith("GiB")


def test_a_model_sharded_on_a_cluster_counts_only_what_this_process_holds() -> None:
    """At 60,000 x 1,280 features (10 classes, 10,000 test images) this process holds the
    features and the (test x train) products in-process; with the rows in shards, only the
    test rows and the p x p matrices."""

    def estimate(sharded: bool):
        shape = ModelShape("LR", 60_000, 1_280, 10, "efficientnet-lite0", sharded=sharded)
        return preparation_estimate(
            n_train=60_000,
            n_test=10_000,
            pixel_dim=784,
            models=(shape,),
            backbone="efficientnet-lite0",
        )

    here, there = estimate(False), estimate(True)
    assert "LR: features of every image" in here.terms
    assert "LR: features of every image" not in there.terms
    assert there.terms["LR: features of the test images"] == 10_000 * 1_280 * 8 * 2
    # The (test x train) matrices alone are 10,000 x 60,000 x 3 doubles in-process.
    assert here.bytes - there.bytes > 10_000 * 60_000 * 8 * 3
    hessian = "LR: 12,800 x 12,800 Hessian and Cholesky factors"
    assert there.terms[hessian] == here.terms[hessian]


_MEASURE = """
import json, sys
from core.budget import resident_bytes
from core.data import load_demo
from core.explainer import Explainer, ExplainerConfig
from core.store import ArtifactStore

explainer = Explainer(load_demo(), ExplainerConfig(), store=ArtifactStore(sys.argv[1]))
estimate = explainer.preparation_estimate()
before = resident_bytes()
with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current VmRSS
    f.write("5")
explainer.prepare()
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"estimate": estimate.bytes, "before": before, "peak": hwm}))
"""


@pytest.mark.slow
def test_the_preparation_estimate_bounds_the_measured_peak_on_the_demo() -> None:
    """Preparing the demo's default explainer in a fresh process (backbone features from the
    prepared cache, so the fits and the influence engines are what is measured): the peak
    resident memory above what the process held before stays below the estimate."""
    directory = cache_dir()
    prepare_default_explainer(directory)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(directory)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    grown = figures["peak"] - figures["before"]
    assert 0 < grown <= figures["estimate"], figures
    assert resident_bytes() > 0
