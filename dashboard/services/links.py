"""Every view is a link: the address carries what the page shows, and opening it shows that view.

The address is the page's path (``/verify``) and query parameters (``st.query_params``) for

- the sidebar, on every page: ``dataset``, ``classes`` (two or more class indices separated by
  commas, or ``all``), ``backbone``, ``estimate``, ``k``, and, when not at their defaults,
  ``solver``, ``damping``, ``max_train`` (a number, or ``all`` for every training image) and
  ``size`` (directory datasets);
- what Explain, Compare and Verify explain: ``test`` (a test index) or ``upload`` (the sha256 of
  an upload's decoded pixels, kept on the server by :mod:`.uploads`);
- each page's own controls, listed in :data:`PAGE_PARAMS` (e.g. Verify's ``vk``, Attack's
  ``model``, ``test`` and ``budget``).

Every value is written, not only those that differ from a default, so a link keeps its meaning if
a default changes (the sidebar's advanced settings excepted, to keep links short).

**Opening a link** (:func:`apply_link`, once per browser session, before any widget is drawn):
each parameter is parsed and checked, and its value is put into the session state of the widget
it belongs to; the widgets then start from it. A parameter that cannot be followed (unknown, not a
number, out of range, a class the dataset lacks, an upload this server does not keep) gets a
notice at the top of the page saying what was asked, why it cannot be and what is shown instead
(:mod:`.notices`); never an exception. Checks that need the prepared models (a test index
against the number of test images, a model key) happen where the value is read, through
:func:`.notices.pending`.

**Keeping the address current** (:func:`publish`): the entrypoint writes it before the page
runs, and each page again once its own controls are drawn, so the address always describes
what is on screen. Streamlit's own ``bind="query-params"`` is not used: it names parameters after
widget keys, writes selectboxes by their display labels, drops values equal to the default and
ignores invalid values silently, where a link here must say so.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import streamlit as st

from core.influence import ESTIMATES
from dashboard.services import InfluenceExplorerError, your_data
from dashboard.services.link_params import (
    PAGE_PARAMS,
    QUERY_PAGES,
    SIDEBAR_PARAMS,
    LinkValueError,
    Param,
    choice,
    damping,
    late_parsers,
    non_negative,
    shown,
    whole,
)
from dashboard.services.notices import mark_pending, notice
from dashboard.services.query import (
    inspected_text,
    open_linked_inspection,
    open_linked_test_image,
    open_linked_upload,
    query_link,
)
from dashboard.services.settings import (
    ALL_OPTION,
    DEMO_SPEC,
    IMAGE_SIZE_CHOICES,
    MAX_TRAIN_PER_CLASS,
    SOLVER_LABELS,
    UPLOAD_PREFIX,
    Settings,
    backbone_choices,
    data_roots,
    dataset_choices,
    default_pair,
    load_dataset,
)

#: A link's value for every class (``classes=all``) or every training image (``max_train=all``).
ALL = ALL_OPTION

# Session-state keys owned by this module.
_APPLIED = "state_link_applied"
_PAGE = "state_link_page"


def page_path(url_path: str) -> str:
    """The page's key in :data:`PAGE_PARAMS` ("explain" for the home page)."""
    return url_path or "explain"


# --------------------------------------------------------------------------- opening a link
def apply_link(url_path: str) -> None:
    """Follow the address's parameters once per session, before any widget is drawn."""
    page = page_path(url_path)
    st.session_state[_PAGE] = page
    if st.session_state.get(_APPLIED):
        return
    st.session_state[_APPLIED] = True
    given = {name: st.query_params.get_all(name) for name in st.query_params}
    given = {name: values[-1] for name, values in given.items() if values}
    if not given:
        return
    _apply_sidebar(given)
    if page in QUERY_PAGES:
        _apply_query(given)
        if page == "explain" and "inspect" in given:
            _apply_inspect(given.pop("inspect"))
    late = late_parsers()
    for param in PAGE_PARAMS.get(page, ()):
        if param.name not in given:
            continue
        text = given.pop(param.name)
        parse = late.get((page, param.name), param.parse)
        try:
            value = parse(text)
        except (LinkValueError, ValueError) as exc:
            notice(f"The link's {param.name}={_quote(text)} was ignored: {exc}.")
            continue
        st.session_state[param.key] = value
        if param.check:
            mark_pending(param.key, _quote(text))
    for name, text in given.items():
        notice(
            f"The link's {_quote(name)}={_quote(text)} is not a setting of this page; "
            "it was ignored."
        )


