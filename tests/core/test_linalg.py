"""The shared linear algebra: Cholesky solves and the one conjugate-gradient routine against
direct solves, and Lanczos against the exact spectrum."""

from __future__ import annotations

import itertools

import pytest
import torch

from core.linalg import (
    STRIP,
    cholesky_solve,
    conjugate_gradient,
    lanczos_spectrum,
    quadratic_forms,
    spectrum_from_hessian,
    t_times,
    through_rows,
    times_thin,
    weighted_gram,
)


def _spd(p: int, seed: int, condition: float = 1e3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), p).double()
    return (q * eigenvalues) @ q.T


@pytest.mark.parametrize("shape", [(40,), (40, 1), (40, 7)])
def test_cholesky_solve_matches_a_general_solver(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(40, 40, generator=generator, dtype=torch.float64)
    spd = a @ a.T + 0.1 * torch.eye(40, dtype=torch.float64)
    b = torch.randn(*shape, generator=generator, dtype=torch.float64)
    x = cholesky_solve(torch.linalg.cholesky(spd), b)
    assert x.shape == b.shape
    expected = torch.linalg.solve(spd, b)
    assert torch.allclose(x, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("shape", [(60,), (60, 5)])
def test_conjugate_gradient_matches_a_direct_solve(shape: tuple[int, ...]) -> None:
    a = _spd(60, seed=1)
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run = conjugate_gradient(lambda v: a @ v, b, rtol=1e-12, max_iter=1000)
    assert run.converged and not run.nonpositive_curvature
    assert run.solution.shape == b.shape
    expected = torch.linalg.solve(a, b)
    assert float((run.solution - expected).norm() / expected.norm()) < 1e-9
    assert float(run.relative_residuals.max()) <= 1e-12


def test_columns_stop_independently() -> None:
    # A column that is already solved (zero right-hand side) must not stall or perturb the rest.
    a = _spd(30, seed=4)
    b = torch.zeros(30, 3, dtype=torch.float64)
    b[:, 1] = torch.randn(30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run = conjugate_gradient(lambda v: a @ v, b, rtol=1e-12, max_iter=500)
    assert run.converged
    assert torch.equal(run.solution[:, 0], torch.zeros(30, dtype=torch.float64))
    assert torch.allclose(run.solution[:, 1], torch.linalg.solve(a, b[:, 1]), atol=1e-9)


def test_a_good_preconditioner_needs_few_iterations() -> None:
    a = _spd(80, seed=6, condition=1e6)
    b = torch.randn(80, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    plain = conjugate_gradient(lambda v: a @ v, b, rtol=1e-10, max_iter=5000)
    # The exact inverse of a nearby matrix, as retraining uses the factor at θ̂.
    nearby = a + 1e-3 * torch.eye(80, dtype=torch.float64)
    chol = torch.linalg.cholesky(nearby)
    preconditioned = conjugate_gradient(
        lambda v: a @ v,
        b,
        rtol=1e-10,
        max_iter=5000,
        preconditioner=lambda r: cholesky_solve(chol, r),
    )
    assert plain.converged and preconditioned.converged
    assert preconditioned.iterations <= 5 < plain.iterations
    expected = torch.linalg.solve(a, b)
    assert float((preconditioned.solution - expected).norm() / expected.norm()) < 1e-8


def test_indefinite_operator_is_reported_not_solved() -> None:
    a = _spd(20, seed=8)
    a[0, 0] = -50.0
    b = torch.ones(20, dtype=torch.float64)
    run = conjugate_gradient(lambda v: a @ v, b, rtol=1e-12, max_iter=500)
    assert run.nonpositive_curvature and not run.converged


def test_max_iter_is_respected_and_reported() -> None:
    a = _spd(50, seed=9, condition=1e8)
    b = torch.randn(50, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    run = conjugate_gradient(lambda v: a @ v, b, rtol=1e-14, max_iter=3)
    assert run.iterations == 3 and not run.converged
    assert float(run.relative_residuals[0]) > 1e-14


def test_lanczos_finds_the_extreme_eigenvalues() -> None:
    a = _spd(50, seed=11)
    a -= 2.0 * torch.eye(50, dtype=torch.float64)  # indefinite: smallest eigenvalue -1
    exact = spectrum_from_hessian(a)
    full = lanczos_spectrum(lambda v: a @ v, 50, iterations=50)
    assert full.smallest == pytest.approx(exact.smallest, abs=1e-8)
    assert full.largest == pytest.approx(exact.largest, rel=1e-8)
    assert exact.smallest == pytest.approx(-1.0, abs=1e-9)


@pytest.mark.parametrize("d", [7, STRIP, 2 * STRIP + 13])
def test_symmetric_products_from_lower_strips_match_full_products(d: int) -> None:
    generator = torch.Generator().manual_seed(d)
    features = torch.randn(300, d, generator=generator, dtype=torch.float64)
    weights = torch.randn(300, generator=generator, dtype=torch.float64)  # either sign
    gram = weighted_gram(features, weights)
    expected = features.T @ (features * weights[:, None])
    torch.testing.assert_close(gram, expected, rtol=1e-12, atol=1e-11)
    assert torch.equal(gram, gram.T)
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    symmetric = a + a.T
    forms = quadratic_forms(features, symmetric, chunk=128)
    torch.testing.assert_close(
        forms, ((features @ symmetric) * features).sum(1), rtol=1e-12, atol=1e-10
    )


@pytest.mark.parametrize("k", [1, 3, 12])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_products_through_blocks_of_rows_match_two_whole_products(k: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(10 * k + rows)
    features = torch.randn(203, 17, generator=generator, dtype=torch.float64)
    thin = torch.randn(17, k, generator=generator, dtype=torch.float64)
    weights = torch.randn(203, k, generator=generator, dtype=torch.float64)
    seen: list[tuple[int, int]] = []

    def middle(start: int, stop: int, products: torch.Tensor) -> torch.Tensor:
        seen.append((start, stop))
        return products * weights[start:stop] + products.square()

    got = through_rows(features, thin, middle, rows=rows)
    scores = times_thin(features, thin)
    expected = t_times(features, scores * weights + scores.square())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-11)
    # Every row once, in blocks of at most ``rows``.
    assert seen[0][0] == 0 and seen[-1][1] == 203
    assert all(a[1] == b[0] for a, b in itertools.pairwise(seen))
    assert all(stop - start <= rows for start, stop in seen)
