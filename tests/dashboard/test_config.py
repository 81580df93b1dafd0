"""Safe defaults in .streamlit/config.toml, checked as a file (the live server is checked by
tests/e2e/test_hardening_e2e.py: XSRF, CORS and WebSocket origin)."""

from __future__ import annotations

import pytest

from core.archive import UploadLimits
from core.images import DEFAULT_MAX_BYTES
from dashboard.services import uploads
from dashboard.services.housekeeping import DEFAULT_UPLOAD_MEMORY
from tests.prepared_cache import REPO

tomllib = pytest.importorskip("tomllib")


@pytest.fixture(scope="module")
def config() -> dict:
    return tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())


def test_cross_site_protections_are_on_and_nothing_is_opened(config: dict) -> None:
    server = config["server"]
    assert server["enableXsrfProtection"] is True
    assert server["enableCORS"] is True
    # Opening the app to other sites would undo the two lines above.
    assert "*" not in server.get("corsAllowedOrigins", [])
    assert "*" not in server.get("allowedHosts", [])
    # SameSite=None would let other sites' requests carry the XSRF cookie.
    assert server.get("xsrfCookieSameSite", "lax") in ("lax", "strict")
    assert server.get("enableStaticServing", False) is False


def test_uploads_are_bounded_by_the_largest_file_a_page_takes(config: dict) -> None:
    # Streamlit counts maxUploadSize in MiB. The largest file a page takes is a network's weights;
    # a larger server limit would let it receive files every page refuses anyway.
    assert config["server"]["maxUploadSize"] * 2**20 == UploadLimits().max_weights_bytes
    # Everything posted past a widget is held in memory until the housekeeping drops it, so the
    # server's own limit must fit in the default bound across sessions.
    assert config["server"]["maxUploadSize"] * 2**20 <= DEFAULT_UPLOAD_MEMORY
    # The Explain page's image widget keeps the decoder's own limit.
    assert uploads.MAX_UPLOAD_MB * 2**20 == DEFAULT_MAX_BYTES


def test_no_tracebacks_reach_the_browser_and_no_usage_stats_leave(config: dict) -> None:
    assert config["client"]["showErrorDetails"] == "none"
    assert config["browser"]["gatherUsageStats"] is False
