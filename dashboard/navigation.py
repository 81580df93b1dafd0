"""The page list. To add a page: write ``app_pages/<name>.py`` (a thin script that calls
functions in ``dashboard/services/``) and add one :class:`PageSpec` line to :data:`SECTIONS`.

The AppTest smoke test runs every page listed here, so a new page is covered as soon as it is
registered.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
from streamlit.navigation.page import StreamlitPage


@dataclass(frozen=True)
class PageSpec:
    """One page.

    Attributes:
        script: path of the page script relative to ``dashboard/`` (the entrypoint's directory).
        title: label in the navigation menu and the browser tab.
        icon: a Material icon, e.g. ":material/search:".
        url_path: the page's URL path (unique).
        default: the home page (exactly one).
    """

    script: str
    title: str
    icon: str
    url_path: str
    default: bool = False


#: Section header -> pages, in menu order: explaining one image (Explain, Compare, Verify), what
#: the training data does as a whole (Groups, Data cleaning, Attack), and how it all works and
#: how far to trust it (Method, Trust).
SECTIONS: dict[str, tuple[PageSpec, ...]] = {
    "Explain": (
        PageSpec("app_pages/explain.py", "Explain", ":material/image_search:", "explain", True),
        PageSpec("app_pages/compare.py", "Compare", ":material/compare:", "compare"),
        PageSpec("app_pages/verify.py", "Verify", ":material/fact_check:", "verify"),
    ),
    "Your data": (
        PageSpec("app_pages/your_data.py", "Your data", ":material/upload_file:", "your-data"),
    ),
    "Training data": (
        PageSpec("app_pages/groups.py", "Groups", ":material/workspaces:", "groups"),
        PageSpec(
            "app_pages/cleaning.py",
            "Data cleaning",
            ":material/cleaning_services:",
            "data-cleaning",
        ),
        PageSpec("app_pages/attack.py", "Attack", ":material/bug_report:", "attack"),
    ),
    "About": (
        PageSpec("app_pages/method.py", "Method", ":material/functions:", "method"),
        PageSpec("app_pages/trust.py", "Trust", ":material/verified_user:", "trust"),
    ),
}


def all_pages() -> list[PageSpec]:
    return [page for pages in SECTIONS.values() for page in pages]


def build_navigation() -> StreamlitPage:
    """``st.navigation`` over :data:`SECTIONS`; returns the page to run."""
    return st.navigation(
        {
            section: [
                st.Page(
                    page.script,
                    title=page.title,
                    icon=page.icon,
                    url_path=page.url_path,
                    default=page.default,
                )
                for page in pages
            ]
            for section, pages in SECTIONS.items()
        }
    )
