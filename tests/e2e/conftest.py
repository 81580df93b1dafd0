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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Kept on the test item, so that the page fixture's teardown knows whether the test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _keep_what_the_page_showed(page: Any, name: str) -> None:
    """After a failed test: a screenshot, and every alert on the page (the sidebar's included)
    printed into the test's report, since a failure on a busy CI machine may not come back."""
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"e2e-failed-{name}.png"), full_page=True)
        alerts = page.locator('[data-testid="stAlert"]')
        for i in range(alerts.count()):
            alert = alerts.nth(i)
            where = (
                "sidebar"
                if alert.locator("xpath=ancestor::section[@data-testid='stSidebar']").count()
                else "main"
            )
            print(f"alert {i} ({where}): {alert.inner_text(timeout=2_000)!r}")
        print(f"screenshot: {ARTIFACTS / f'e2e-failed-{name}.png'}")
    except Exception as error:  # the page may be gone; the test's own failure is what counts
        print(f"could not keep the failed page: {error!r}")


@pytest.fixture
def page(browser: Any, app_server: Server, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (a new Streamlit session) per test; after a failure, what the
    page showed is kept (:func:`_keep_what_the_page_showed`)."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    context.set_default_timeout(60_000)
    try:
        opened = context.new_page()
        yield opened
        failed = getattr(request.node, "report_call", None)
        if failed is not None and failed.failed:
            _keep_what_the_page_showed(opened, request.node.name)
    finally:
        context.close()
