"""Explain (home): pick or upload an image; see which training images helped and hurt each model."""

from __future__ import annotations

import streamlit as st

from dashboard import state
from dashboard.components.images import Tile, signed_overlay, tile_grid, upscale
from dashboard.components.trust import trust_link

GALLERY_PAGE_SIZE = 16
GALLERY_COLUMNS = 8
TILE_COLUMNS = 5


def _verdicts(index: int, gallery: state.Gallery) -> str:
    """E.g. "SVM ✓ LR ✗": whether each model gets test image ``index`` right."""
    true = gallery.true_labels[index]
    marks = [
        f"{name} {'✓' if predictions[index] == true else '✗'}"
        for name, predictions in (
            ("SVM", gallery.svm_predictions),
            ("LR", gallery.logreg_predictions),
        )
    ]
    return " ".join(marks)


def _go_to_test_image() -> None:
    index = st.session_state.get("explain_goto")
    if index is not None:
        state.select_test_image(int(index))


st.title("Explain a prediction")
st.markdown(state.SIGN_CONVENTION)

settings = state.current_settings()
explainer = state.require_explainer(settings)
names = state.class_names(explainer.dataset)

# ---------------------------------------------------------------- choose the image
picked_col, choose_col = st.columns([1, 3], gap="large")
with choose_col:
    uploaded = st.file_uploader(
        "Upload an image to explain",
        type=list(state.UPLOAD_TYPES),
        key="explain_upload",
        max_upload_size=state.MAX_UPLOAD_MB,
        help="PNG, JPEG, WebP, BMP, GIF or TIFF up to "
        f"{state.MAX_UPLOAD_MB} MB. It is converted to the dataset's format "
        "(size, colour, light-on-dark) and explained for each model's own prediction.",
    )
    state.accept_upload(uploaded, explainer)
    if state.upload_error():
        st.error(state.upload_error())
    if state.upload_is_for_another_dataset(explainer):
        st.info(
            "Your upload was converted for another dataset's image format; upload it again to "
            "explain it with these models."
        )

    # Collapsed at first so both models' explanations are in view without scrolling.
    with st.expander(f"…or pick one of the {explainer.n_test} test images", key="explain_gallery"):
        # Initial values through session state, not the widgets' defaults: the values are re-saved
        # on every run to survive other pages, and a default as well would make Streamlit warn.
        state.initial_value("explain_gallery_filter", "all")
        state.initial_value("explain_gallery_page", 1)
        which = st.segmented_control(
            "Show",
            options=list(state.GALLERY_FILTERS),
            required=True,
            format_func=state.GALLERY_FILTERS.get,
            key="explain_gallery_filter",
        )
        gallery = state.gallery(explainer, which or "all")
        pages = max(1, -(-len(gallery.indices) // GALLERY_PAGE_SIZE))
        # Widget values from another filter or class pair may be out of range now.
        if st.session_state.get("explain_gallery_page", 1) > pages:
            st.session_state["explain_gallery_page"] = pages
        goto = st.session_state.get("explain_goto")
        if goto is not None and not 0 <= goto < explainer.n_test:
            st.session_state["explain_goto"] = None
        nav_col, jump_col = st.columns(2)
        page_number = nav_col.number_input(
            f"Page (of {pages})", min_value=1, max_value=pages, key="explain_gallery_page"
        )
        jump_col.number_input(
            "Go to test image #",
            min_value=0,
            max_value=explainer.n_test - 1,
            value=None,
            step=1,
            key="explain_goto",
            placeholder="index",
            on_change=_go_to_test_image,
        )
        if len(gallery.indices) == 0:
            st.info("No test image matches this filter.")
        start = (int(page_number) - 1) * GALLERY_PAGE_SIZE
        shown = gallery.indices[start : start + GALLERY_PAGE_SIZE]
        current = state.current_query(explainer)
        tile_grid(
            [
                Tile(
                    image=state.test_image(explainer, i),
                    caption=f"#{i} {names[gallery.true_labels[i]]} · " + _verdicts(i, gallery),
                    button_key=f"explain_pick_{i}",
                    button_args=(int(i),),
                )
                for i in shown
            ],
            columns=GALLERY_COLUMNS,
            button_label="Pick",
            size=56,
            on_click=state.select_test_image,
            selected_key=None
            if current.test_index is None
            else f"explain_pick_{current.test_index}",
        )
        st.caption(
            "Caption: index, true label, and whether each model (SVM, logistic regression) is right."
        )

query = state.current_query(explainer)
explanation = state.explain(explainer, query, settings)
model_labels = state.model_labels(explainer)

with picked_col:
    st.subheader(query.title)
    h, w, c = explainer.dataset.image_shape
    st.image(upscale(query.image, 224), width=224)
    st.caption(
        f"Exactly what the models see: {w}×{h}, {'grayscale' if c == 1 else 'RGB'}"
        + (", light on dark" if explainer.dataset.light_on_dark else "")
        + "."
    )
    if query.upload is not None:
        st.caption(f"Original: {query.upload.description}.")
        for note in query.upload.notes:
            st.caption(f"• {note}")
        st.button(
            "Back to the test images",
            key="explain_show_test_images",
            on_click=state.show_test_images,
        )
        st.info("An upload has no true label: each model's explanation is of its own prediction.")
    else:
        st.markdown(f"True label: **{explanation.true_label_name}**")
        if state.current_upload(explainer) is not None:
            st.button(
                "Explain my upload again",
                key="explain_back_to_upload",
                on_click=state.select_upload,
            )

# ---------------------------------------------------------------- the heatmap view


@st.dialog("Where the influence comes from", width="large", on_dismiss=state.close_inspector)
def _inspector(model_key: str, train_index: int) -> None:
    """The training image beside the test image, with its per-pixel influence overlaid."""
    chosen = explanation.models[model_key]
    score = float(chosen.scores[train_index])
    train_label = names[int(state.train_labels(explainer)[train_index])]
    st.markdown(
        f"**Training image #{train_index}** ({train_label}) for the **{model_labels[model_key]}**: "
        f"score {score:+.4g} ({state.ESTIMATE_LABELS[settings.estimate]}), "
        f"so it {'helped' if score > 0 else 'hurt'} the prediction."
    )
    with st.spinner("Computing the per-pixel influence…"):
        values = state.heatmap(explainer, query, settings, model_key, train_index)
    overlay = signed_overlay(state.train_image(explainer, train_index), values)
    left, middle, right = st.columns(3)
    left.image(upscale(query.image, 224), caption=query.title, width=224)
    middle.image(
        upscale(state.train_image(explainer, train_index), 224),
        caption=f"Training image #{train_index}",
        width=224,
    )
    right.image(overlay.image, caption="Per-pixel influence, on the training image", width=224)
    st.caption(
        "Red: brightening that pixel of the training image would raise the test loss of "
        f"{chosen.explained_label_name!r} (push the model away from it); blue: would lower it. "
        f"Full colour at |d loss / d pixel| = {overlay.scale:.3g} per intensity step (0-255)."
    )


inspected = state.inspected(query)
if inspected is not None:
    _inspector(*inspected)

# ---------------------------------------------------------------- both models
estimate_label = state.ESTIMATE_LABELS[settings.estimate]
st.markdown(
    f"Scores shown: **{estimate_label}** estimate"
    + (" (the default)." if settings.estimate == "corrected" else " (Koh & Liang's formula).")
    + " Switch in the sidebar."
)
selected = inspected
columns = st.columns(2, gap="large")
for column, key in zip(columns, ("svm", "logreg"), strict=True):
    model = explanation.models[key]
    with column, st.container(key=f"explain_model_{key}"):
        st.subheader(model_labels[key])
        probability = float(model.probabilities[model.predicted])
        verdict = ""
        if explanation.true_label is not None:
            verdict = " ✓" if model.predicted == explanation.true_label else " ✗ (wrong)"
        st.markdown(
            f"Predicts **{model.predicted_name}** (p = {probability:.2f}){verdict}. "
            f"Explaining the loss of **{model.explained_label_name}** "
            f"(loss {model.loss:.3g})."
        )
        for kind, title in (("helpful", "Most helpful"), ("harmful", "Most harmful")):
            items = getattr(model, kind)
            st.markdown(f"**{title}** ({len(items)})")
            if not items:
                st.caption(
                    f"No training image has a {'positive' if kind == 'helpful' else 'negative'} score."
                )
                continue
            selected_key = None
            if selected is not None and selected[0] == key:
                selected_key = next(
                    (
                        f"explain_inspect_{key}_{kind}_{rank}"
                        for rank, item in enumerate(items)
                        if item.train_index == selected[1]
                    ),
                    None,
                )
            tile_grid(
                [
                    Tile(
                        image=state.train_image(explainer, item.train_index),
                        caption=f"{item.label_name} {item.score:+.3g} · d {item.pixel_distance:.1f}",
                        button_key=f"explain_inspect_{key}_{kind}_{rank}",
                        button_args=(key, item.train_index, query.key),
                        help=f"Training image #{item.train_index} ({item.id}): show its "
                        "per-pixel influence beside the test image.",
                    )
                    for rank, item in enumerate(items)
                ],
                columns=TILE_COLUMNS,
                button_label="Inspect",
                on_click=state.inspect,
                selected_key=selected_key,
            )
        st.caption("Tile caption: label · influence score · pixel distance to the test image.")
        trust_link(
            state.trust_reference(key, explainer, settings),
            model_name=model_labels[key],
            trust_page=state.TRUST_PAGE,
            verify_page="app_pages/verify.py",
            key=f"explain_trust_{key}",
        )
