"""The shared sidebar: dataset, class pair, backbone, k, estimate and (under Advanced) the solver.

Drawn by the entrypoint on every page, so its widgets (keys ``side_*``) keep their values while the
user moves between pages. Returns the :class:`~dashboard.services.settings.Settings` they
describe; problems (an unreadable directory, an unavailable backbone, the same class twice) are
shown here with ``st.error`` and a working fallback is used, so the pages keep working.
"""

from __future__ import annotations

import streamlit as st

from dashboard.services import InfluenceExplorerError, your_data
from dashboard.services.settings import (
    DAMPING_CHOICES,
    DATA_ROOTS_ENV,
    DEFAULT_BACKBONE,
    DEMO_SPEC,
    ESTIMATE_LABELS,
    ESTIMATES,
    FASHION_MNIST_SPEC,
    IMAGE_SIZE_CHOICES,
    SOLVER_CAUTIONS,
    SOLVER_LABELS,
    Dataset,
    Settings,
    backbone_choices,
    class_names,
    data_roots,
    dataset_choices,
    dataset_is_directory,
    default_pair,
    load_dataset,
    store_settings,
)
from dashboard.services.widgets import initial_value


def render() -> Settings:
    defaults = Settings()
    # A link naming an uploaded dataset (?data=<hash>) makes it this session's, before the
    # dataset picker is drawn.
    link_notice = your_data.read_link()
    # First values through Session State rather than the widgets' defaults: a link (see
    # services/links.py) sets them there before the widgets are drawn, and a widget with a
    # default as well would make Streamlit warn.
    initial_value("side_k", defaults.k)
    initial_value("side_estimate", defaults.estimate)
    initial_value("side_damping", defaults.damping)
    initial_value("side_max_train", defaults.max_train_per_class)
    initial_value("side_image_size", defaults.image_size)
    with st.sidebar:
        if link_notice:
            st.warning(link_notice)
        st.header("Data and models")
        dataset_spec, dataset = _dataset_picker()
        classes = _class_pair(dataset, dataset_spec)
        backbone = _backbone_picker()
        k = st.slider(
            "Images per list (k)",
            min_value=1,
            max_value=30,
            key="side_k",
            help="How many of the most helpful and of the most harmful training images to show.",
        )
        estimate = st.segmented_control(
            "Influence estimate",
            options=list(ESTIMATES),
            required=True,
            format_func=ESTIMATE_LABELS.get,
            key="side_estimate",
            help="Newton-corrected (default) uses the Hessian without the removed image and "
            "matches retraining closely; first order is Koh & Liang's original formula.",
        )
        with st.expander("Advanced"):
            solver = st.selectbox(
                "Inverse-Hessian solver",
                options=list(SOLVER_LABELS),
                format_func=SOLVER_LABELS.get,
                key="side_solver",
                help="Exact factorises the Hessian once; CG and LiSSA are the iterative "
                "methods used for large models (LiSSA is stochastic and can be slow).",
            )
            if solver in SOLVER_CAUTIONS:
                st.warning(SOLVER_CAUTIONS[solver])
            damping = st.select_slider(
                "Damping (added to the Hessian's diagonal)",
                options=list(DAMPING_CHOICES),
                format_func=lambda v: "0" if v == 0 else f"{v:g}",
                key="side_damping",
            )
            image_size = defaults.image_size
            max_train = defaults.max_train_per_class
            if dataset_is_directory(dataset_spec) or dataset_spec == FASHION_MNIST_SPEC:
                max_train = int(
                    st.number_input(
                        "Max training images per class",
                        min_value=10,
                        max_value=5000,
                        step=100,
                        key="side_max_train",
                        help="Larger sets are subsampled (seeded): the SVM's kernel is n × n.",
                    )
                )
            if your_data.network_sets_size(dataset_spec):
                st.caption("Images are read at your network's input size.")
            elif dataset_is_directory(dataset_spec):
                image_size = st.selectbox(
                    "Image size for directory datasets (pixels)",
                    options=list(IMAGE_SIZE_CHOICES),
                    key="side_image_size",
                )
    settings = Settings(
        dataset=dataset_spec,
        image_size=int(image_size),
        classes=classes,
        backbone=backbone,
        k=int(k),
        estimate=estimate or defaults.estimate,
        solver=solver or "exact",
        damping=float(damping),
        max_train_per_class=max_train,
    )
    # With this session's uploaded network, its dataset gets the third model at its input size.
    settings = your_data.apply_to_settings(settings)
    your_data.publish_link(settings)
    store_settings(settings)
    return settings


def _dataset_picker() -> tuple[str, Dataset]:
    choices = dataset_choices()
    labels = {choice.spec: choice.label for choice in choices}
    own = your_data.dataset_option()
    if own is not None:
        labels[own[0]] = own[1]
    spec = st.selectbox(
        "Dataset",
        options=list(labels),
        format_func=labels.get,
        key="side_dataset",
    )
    roots = data_roots()
    if roots:
        path = st.text_input(
            "…or a directory under the data roots",
            key="side_dataset_path",
            placeholder="e.g. my-photos (relative to a data root)",
            help="ImageFolder (train/<class>/*, test/<class>/*) or Fashion-MNIST idx files. "
            "Allowed roots: " + ", ".join(str(root) for root in roots),
        ).strip()
        if path:
            spec = path
    else:
        st.caption(f"Server-side datasets are off: set {DATA_ROOTS_ENV} to allow directories.")
    image_size = int(st.session_state.get("side_image_size", Settings().image_size))
    try:
        return spec, load_dataset(spec, image_size)
    except InfluenceExplorerError as exc:
        st.error(f"{exc} Using the bundled demo instead.")
        return DEMO_SPEC, load_dataset(DEMO_SPEC, image_size)


def _class_pair(dataset: Dataset, spec: str) -> tuple[int, int]:
    names = class_names(dataset)
    first, second = default_pair(dataset)
    options = list(range(len(names)))
    # The pair belongs to a dataset: when the dataset changes, start from its default pair.
    if st.session_state.get("side_pair_dataset") != spec:
        st.session_state["side_pair_dataset"] = spec
        st.session_state["side_class_a"] = first
        st.session_state["side_class_b"] = second
    col_a, col_b = st.columns(2)
    a = col_a.selectbox("Class A", options, format_func=names.__getitem__, key="side_class_a")
    b = col_b.selectbox("Class B", options, format_func=names.__getitem__, key="side_class_b")
    if a == b:
        st.error(
            f"Pick two different classes (both are {names[a]!r}); "
            f"showing {names[first]} vs {names[second]}."
        )
        return first, second
    return int(a), int(b)


def _backbone_picker() -> str:
    choices = backbone_choices()
    by_name = {choice.name: choice for choice in choices}

    def label(name: str) -> str:
        choice = by_name[name]
        return choice.label if choice.available else f"{choice.label} (unavailable)"

    name = st.radio(
        "Backbone for the logistic regression",
        options=list(by_name),
        format_func=label,
        key="side_backbone",
        captions=[
            "ImageNet features, works offline" if c.available else "weights not found here"
            for c in choices
        ],
    )
    choice = by_name.get(name)
    if choice is None or not choice.available:
        fallback = DEFAULT_BACKBONE
        reason = choice.reason if choice is not None else "unknown backbone"
        st.error(
            f"{choice.label if choice else name} is unavailable: {reason} "
            f"Using {by_name[fallback].label if fallback in by_name else fallback} instead."
        )
        return fallback
    return name
