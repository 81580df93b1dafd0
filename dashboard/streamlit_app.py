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
from dashboard.components.style import FAVICON, apply_style  # noqa: E402
from dashboard.services import links, notices  # noqa: E402
from dashboard.services.housekeeping import keep_house  # noqa: E402
from dashboard.services.widgets import keep_widget_values  # noqa: E402


def main() -> None:
    st.set_page_config(
        page_title="Influence Explorer",
        # A local image: a ":material/...:" icon would be fetched from a font CDN (fails offline).
        page_icon=FAVICON,
        layout="wide",
        initial_sidebar_state="expanded",
    )
    apply_style()
    # Bounds uploaded files and shuts down ended sessions (a thread started on the first run).
    keep_house()
    keep_widget_values()
    page = navigation.build_navigation()
    notices.notice_area()
    # A link's parameters go into Session State before any widget is drawn (first run only).
    links.apply_link(page.url_path)
    settings = sidebar.render()
    # The address describes the view; pages write it again once their own controls are drawn.
    links.publish(settings)
    page.run()


# Streamlit runs this file as "__main__". The workers of a local Dask cluster the server starts
# (INFLUENCE_CLUSTER=local:N) are new Python processes that import it as "__mp_main__": they
# must not draw the dashboard, which would start a cluster of their own.
if __name__ != "__mp_main__":
    main()
