"""The shared sidebar: dataset, classes, backbone, k, estimate and (under Advanced) the solver.

Drawn by the entrypoint on every page, so its widgets (keys ``side_*``) keep their values while the
user moves between pages. Returns the :class:`~dashboard.services.settings.Settings` they
describe; problems (an unreadable directory, an unavailable backbone, the same class twice) are
shown here with ``st.error`` and a working fallback is used, so the pages keep working.

The classes are a multiselect of the dataset's classes plus "all classes"; the choice is kept
sorted, so one set of classes is one shared engine whatever order it was clicked in.
"""

from __future__ import annotations

import streamlit as st

from dashboard.services import InfluenceExplorerError, capacity, cluster, your_data
from dashboard.services.settings import (
    ALL_OPTION,
    DAMPING_CHOICES,
    DATA_ROOTS_ENV,
    DEFAULT_BACKBONE,
    DEMO_SPEC,
    ESTIMATE_LABELS,
    ESTIMATES,
    IMAGE_SIZE_CHOICES,
    MAX_TRAIN_PER_CLASS,
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
    largest_class,
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
    initial_value("side_max_train_all", False)
    initial_value("side_image_size", defaults.image_size)
    with st.sidebar:
        if link_notice:
            st.warning(link_notice)
        st.header("Data and models")
        dataset_spec, dataset = _dataset_picker()
        classes = _class_choice(dataset, dataset_spec)
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
            help="Exact in the margin (default) evaluates the test loss at the outputs one "
            "Newton step without the image predicts; Newton-corrected takes the loss's tangent "
            "there; first order is Koh & Liang's original formula. Method explains all three.",
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
            max_train = _per_class_cap(dataset)
            if your_data.network_sets_size(dataset_spec):
                st.caption("Images are read at your network's input size.")
            elif dataset_is_directory(dataset_spec):
                image_size = st.selectbox(
                    "Image size for directory datasets (pixels)",
                    options=list(IMAGE_SIZE_CHOICES),
                    key="side_image_size",
                )
        _compute_line()
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


def _class_choice(dataset: Dataset, spec: str) -> tuple[int, ...]:
    names = class_names(dataset)
    default = default_pair(dataset)
    # The choice belongs to a dataset: when the dataset changes, start from its default pair.
    if st.session_state.get("side_classes_dataset") != spec:
        st.session_state["side_classes_dataset"] = spec
        st.session_state["side_classes"] = list(default)
        st.session_state[_CLASSES_BEFORE] = list(default)
    chosen = st.multiselect(
        "Classes",
        options=[ALL_OPTION, *range(len(names))],
        format_func=lambda c: f"All {len(names)} classes" if c == ALL_OPTION else names[c],
        key="side_classes",
        on_change=_tidy_all_option,
        help="Any two or more of the dataset's classes, or all of them. Both models tell apart "
        "exactly these classes; a choice not prepared before is prepared in the background "
        "(features are computed once per image and reused for every choice).",
    )
    if ALL_OPTION in chosen:
        return tuple(range(len(names)))
    picked = sorted({int(c) for c in chosen})
    if len(picked) < 2:
        st.error(
            "Pick at least two classes (or all of them); showing "
            f"{' vs '.join(names[c] for c in default)}."
        )
        return default
    return tuple(picked)


_CLASSES_BEFORE = "state_classes_before"


def _tidy_all_option() -> None:
    """Make "all classes" and single classes exclude each other: the one picked last wins."""
    now = list(st.session_state.get("side_classes", []))
    before = st.session_state.get(_CLASSES_BEFORE, [])
    if ALL_OPTION in now and len(now) > 1:
        # Picked "all" just now: it replaces the classes; picked a class while "all" was on: the
        # class replaces "all".
        now = [c for c in now if c != ALL_OPTION] if ALL_OPTION in before else [ALL_OPTION]
        st.session_state["side_classes"] = now
    st.session_state[_CLASSES_BEFORE] = now


def _per_class_cap(dataset: Dataset) -> int | None:
    """The per-class cap on training images; where the dataset has more images per class than
    the default cap, "every training image" is offered too and gives ``None`` (no cap: e.g. the
    full 60k Fashion-MNIST)."""
    largest = largest_class(dataset)
    if largest > Settings().max_train_per_class and st.checkbox(
        f"Every training image (up to {largest:,} per class)",
        key="side_max_train_all",
        help="No cap: the models are fitted on the whole training set of the chosen classes. "
        "What that costs is shown before preparing starts.",
    ):
        return None
    return int(
        st.number_input(
            "Max training images per class",
            min_value=10,
            max_value=MAX_TRAIN_PER_CLASS,
            step=100,
            key="side_max_train",
            help="Larger sets are subsampled (seeded): the SVM's kernel is n × n. This dataset "
            f"has up to {largest:,} per class; a smaller cap prepares many classes faster.",
        )
    )


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


def _compute_line() -> None:
    queue = capacity.work_queue()
    state = cluster.server_cluster()
    line, problem = cluster.cluster_line(state)
    if problem:
        st.warning(line, icon="⚠️")
        if state.setting:  # reachable perhaps later; a malformed setting needs the operator
            st.button(
                "Connect to the cluster again", key="side_cluster_retry", on_click=cluster.reconnect
            )
    elif line:
        st.caption(line)
    st.caption(
        capacity.compute_summary(
            queue.slots, queue.budget.limit, on_cluster=state.cluster is not None
        )
    )
