"""Marking training images as mislabelled on Data cleaning: the session's marked list, refitting a
model without them, and the list as CSV.

The marked list is this session's (``state_clean_marked``, sorted training indices) and travels
in the page's link (``marked=``). Refitting is shared across sessions by content (the engine, the
model and the marked indices), like every other experiment.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from core import mislabel as core_mislabel
from core.explainer import Explainer
from dashboard.services.settings import EngineSpec, Settings

__all__ = [
    "MARKED",
    "clear_marks",
    "marked",
    "marked_csv",
    "refit_without_marked",
    "set_marks",
]

#: Session-state key of the marked training indices (sorted).
MARKED = "state_clean_marked"


def marked() -> list[int]:
    """This session's marked training indices, sorted."""
    return [int(i) for i in st.session_state.get(MARKED, ())]


def set_marks(changes: dict[int, bool]) -> None:
    """Mark (True) or unmark (False) training images."""
    chosen = set(marked())
    for index, flag in changes.items():
        (chosen.add if flag else chosen.discard)(int(index))
    st.session_state[MARKED] = sorted(chosen)


def clear_marks() -> None:
    st.session_state[MARKED] = []


@st.cache_data(max_entries=16, show_spinner="Refitting without the marked images…")
def _refit_without(
    engine: EngineSpec, model_key: str, marked: tuple[int, ...], _explainer: Explainer
) -> core_mislabel.RemovalResult:
    return core_mislabel.refit_without(_explainer.models[model_key], _explainer.dataset, marked)


def refit_without_marked(
    explainer: Explainer, settings: Settings, model_key: str, marked: Sequence[int]
) -> core_mislabel.RemovalResult:
    """Refit one model without the marked training images and compare its test accuracy.

    Raises:
        InfluenceExplorerError: nothing marked, or an index out of range.
    """
    return _refit_without(settings.engine, model_key, tuple(sorted(set(marked))), explainer)


def marked_csv(ranking: tuple[core_mislabel.SuspiciousImage, ...], marked: Sequence[int]) -> str:
    """The marked training images as CSV, in the suspicious list's columns and order."""
    chosen = set(int(i) for i in marked)
    return core_mislabel.suspicious_csv(tuple(r for r in ranking if r.train_index in chosen))
