"""Shared fixtures: problem factories, and a report of measured figures printed after the run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

_REPORT: list[str] = []


@pytest.fixture
def report() -> Callable[[str], None]:
    """Record a measured figure (e.g. first-order Spearman) to print in the terminal summary."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _REPORT:
        terminalreporter.section("measured figures")
        for line in _REPORT:
            terminalreporter.write_line(line)


@dataclass
class Problem:
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def _logreg_problem(n: int, d: int, seed: int, n_classes: int = 2, noise: float = 1.0) -> Problem:
    """Linearly generated labels with label noise; features scaled so margins are O(1)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(d, n_classes))

    def sample(m: int) -> tuple[np.ndarray, np.ndarray]:
        X = rng.normal(size=(m, d)) * (3.0 / np.sqrt(d))
        logits = X @ weights + noise * rng.gumbel(size=(m, n_classes))
        return X, logits.argmax(1)

    X, y = sample(n)
    X_test, y_test = sample(max(8, n // 10))
    return Problem(X, y, X_test, y_test)


@pytest.fixture
def make_logreg_problem() -> Callable[..., Problem]:
    """Factory: make_logreg_problem(n, d, seed, n_classes=2, noise=1.0) -> Problem."""
    return _logreg_problem


@pytest.fixture
def make_svm_problem() -> Callable[..., Problem]:
    """Factory of pixel-like inputs in [-1, 1] for the kernel SVM:
    make_svm_problem(n, D, seed, n_classes=2)."""

    def make(n: int, D: int, seed: int, n_classes: int = 2) -> Problem:
        p = _logreg_problem(n, D, seed, n_classes=n_classes, noise=0.7)
        return Problem(np.tanh(p.X), p.y, np.tanh(p.X_test), p.y_test)

    return make
