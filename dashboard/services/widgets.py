"""Widget values that survive a visit to another page, and first values given the quiet way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

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


def forget_out_of_range(key: str, low: int, high: int) -> None:
    """Drop widget ``key``'s value if it is outside [low, high] (e.g. after a dataset change)."""
    value = st.session_state.get(key)
    if value is not None and not low <= value <= high:
        del st.session_state[key]


def forget_unless_among(key: str, options: Sequence[Any]) -> None:
    """Drop widget ``key``'s value if it is not one of ``options`` (e.g. a model that the current
    engine does not have)."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
