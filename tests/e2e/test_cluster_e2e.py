"""The dashboard on a Dask cluster, in a real browser: a server started with
``INFLUENCE_CLUSTER=local:2`` shows its workers in the sidebar, explains and verifies with the
logistic regression on the cluster, and serves what needs the training rows in one place (the
heatmap, Data cleaning, Groups) from an in-process copy of the models, saying so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from bench.load import streamlit_server
from tests.e2e.conftest import ARTIFACTS, Server
from tests.e2e.test_dashboard_e2e import (
    READY_TIMEOUT,
    expect_both_models_explained,
    inspect_most_helpful,
    no_exception,
    open_app,
    screenshot,
    verify_both_models,
    wait_idle,
)
from tests.e2e.test_your_data_e2e import upload_then_explain_with_three_models
from tests.prepared_cache import cache_dir, prepare_default_explainer

pytestmark = pytest.mark.e2e

IN_PROCESS_NOTE = "uses a copy of the models prepared in the server's own process"


@pytest.fixture(scope="module")
def cluster_server(chromium_path: str) -> Iterator[Server]:
    pytest.importorskip("distributed")
    directory = cache_dir()
    prepare_default_explainer(directory)
    with streamlit_server(
        directory, ARTIFACTS / "e2e-cluster-server.log", {"INFLUENCE_CLUSTER": "local:2"}
    ) as server:
        yield server


def _sidebar(page: Any) -> Any:
    return page.get_by_test_id("stSidebar")


def test_the_dashboard_on_a_local_cluster(page: Any, cluster_server: Server) -> None:
    from playwright.sync_api import expect

    open_app(page, cluster_server)
    expect_both_models_explained(page)
    sidebar = _sidebar(page)
    expect(
        sidebar.get_by_text(re.compile(r"Computed on a local Dask cluster tcp://"))
    ).to_be_visible()
    line = sidebar.get_by_text(re.compile(r"Computed on a local Dask cluster")).inner_text()
    assert re.search(r": 2 workers, 2 threads, [0-9.]+ GiB memory \(local:2\)", line), line
    expect(sidebar.get_by_text(re.compile(r"^On this server \(the RBF SVM"))).to_be_visible()
    # The cluster's explanation says nothing about a copy: it is the cluster's own.
    expect(page.get_by_text(IN_PROCESS_NOTE)).to_have_count(0)
    no_exception(page)
    screenshot(page, "cluster-explain")

    # The logistic regression's heatmap differentiates through its training inputs: the
    # in-process copy is prepared in the dialog, then the overlay is drawn.
    dialog = inspect_most_helpful(page, "logreg")
    expect(dialog.get_by_text(IN_PROCESS_NOTE)).to_be_visible()
    no_exception(page)
    dialog.get_by_label("Close").click()
    expect(page.get_by_role("dialog")).to_have_count(0)

    # Verify: leave-one-out retraining of the logistic regression runs as tasks on the workers.
    chart = verify_both_models(page, cluster_server, k=5)
    expect(chart.locator(".cartesianlayer .subplot")).to_have_count(2)
    no_exception(page)

    # Data cleaning ranks by self-influence from the in-process copy, and says so.
    open_app(page, cluster_server, "data-cleaning")
    expect(page.get_by_role("heading", name="Data cleaning")).to_be_visible(timeout=READY_TIMEOUT)
    expect(page.get_by_text(IN_PROCESS_NOTE)).to_be_visible()
    expect(page.get_by_test_id("stDataFrame").first).to_be_visible()
    no_exception(page)

    # Groups on the logistic regression: predicted against actual removal, retrained here.
    open_app(page, cluster_server, "groups")
    expect(page.get_by_text(IN_PROCESS_NOTE)).to_be_visible(timeout=READY_TIMEOUT)
    page.get_by_test_id("stRadio").get_by_text(re.compile(r"^Logistic regression on")).click()
    wait_idle(page)
    page.get_by_role("button", name="Predict and retrain").click()
    charts = page.get_by_test_id("stPlotlyChart")
    expect(charts).to_have_count(2, timeout=READY_TIMEOUT)
    result = re.compile(r"groups · test image #\d+ · Logistic regression on")
    expect(page.get_by_role("heading", name=result)).to_be_visible()
    wait_idle(page)
    no_exception(page)
    screenshot(page, "cluster-groups")


def test_your_data_on_a_local_cluster(page: Any, browser: Any, cluster_server: Server) -> None:
    """A user's own dataset and network on a server with a cluster: the same path as on one
    machine (upload, three models, a test image and an upload explained, the link, deletion)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # preparing three models, as on Your data's own tests
    upload_then_explain_with_three_models(page, browser, cluster_server)
    # The explanations came from this server's cluster, as its sidebar says.
    expect(
        _sidebar(page).get_by_text(re.compile(r"Computed on a local Dask cluster tcp://"))
    ).to_be_visible()
    no_exception(page)
