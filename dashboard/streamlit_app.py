"""Influence Explorer dashboard: page config, the shared sidebar, then the chosen page.

Run with ``streamlit run dashboard/streamlit_app.py`` (``make run``). Pages are listed in
``dashboard/navigation.py``; all calls into the engine go through ``dashboard/services/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/streamlit_app.py` puts dashboard/ (not the repository) on sys.path;
# without an editable install, `import dashboard` and `import core` would then fail.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import streamlit as st  # noqa: E402

from dashboard import navigation, sidebar  # noqa: E402
from dashboard.services.widgets import keep_widget_values  # noqa: E402

st.set_page_config(
    page_title="Influence Explorer",
    page_icon=":material/image_search:",
    layout="wide",
    initial_sidebar_state="expanded",
)
keep_widget_values()
page = navigation.build_navigation()
sidebar.render()
page.run()
