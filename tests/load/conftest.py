"""The load test runs on its own (``pytest -m load tests/load``), not in every ``make test``.

It starts its own server and twenty browser sessions and takes minutes on a small machine; the
marker is registered here so that ``--strict-markers`` accepts it, and the tests are skipped
unless the run selects them with ``-m load``.
"""

from __future__ import annotations

import pytest

LOAD_MARKER = "load: many concurrent browser sessions against one server (run with -m load)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", LOAD_MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "load" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the load test runs on its own: pytest -m load tests/load")
    for item in items:
        if "load" in item.keywords:
            item.add_marker(skip)
