"""What the Explain page draws around a preparation: the models still to come, and the downloads.

The first look (:mod:`dashboard.services.first_look`) shows some models while the others are
prepared; each one to come gets its column with the preparation's progress, which reruns the page
when the preparation is done. The downloads cover every model, so they wait for it.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard.services import explanations, links
from dashboard.services.background import Preparation
from dashboard.services.preparing import stage_text


@st.fragment(run_every=1.0)
def _progress(job: Preparation, n_train: int) -> None:
    job.touch()  # watched: the preparation goes on
    if job.finished:
        st.rerun(scope="app")
    snap = job.snapshot()
    st.progress(
        snap.fraction,
        text=f"{stage_text(snap.stage, snap.done, snap.total, n_train)} · {snap.elapsed:.0f} s",
    )


def pending_model(key: str, label: str, job: Preparation, n_train: int) -> None:
    """A model's column while it is prepared: its name, what is happening, the progress."""
    with st.container(key=f"explain_pending_{key}"):
        st.subheader(label)
        st.caption(
            "Being prepared in the background: its backbone features are computed once per "
            "image and cached. It appears here by itself when ready; the other pages open then."
        )
        _progress(job, n_train)


def downloads(
    explainer: Any, chosen: Any, settings: Any, explanation: Any, checks: Any, *, ready: bool
) -> None:
    """The *Keep or share* popover (report, CSV, JSON), or, while models are still to come
    (``ready`` False), a line saying when it opens."""
    if not ready:
        st.caption(
            "Downloads and the check by retraining open once every model is ready; the "
            "address in the browser's bar already opens this view."
        )
        return
    with (
        st.container(key="explain_exports"),
        st.popover("Keep or share", icon=":material/share:", width="stretch"),
    ):
        st.caption(
            "The address in the browser's bar opens this very view (image, settings, estimate, "
            "k) for anyone with access to this server."
            + (
                " Your upload is kept on the server by content, never listed."
                if chosen.upload
                else ""
            )
        )
        documents = explanations.explanation_documents(
            explainer,
            chosen,
            settings,
            explanation,
            link=links.view_link(settings, explainer, essential=True),
            checks=checks,
        )
        for label, suffix, data, mime in (
            ("Report (HTML)", "html", documents.html, "text/html"),
            ("All scores (CSV)", "csv", documents.csv, "text/csv"),
            ("All scores (JSON)", "json", documents.json, "application/json"),
        ):
            st.download_button(
                label,
                data=data,
                file_name=f"{documents.stem}.{suffix}",
                mime=mime,
                key=f"explain_download_{suffix}",
                on_click="ignore",
                icon=":material/download:",
                width="stretch",
            )
