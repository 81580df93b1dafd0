"""Fixtures for the AppTest suite: a prepared cache, clean Streamlit caches, an app factory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.store import ENV_CACHE_DIR
from tests.prepared_cache import REPO, cache_dir, prepare_default_explainer

APP = REPO / "dashboard" / "streamlit_app.py"
#: Generous: a warm build takes seconds, but the machine may be shared and busy.
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="session")
def prepared_cache() -> Iterator[Path]:
    """INFLUENCE_CACHE_DIR pointing at a cache holding the default demo explainer's artifacts."""
    directory = cache_dir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_CACHE_DIR, str(directory))
        prepare_default_explainer(directory)
        yield directory


@pytest.fixture(autouse=True)
def _clear_streamlit_caches() -> Iterator[None]:
    # Both caches live in the process and outlive AppTest instances; tests must not share them.
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def make_app(prepared_cache: Path) -> Callable[[], AppTest]:
    """A fresh session of the dashboard (not yet run)."""

    def make() -> AppTest:
        return AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT)

    return make


def wait_for_every_model(at: AppTest) -> AppTest:
    """Run the page again once the full preparation behind a first look (the Explain page shows
    the RBF SVM first while backbone features are computed) has finished; as is otherwise."""
    from dashboard.services import engines

    job = engines.preparations().peek(at.session_state["state_settings"].engine)
    if job is None or job.finished:
        return at
    deadline = time.monotonic() + RUN_TIMEOUT
    while not job.wait(1.0) and time.monotonic() < deadline:
        job.touch()  # what the page's progress bar does while it is shown
    return at.run()
