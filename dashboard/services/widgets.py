"""Widget values that survive a visit to another page, and first values given the quiet way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from dashboard.services.notices import notice, pending, settle

#: Page widgets whose values should survive a visit to another page. Streamlit forgets a widget's
#: value when a run does not draw it; re-saving it at the start of every run keeps it.
PERSISTENT_WIDGETS: tuple[str, ...] = (
    "explain_gallery_filter",
    "explain_gallery_page",
    "verify_k",
    # Training data pages (the test-image inputs are left out on purpose: they start from the
    # image chosen on Explain each time the page is opened).
    "groups_model",
    "groups_kinds",
    "groups_sizes",
    "groups_per_size",
    "groups_custom",
    "groups_seed",
    "clean_model",
    "clean_k",
    "clean_flip_percent",
    "clean_checkpoints",
    "clean_seed",
    "attack_model",
    "attack_budget",
    "attack_step_size",
    "attack_steps",
    "attack_n_perturb",
    "attack_retrain",
)


def keep_widget_values(keys: Sequence[str] = PERSISTENT_WIDGETS) -> None:
    """Called by the entrypoint before any page: keep ``keys``' values across pages."""
    for key in keys:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def initial_value(key: str, value: Any) -> None:
    """Give widget ``key`` its first value through Session State, once per session.

    For widgets listed in :data:`PERSISTENT_WIDGETS`: their value is re-saved through Session State
    on every run, and a widget that also gets a ``value``/``default`` argument makes Streamlit warn.
    """
    if key not in st.session_state:
        st.session_state[key] = value


def forget_out_of_range(key: str, low: int, high: int, *, what: str = "value") -> None:
    """Drop widget ``key``'s value if it is outside [low, high] (e.g. after a dataset change).

    A value a link set (see services/links.py) gets a notice saying so, naming it ``what``.
    """
    value = st.session_state.get(key)
    asked = pending(key)
    settle(key)
    if value is not None and not low <= value <= high:
        del st.session_state[key]
        if asked is not None:
            notice(
                f"The link's {what} {asked} is out of range here ({low} to {high}); using the "
                "page's default."
            )


def forget_unless_among(
    key: str, options: Sequence[Any], *, what: str = "value", names: Sequence[str] = ()
) -> None:
    """Drop widget ``key``'s value if it is not one of ``options`` (e.g. a model that the current
    engine does not have). A value a link set gets a notice, naming it ``what`` and listing
    ``names`` (default: the options)."""
    asked = pending(key)
    settle(key)
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
        if asked is not None:
            listed = ", ".join(str(n) for n in (names or options))
            notice(
                f"The link's {what} {asked} is not available here (choose among {listed}); "
                "using the page's default."
            )
