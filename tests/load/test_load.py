"""Many users at once: ten browser sessions against one ``streamlit run``, twice over.

Each session opens the app, selects its own test image, uploads its own image, verifies it and
comes back; all must succeed, no session may see another's upload or selection, and the
server's memory must stay bounded: it may grow with the sessions held at once, but a second
wave of as many sessions must not need more than the first (nothing kept per past session).
Latencies are reported (``bench/results/load.md`` via ``python -m bench.load``), never asserted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import numpy as np
import pytest

from bench.load import ACTIONS, markdown_report, nearest_rank, run_load_test

pytestmark = pytest.mark.load

SESSIONS = int(os.environ.get("INFLUENCE_LOAD_SESSIONS", "10"))
#: Resident memory one more concurrent session may add to the server (MiB). Measured: about
#: 20-40 MiB each (its page's elements, an explanation, a verification); generous on purpose.
PER_SESSION_MIB = 80.0
#: A second wave may find the allocator's pages fragmented; it must not grow like the first.
SECOND_WAVE_SLACK_MIB = 150.0


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("INFLUENCE_REQUIRE_BROWSER") == "1":
            pytest.fail("no Chromium on PATH, and INFLUENCE_REQUIRE_BROWSER=1")
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    return path


def test_ten_sessions_at_once_succeed_in_isolation_with_bounded_memory(
    chromium: str, report: Callable[[str], None]
) -> None:
    result = run_load_test(sessions=SESSIONS, waves=2, verify_k=3, chromium=chromium)
    print(markdown_report(result))
    assert not result.failures, "\n".join(result.failures)
    assert len(result.results) == 2 * SESSIONS
    # Four checks per session: after selecting, uploading, verifying and coming back.
    assert sum(r.isolation_checks for r in result.results) == 4 * len(result.results)

    first, second = result.wave_reports
    bound = result.baseline_rss_mib + SESSIONS * PER_SESSION_MIB
    assert result.peak_rss_mib <= bound, (result.peak_rss_mib, bound)
    assert second.rss_max_mib <= first.rss_max_mib + SECOND_WAVE_SLACK_MIB, (first, second)

    for action in ACTIONS:
        values = result.latencies(action)
        report(
            f"load, {action}: p50 {np.median(values):.1f} s, p95 {nearest_rank(values, 95):.1f} s "
            f"(n = {len(values)})"
        )
    report(
        f"load: {len(result.results)} sessions ({SESSIONS} at once), peak server RSS "
        f"{result.peak_rss_mib:.0f} MiB (baseline {result.baseline_rss_mib:.0f} MiB), "
        f"load average up to {result.load_max:.1f}"
    )
