"""The button-run-remember flow of the pages that run an experiment (Groups, Data cleaning, Attack),
and the labelled test image those that retrain against one show.

Each shows the result remembered for its settings, or a button that runs it; a domain error
appears as the dashboard's message (with the control that fixes it) and the page goes on.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, TypeVar

import streamlit as st

from dashboard.components.images import upscale
from dashboard.services import InfluenceExplorerError, explanations, facts, query
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


def retraining_test_image(
    explainer: Any, model_key: str, test_index: int, model_label: str, loss_sentence: str
) -> tuple[Any, str]:
    """Show the labelled test image a page retrains against, with its true and predicted labels.

    Says so when Explain is showing an upload (these pages need a labelled test image).

    Args:
        explainer: the session's explainer.
        model_key: the model whose prediction is shown.
        test_index: the test image.
        model_label: the model's display name.
        loss_sentence: what loss the page explains, appended to the caption.

    Returns:
        The model's prediction (``facts.test_prediction``) and the true label's name.
    """
    if query.current_query(explainer).upload is not None:
        st.caption(
            "Explain is showing your upload. This page retrains against a labelled test image, "
            "so it uses one of the test images."
        )
    prediction = facts.test_prediction(explainer, model_key, test_index)
    true_name = facts.test_label_name(explainer, test_index)
    st.image(upscale(facts.test_image(explainer, test_index), 112), width=112)
    probability = explanations.probability_text(explainer, model_key, prediction.probability)
    st.caption(
        f"True label **{true_name}**; the {model_label} predicts "
        f"**{prediction.label_name}** ({probability}). {loss_sentence}"
    )
    return prediction, true_name
