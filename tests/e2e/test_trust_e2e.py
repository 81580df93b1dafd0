"""The Trust page in a real browser: it opens on its URL and shows the study's numbers next to
ours, the noise floor, the table and the charts."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_dashboard_e2e import no_exception, screenshot, wait_idle

pytestmark = pytest.mark.e2e


def test_trust_shows_the_fragility_table_and_charts(page: Any, app_server: Server) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # reruns on a shared, busy machine
    page.goto(f"{app_server.url}/trust")
    page.get_by_test_id("stSidebar").wait_for()
    wait_idle(page)
    expect(page.get_by_role("heading", name="Trust: where influence breaks")).to_be_visible()
    expect(page.get_by_role("heading", name="The study's numbers next to ours")).to_be_visible()
    expect(page.get_by_role("heading", name="The noise floor of retraining")).to_be_visible()
    tables = page.get_by_test_id("stDataFrame")
    # The grid renders on a canvas; its accessible copy holds the cells. First the study's
    # Table 1 next to ours, then the noise floor, then every cell.
    expect(tables.nth(0)).to_be_visible()
    expect(tables.nth(0).get_by_text("ResNet-50").first).to_be_attached()
    expect(tables.nth(0).get_by_text("0.95 / 0.87").first).to_be_attached()
    # Its first rows (the grid renders those it shows): a CNN, w50 or w8 by sort order.
    expect(tables.nth(1).get_by_text("CNN d2 w").first).to_be_attached()
    expect(tables.nth(2).get_by_text("RBF SVM (pixels)").first).to_be_attached()
    charts = page.get_by_test_id("stPlotlyChart")
    expect(charts.first.locator(".main-svg").first).to_be_visible()
    expect(page.get_by_role("button", name="Train, explain and retrain")).to_be_enabled()
    no_exception(page)
    page.set_viewport_size({"width": 1400, "height": 4200})
    wait_idle(page)
    screenshot(page, "trust")
