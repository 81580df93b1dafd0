"""bench.kernel_limits: every reference kernel computes what the step it stands for needs (a
kernel computing something else, say a transposed product, would make the comparison
meaningless), and the table's bound is our time less what each step could save."""

from __future__ import annotations

import numpy as np
import pytest

from bench import kernel_limits


@pytest.mark.parametrize(("n", "d"), [(30, 50), (60, 20)], ids=["dual", "primal"])
def test_every_kernel_computes_its_steps_result(n: int, d: int) -> None:
    entries, expected = kernel_limits.kernels(n, d, 7)
    steps = {kernel.step for kernel in entries}
    assert steps == set(expected)
    names = kernel_limits.DUAL if n < d else kernel_limits.PRIMAL
    assert set(names.values()) | {kernel_limits.PRODUCT} == steps
    # Both libraries are set against each other where both have a kernel.
    assert any(k.openblas for k in entries if k.step == names["gram"])
    assert any(k.openblas for k in entries if k.step == names["factor"])
    for kernel in entries:
        np.testing.assert_allclose(
            kernel.full(kernel.run()),
            np.asarray(expected[kernel.step]()),
            rtol=1e-10,
            atol=1e-10,
            err_msg=f"{kernel.step}: {kernel.label}",
        )


def test_the_bound_takes_each_steps_fastest_kernel() -> None:
    result = {
        "total_ms": 100.0,
        "steps_ms": {"Gram": 40.0, "factor": 10.0, "other": 5.0},
        "kernels_ms": {
            "Gram": {"torch strips": 38.0, "OpenBLAS syrk": 20.0},
            "factor": {"torch potrf": 12.0},  # slower alone than in ours: nothing to save
        },
    }
    stages = [
        {"name": "Gram", "flops": 1e9, "bytes": 1e6},
        {"name": "factor", "flops": 1e8, "bytes": 1e6},
        {"name": "other", "flops": 0.0, "bytes": 1e6},
    ]
    limits = {"gemm_gflops": 100.0, "bandwidth_gbs": 10.0}
    text, bound = kernel_limits.table(result, stages, limits, ("peer", 0.5))
    assert bound == pytest.approx(0.080)
    assert "OpenBLAS syrk: 20.0" in text and "torch strips 38.0" in text
    assert "2.00x" in text  # ours / the fastest kernel for the Gram matrix
    assert "| 10.0 |" in text  # its FLOP limit: 1 GFLOP at 100 GFLOP/s
    assert "6.25x it: the 10x goal is out of reach" in text
    _, bound = kernel_limits.table(result, stages, limits, None)
    assert bound == pytest.approx(0.080)
    text, _ = kernel_limits.table(result, stages, limits, ("peer", 0.9))
    assert "11.25x it: within reach" in text


def test_a_benchmark_child_reports_its_failure_in_a_line() -> None:
    from bench.common import run_child

    done, error = run_child(["json.tool", "--help"], timeout=60)
    assert error is None and done is not None and done.returncode == 0
    done, error = run_child(["bench.kernel_limits", "/nonexistent/problem.npz", "out.json"], 60)
    assert done is not None and done.returncode != 0
    assert error is not None and "No such file" in error
    done, error = run_child(["timeit", "-n", "1", "-r", "1", "import time; time.sleep(30)"], 2)
    assert done is None and error == "timed out after 2 s"
