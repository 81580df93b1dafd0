"""A real `streamlit run` server and Debian's Chromium driven by Playwright.

Chromium (or Playwright) missing: the tests skip with the reason, unless
``INFLUENCE_REQUIRE_BROWSER=1`` (CI), where that is a failure. The server is always terminated.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from bench.load import CHROMIUM_ARGS, streamlit_server
from bench.load import ServerProcess as Server
from tests.prepared_cache import REPO, cache_dir, prepare_default_explainer

ARTIFACTS = REPO / "test-artifacts"
REQUIRE_BROWSER_ENV = "INFLUENCE_REQUIRE_BROWSER"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_BROWSER_ENV}=1, so browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("Python Playwright is not installed")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("no Chromium on PATH (Debian: apt-get install chromium)")
    return path


@pytest.fixture(scope="session")
def app_server(chromium_path: str) -> Iterator[Server]:
    """`streamlit run dashboard/streamlit_app.py` on a free port, with the prepared cache."""
    directory = cache_dir()
    prepare_default_explainer(directory)
    ARTIFACTS.mkdir(exist_ok=True)
    # The same server the load test starts (bench/load.py); a failed start names its log.
    with streamlit_server(directory, ARTIFACTS / "e2e-server.log") as server:
        yield server


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any, app_server: Server) -> Iterator[Any]:
    """A fresh browser context (a new Streamlit session) per test."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    context.set_default_timeout(60_000)
    try:
        yield context.new_page()
    finally:
        context.close()
