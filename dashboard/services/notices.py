"""What a link asked for and could not have: notices at the top of the page, until dismissed.

A link (see :mod:`.links`) can name a test image that does not exist here, an upload this server
no longer keeps, a class the dataset lacks. Such a value is replaced by a sensible fallback and the
user is told, in one sentence, what was asked, why it is not possible and what is shown instead.

Some values can only be checked once the explainer is ready (a test index against the number of
test images): the link marks their keys *pending* with the address's text, and the code that
finally reads the value checks it and calls :func:`notice` if it must fall back.
"""

from __future__ import annotations

import threading
from typing import Any

import streamlit as st

# Session-state keys owned by this module.
_NOTICES = "state_link_notices"
_PENDING = "state_link_pending"

# The container at the top of this run's page; set by the entrypoint before the page runs, read
# by notice() later in the same run (each session's script runs in one thread at a time).
_AREA = threading.local()


def notice_area() -> None:
    """Draw the notices kept so far at the top of the page; later notices of this run go there."""
    area = st.container(key="link_notices")
    _AREA.messages = area.container()
    _AREA.controls = area.container()
    _AREA.button = False
    for text in st.session_state.get(_NOTICES, ()):
        _draw(text)


def _draw(text: str) -> None:
    messages = getattr(_AREA, "messages", None)
    (messages if messages is not None else st).warning(text, icon=":material/link_off:")
    controls = getattr(_AREA, "controls", None)
    if controls is not None and not _AREA.button:
        _AREA.button = True
        controls.button("Dismiss", key="link_notices_dismiss", on_click=dismiss, type="tertiary")


def notice(text: str) -> None:
    """Tell the user that part of the link could not be followed (kept until dismissed)."""
    kept = list(st.session_state.get(_NOTICES, ()))
    if text in kept:
        return
    st.session_state[_NOTICES] = [*kept, text]
    _draw(text)


def notices() -> list[str]:
    """The notices kept for this session (oldest first)."""
    return list(st.session_state.get(_NOTICES, ()))


def dismiss() -> None:
    st.session_state[_NOTICES] = []


def mark_pending(key: str, shown: str) -> None:
    """Remember that the link set ``key`` to the value written ``shown`` in the address, to be
    checked where the value is read."""
    pending = dict(st.session_state.get(_PENDING, {}))
    pending[key] = shown
    st.session_state[_PENDING] = pending


def pending(key: str) -> str | None:
    """The address's text for ``key`` if the link set it and it is not checked yet, else None."""
    return st.session_state.get(_PENDING, {}).get(key)


def settle(key: str) -> None:
    """``key`` has been checked (or replaced by the user): no longer pending."""
    current: dict[str, Any] = st.session_state.get(_PENDING, {})
    if key in current:
        st.session_state[_PENDING] = {k: v for k, v in current.items() if k != key}