def _quote(text: str) -> str:
    """A value from the address, shortened and safe to show as Markdown code."""
    cleaned = "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in str(text))
    return f"`{cleaned[:40]}{'…' if len(cleaned) > 40 else ''}`"


def _apply_sidebar(given: dict[str, str]) -> None:
    defaults = Settings()
    # dataset first: the classes are checked against it.
    spec = DEMO_SPEC
    # An uploaded dataset and network (?data=<hash>&net=<hash>) are adopted by the sidebar
    # (your_data.read_link, which also says when this server does not have them); the classes
    # are checked against that dataset.
    data = given.pop(your_data.DATA_PARAM, None)
    given.pop(your_data.NETWORK_PARAM, None)
    if data and your_data.stored_dataset_exists(data):
        spec = UPLOAD_PREFIX + data
        given.pop("dataset", None)
    if "dataset" in given:
        text = given.pop("dataset")
        offered = {choice.spec for choice in dataset_choices()}
        if text in offered:
            st.session_state["side_dataset"] = text
            spec = text
        elif data_roots() and text not in ("demo", "fashion-mnist"):
            # A directory under the data roots: the sidebar opens it (and falls back, with its
            # own message, if it cannot).
            st.session_state["side_dataset_path"] = text
            spec = text
        else:
            notice(
                f"The link's dataset {_quote(text)} is not available on this server; showing "
                "the bundled demo."
            )
    image_size = defaults.image_size
    if "size" in given:
        text = given.pop("size")
        try:
            image_size = choice([str(s) for s in IMAGE_SIZE_CHOICES])(text)
            image_size = int(image_size)
            st.session_state["side_image_size"] = image_size
        except LinkValueError as exc:
            notice(f"The link's size={_quote(text)} was ignored: {exc}.")
    if "classes" in given:
        text = given.pop("classes")
        _apply_classes(text, spec, image_size)
    if given.get("max_train") == ALL:
        given.pop("max_train")
        st.session_state["side_max_train_all"] = True
    simple = {
        "backbone": ("side_backbone", choice([c.name for c in backbone_choices()])),
        "estimate": ("side_estimate", choice(ESTIMATES)),
        "k": ("side_k", whole(1, 30)),
        "solver": ("side_solver", choice(list(SOLVER_LABELS))),
        "damping": ("side_damping", damping),
        "max_train": ("side_max_train", whole(10, MAX_TRAIN_PER_CLASS)),
    }
    for name, (key, parse) in simple.items():
        if name not in given:
            continue
        text = given.pop(name)
        try:
            st.session_state[key] = parse(text)
        except LinkValueError as exc:
            notice(f"The link's {name}={_quote(text)} was ignored: {exc}.")


def _apply_classes(text: str, spec: str, image_size: int) -> None:
    try:
        dataset = load_dataset(spec, image_size)
    except InfluenceExplorerError:
        return  # the sidebar says why the dataset cannot be opened, and uses the demo
    names = list(dataset.class_names)
    try:
        chosen = _parse_classes(text, len(names))
    except LinkValueError as exc:
        notice(
            f"The link's classes={_quote(text)} were ignored: {exc} (this dataset has classes "
            f"0 to {len(names) - 1}); showing "
            f"{' vs '.join(names[c] for c in default_pair(dataset))}."
        )
        return
    st.session_state["side_classes_dataset"] = spec
    st.session_state["side_classes"] = chosen
    st.session_state["state_classes_before"] = chosen


