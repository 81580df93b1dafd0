"""The Explain page's first look: the models that need no backbone features, shown while the
rest is prepared.

From an empty cache most of a first preparation is the backbone's forward pass over every image
(about 25 s of the demo's 35 on two cores). The models that need no learned features (core's
:func:`~core.explainer.first_look_config`: the RBF SVM on pixels) are ready in about a second,
so the Explain page prepares them first and shows their explanation, with the full preparation's
progress in the place of the models still to come. The full preparation starts once the first
look is ready (the two never compete for the cores), finds the SVM's fitted parameters in the
cache, and replaces the first look when done; the page's progress fragment reruns it then.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import streamlit as st

from core.errors import InfluenceExplorerError
from core.explainer import Explainer, first_look_config
from dashboard.services import preparing
from dashboard.services.background import Preparation, preparations
from dashboard.services.engines import (
    ask_after_cancel,
    ask_first,
    error_message,
    preparation,
    require_explainer,
    start_preparation,
)
from dashboard.services.settings import EngineSpec, Settings, current_settings, load_dataset


@dataclass(frozen=True)
class FirstLook:
    """What the Explain page shows: the explainer to draw, and what is still being prepared.

    Attributes:
        explainer: the full explainer, or while it is prepared the first look's (prepared).
        pending: the full preparation while it runs (then ``explainer`` is the first look);
            ``None`` once nothing is pending.
        pending_labels: key -> label of the models the full preparation adds.
    """

    explainer: Explainer
    pending: Preparation | None
    pending_labels: dict[str, str]


def first_look_engine(engine: EngineSpec) -> EngineSpec | None:
    """The first look's engine for ``engine``, or None when it would add nothing."""
    config = first_look_config(engine.config)
    return None if config is None else dataclasses.replace(engine, config=config)


def _full(settings: Settings) -> FirstLook:
    return FirstLook(require_explainer(settings), None, {})


def explainer_or_first_look(settings: Settings | None = None) -> FirstLook:
    """The explainer for the sidebar's settings, or, while its backbone features are still to
    be computed, a first look at the models that need none (see :class:`FirstLook`).

    The first look is taken only when it saves the user a wait: the full preparation is not
    finished and either a first look exists already or the backbone features of the chosen
    images are not all cached (otherwise the full preparation takes seconds, and its progress
    is shown as on every page). Errors are shown as in :func:`~.engines.require_explainer`.
    """
    settings = settings or current_settings()
    try:
        ask_first(settings)
        engine = settings.engine
        look_engine = first_look_engine(engine)
        full = preparations().peek(engine)
        if look_engine is None or (full is not None and full.finished):
            if look_engine is not None:
                preparations().forget(look_engine)  # the full explainer holds the same SVM
            return _full(settings)
        look = preparations().peek(look_engine)
        ask_after_cancel(look_engine, look, settings)  # the first look's Cancel, too
        if look is not None and look.abandoned:
            look = None  # nobody watched it: started again below if still wanted
        if look is not None:  # running, or finished: shown unless it failed
            wanted = not (look.finished and look.error is not None)
        else:
            wanted = full is None and preparing.estimate(engine).uncached_images > 0
        if not wanted:
            return _full(settings)
        dataset = load_dataset(settings.dataset, settings.image_size)
        look = preparations().get(look_engine, lambda: start_preparation(look_engine, dataset))
    except InfluenceExplorerError as exc:
        st.error(error_message(exc, settings))
        st.stop()
    if not look.finished:
        preparing.watch(look, settings, first_look=True)
    if look.error is not None or look.result is None:
        # The full preparation reports what went wrong (the same data, the same SVM).
        return _full(settings)
    try:
        full = preparation(settings)
    except InfluenceExplorerError as exc:
        st.error(error_message(exc, settings))
        st.stop()
    if full.finished:
        return _full(settings)
    # Constructing an explainer is cheap (no preparation): it names the models to come.
    specs = Explainer(look.result.source, engine.config, store=look.result.store).model_specs
    pending = {key: label for key, label, _ in specs if key not in look.result.models}
    return FirstLook(look.result, full, pending)
