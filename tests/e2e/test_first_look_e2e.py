"""The first look in a real browser: a server with an empty cache shows the RBF SVM's explanation
while the backbone's features are computed, and the logistic regression joins it by itself (the
page's progress fragment reruns it; nobody clicks).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench.load import streamlit_server
from tests.e2e.conftest import ARTIFACTS
from tests.e2e.test_dashboard_e2e import READY_TIMEOUT, no_exception, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: 100 training images per class and the whole test split: 400 images through the backbone
#: (10-20 s on two cores), long enough to see the first look, short enough for CI.
CAP = 100


@pytest.fixture(autouse=True)
def _patient_expect() -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)


def test_an_empty_cache_shows_the_svm_first_then_both_models(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with streamlit_server(tmp_path / "empty-cache", ARTIFACTS / "e2e-first-look.log") as server:
        context = browser.new_context(viewport={"width": 1500, "height": 1100})
        try:
            page = context.new_page()
            start = time.monotonic()
            page.goto(f"{server.url}/?max_train={CAP}")
            svm = page.locator(".st-key-explain_model_svm")
            pending = page.locator(".st-key-explain_pending_logreg")
            svm.wait_for(timeout=READY_TIMEOUT)
            first_look_s = time.monotonic() - start
            # The SVM's lists, and the logistic regression's progress in its place.
            expect(pending).to_be_visible()
            expect(pending.get_by_text("Being prepared in the background")).to_be_visible()
            expect(pending.get_by_test_id("stProgress")).to_be_visible()
            expect(svm.locator('[class*="st-key-explain_inspect_svm_helpful_"]')).to_have_count(10)
            expect(page.locator(".st-key-explain_model_logreg")).to_have_count(0)
            no_exception(page)
            screenshot(page, "first-look")
            # Without a click: the fragment notices the end of the preparation and reruns the page.
            logreg = page.locator(".st-key-explain_model_logreg")
            logreg.wait_for(timeout=READY_TIMEOUT)
            expect(pending).to_have_count(0)
            expect(
                logreg.locator('[class*="st-key-explain_inspect_logreg_helpful_"]')
            ).to_have_count(10)
            expect(page.locator('[class*="st-key-explain_run_check_"]')).to_have_count(2)
            no_exception(page)
            print(
                f"first look after {first_look_s:.1f} s, both models after "
                f"{time.monotonic() - start:.1f} s"
            )
        finally:
            context.close()
