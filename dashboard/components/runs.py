"""The button-run-remember flow of the pages that run an experiment (Groups, Data cleaning, Attack).

Each shows the result remembered for its settings, or a button that runs it; a domain error
appears as the dashboard's message (with the control that fixes it) and the page goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from dashboard import state

T = TypeVar("T")


def remembered_or_run(
    remembered: T | None,
    run: Callable[[], T],
    *,
    key: str,
    label: str,
    running: str,
    idle: str,
    enabled: bool = True,
    settings: Any = None,
) -> T | None:
    """The remembered result, or the one a click on the button computes; stops the page if none.

    Args:
        remembered: the result already computed for these settings in this session, if any.
        run: computes the result (and remembers it); called only when the button is pressed.
        key: the button's widget key.
        label: the button's label before the first run ("Run again" afterwards).
        running: caption while running, e.g. "Retraining…".
        idle: what to press, shown while there is no result.
        enabled: False when the settings are invalid (their error is already shown).
        settings: the sidebar settings, for the error message's hint.
    """
    pressed = st.button(
        label if remembered is None else "Run again",
        key=key,
        type="primary",
        disabled=not enabled,
    )
    result = remembered
    if pressed and enabled:
        hint = st.caption(f"{running} navigate to another page to cancel.")
        try:
            result = run()
        except state.InfluenceExplorerError as exc:
            st.error(state.error_message(exc, settings))
            result = None
        hint.empty()
    if result is None:
        if enabled:
            st.info(f"Not run yet for these settings. {idle}")
        st.stop()
    return result