def _parse_classes(text: str, n_classes: int) -> list[int | str]:
    """``all``, or two or more different class indices separated by commas (sorted)."""
    if text.strip() == ALL:
        return [ALL]
    parts = text.split(",")
    if len(parts) < 2:
        raise LinkValueError("two or more class indices separated by commas, or all, are expected")
    indices = [whole(0, n_classes - 1)(part) for part in parts]
    if len(set(indices)) != len(indices):
        raise LinkValueError("a class is listed twice")
    return sorted(indices)


def _apply_query(given: dict[str, str]) -> None:
    if "upload" in given:
        digest = given.pop("upload")
        if open_linked_upload(digest):
            given.pop("test", None)
            return
    if "test" in given:
        text = given.pop("test")
        try:
            index = non_negative(text)
        except LinkValueError as exc:
            notice(f"The link's test={_quote(text)} was ignored: {exc}; showing test image #0.")
            return
        open_linked_test_image(index, str(index))


def _apply_inspect(text: str) -> None:
    model, _, index = text.partition(":")
    if not (model and index.isascii() and index.isdigit()):
        notice(
            f"The link's inspect={_quote(text)} was ignored: it must be <model>:<training "
            "index>, e.g. logreg:812."
        )
        return
    open_linked_inspection(model, int(index), _quote(text))


# --------------------------------------------------------------------------- writing the address
def current_params(
    settings: Settings, explainer: Any | None = None, *, essential: bool = False
) -> dict[str, str]:
    """The parameters that describe the current view, in a stable order.

    Args:
        essential: only what decides the result (the sidebar and the query), not how the page
            is being browsed (Explain's gallery page, the inspected image).
    """
    page = st.session_state.get(_PAGE, "explain")
    defaults = Settings()
    uploaded = your_data.link_query(settings)
    params: dict[str, str] = {
        # An uploaded dataset is named by its content hash (``data``), not its store path.
        **(uploaded or {"dataset": settings.dataset}),
        "classes": _classes_text(settings),
        "backbone": settings.backbone,
        "estimate": settings.estimate,
        "k": str(settings.k),
    }
    if settings.solver != defaults.solver:
        params["solver"] = settings.solver
    if settings.damping != defaults.damping:
        params["damping"] = f"{settings.damping:g}"
    if settings.max_train_per_class != defaults.max_train_per_class:
        cap = settings.max_train_per_class
        params["max_train"] = ALL if cap is None else str(cap)
    if settings.image_size != defaults.image_size:
        params["size"] = str(settings.image_size)
    if page in QUERY_PAGES:
        params.update(query_link(explainer))
    if essential and page == "explain":
        return params
    if page == "explain":
        inspected = inspected_text()
        if inspected is not None:
            params["inspect"] = inspected
    for param in PAGE_PARAMS.get(page, ()):
        value = st.session_state.get(param.key)
        if value is None or (isinstance(value, str) and not value):
            continue
        params[param.name] = shown(value)
    return params


def _classes_text(settings: Settings) -> str:
    """``all`` for every class of the dataset, else the indices separated by commas."""
    try:
        every = load_dataset(settings.dataset, settings.image_size).n_classes
    except InfluenceExplorerError:
        every = None
    if len(settings.classes) == every and sorted(settings.classes) == list(range(every)):
        return ALL
    return ",".join(str(c) for c in settings.classes)


def publish(settings: Settings, explainer: Any | None = None) -> None:
    """Write the address for the current view (only if it changed)."""
    params = current_params(settings, explainer)
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)


def view_link(settings: Settings, explainer: Any | None = None, *, essential: bool = False) -> str:
    """The full address of the current view, e.g. for a report (relative when the browser's
    address is unknown). ``essential``: see :func:`current_params`."""
    base = getattr(st.context, "url", None) or ""
    return f"{base}?{urlencode(current_params(settings, explainer, essential=essential))}"


__all__ = [
    "PAGE_PARAMS",
    "QUERY_PAGES",
    "SIDEBAR_PARAMS",
    "LinkValueError",
    "Param",
    "apply_link",
    "current_params",
    "publish",
    "view_link",
]
