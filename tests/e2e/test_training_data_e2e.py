"""The Training data pages in a real browser: each opens, the CSV downloads, Groups runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_dashboard_e2e import READY_TIMEOUT, no_exception, screenshot, wait_idle

pytestmark = pytest.mark.e2e

#: Opening a page may wait for the explainer to load from the disk cache on a busy machine.
PAGES = {
    "groups": "Groups of training images",
    "data-cleaning": "Data cleaning",
    "attack": "Training-set attack",
}


def _open(page: Any, server: Server, path: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{server.url}/{path}")
    page.get_by_test_id("stSidebar").wait_for()
    wait_idle(page)
    expect(page.get_by_role("heading", name=PAGES[path])).to_be_visible(timeout=READY_TIMEOUT)
    wait_idle(page)


def test_training_data_pages_open_export_and_run_groups(
    page: Any, app_server: Server, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    for path in PAGES:
        _open(page, app_server, path)
        no_exception(page)
        expect(page.locator('[class*="st-key-"][class*="_run"] button')).to_be_enabled()
        screenshot(page, path)

    # Data cleaning: the ranked list downloads as CSV.
    _open(page, app_server, "data-cleaning")
    expect(page.get_by_test_id("stDataFrame").first).to_be_visible()
    with page.expect_download() as download_info:
        page.locator(".st-key-clean_download button").click()
    target = tmp_path / "suspicious.csv"
    download_info.value.save_as(target)
    lines = target.read_text().splitlines()
    assert lines[0].startswith("rank,train_index,id,given_label")
    assert len(lines) == 1 + 1000
    no_exception(page)

    # Groups, the lightest run: the SVM on the default 12 groups.
    _open(page, app_server, "groups")
    page.get_by_text("RBF SVM on pixels", exact=True).click()
    wait_idle(page)
    page.get_by_role("button", name="Predict and retrain").click()
    charts = page.get_by_test_id("stPlotlyChart")
    expect(charts).to_have_count(2, timeout=READY_TIMEOUT)
    wait_idle(page)
    for name in ("First order", "Second order (Basu et al.)", "Newton-corrected"):
        expect(charts.first.get_by_text(name)).to_be_visible()
    summary = page.locator(".st-key-groups_summary")
    for figure in ("Spearman", "Pearson", "Slope"):
        expect(summary.get_by_test_id("stMetricLabel").filter(has_text=figure)).to_have_count(3)
    no_exception(page)
    page.set_viewport_size({"width": 1500, "height": 2000})
    wait_idle(page)
    screenshot(page, "groups-result")
