"""The button-run-remember flow of the pages that run an experiment (Groups, Data cleaning, Attack).

Each shows the result remembered for its settings, or a button that runs it; a domain error
appears as the dashboard's message (with the control that fixes it) and the page goes on.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, TypeVar

import streamlit as st

from dashboard.services import InfluenceExplorerError
from dashboard.services.engines import error_message
from dashboard.services.runs import SessionRuns
from dashboard.services.settings import Settings

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def remembered_or_run(
    runs: SessionRuns[K, T],
    run: K | None,
    *args: Any,
    key: str,
    label: str,
    running: str,
    idle: str,
    settings: Settings | None = None,
) -> T:
    """The result remembered for ``run``, or the one a click on the button computes; stops the
    page if there is none.

    Args:
        runs: the kind of experiment (its computation and this session's results).
        run: the frozen description of the run the page's settings ask for, or None when they
            are invalid (their error is already shown; the button is then disabled).
        args: passed on to the computation (e.g. the explainer).
        key: the button's widget key.
        label: the button's label before the first run ("Run again" afterwards).
        running: caption while running, e.g. "Retraining…".
        idle: what to press, shown while there is no result.
        settings: the sidebar settings, for the error message's hint.
    """
    remembered = None if run is None else runs.remembered(run)
    pressed = st.button(
        label if remembered is None else "Run again",
        key=key,
        type="primary",
        disabled=run is None,
    )
    result = remembered
    if pressed and run is not None:
        hint = st.caption(f"{running} navigate to another page to cancel.")
        try:
            result = runs.run(run, *args)
        except InfluenceExplorerError as exc:
            st.error(error_message(exc, settings))
            result = None
        hint.empty()
    if result is None:
        if run is not None:
            st.info(f"Not run yet for these settings. {idle}")
        st.stop()
    return result
