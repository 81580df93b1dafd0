"""Explain (home): pick or upload an image; see which training images helped and hurt each model."""

from __future__ import annotations

import streamlit as st

from dashboard.components.images import Tile, signed_overlay, tile_grid, upscale
from dashboard.components.trust import trust_link
from dashboard.services import engines, explanations, facts, query, trust, uploads
from dashboard.services.explanations import SIGN_CONVENTION
from dashboard.services.settings import ESTIMATE_LABELS, current_settings
from dashboard.services.widgets import initial_value

GALLERY_PAGE_SIZE = 16
GALLERY_COLUMNS = 8
TILE_COLUMNS = 5


def _verdicts(index: int, gallery: query.Gallery, short_labels: dict[str, str]) -> str:
    """E.g. "SVM ✓ LR ✗": whether each model gets test image ``index`` right."""
    true = gallery.true_labels[index]
    return " ".join(
        f"{short_labels[key]} {'✓' if predictions[index] == true else '✗'}"
        for key, predictions in gallery.predictions.items()
    )


def _go_to_test_image() -> None:
    index = st.session_state.get("explain_goto")
    if index is not None:
        query.select_test_image(int(index))


st.title("Explain a prediction")
st.markdown(SIGN_CONVENTION)

settings = current_settings()
explainer = engines.require_explainer(settings)
names = facts.class_names(explainer)
n_test = facts.n_test(explainer)
model_labels = facts.model_labels(explainer)
short_labels = facts.model_short_labels(explainer)

# ---------------------------------------------------------------- choose the image
picked_col, choose_col = st.columns([1, 3], gap="large")
with choose_col:
    uploaded = st.file_uploader(
        "Upload an image to explain",
        type=list(uploads.UPLOAD_TYPES),
        key="explain_upload",
        max_upload_size=uploads.MAX_UPLOAD_MB,
        help="PNG, JPEG, WebP, BMP, GIF or TIFF up to "
        f"{uploads.MAX_UPLOAD_MB} MB. It is converted to the dataset's format "
        "(size, colour, light-on-dark) and explained for each model's own prediction.",
    )
    query.accept_upload(uploaded, explainer)
    if query.upload_error():
        st.error(query.upload_error())
    if query.upload_is_for_another_dataset(explainer):
        st.info(
            "Your upload was converted for another dataset's image format; upload it again to "
            "explain it with these models."
        )

    # Collapsed at first so every model's explanation is in view without scrolling.
    with st.expander(f"…or pick one of the {n_test} test images", key="explain_gallery"):
        # Initial values through session state, not the widgets' defaults: the values are re-saved
        # on every run to survive other pages, and a default as well would make Streamlit warn.
        initial_value("explain_gallery_filter", "all")
        initial_value("explain_gallery_page", 1)
        which = st.segmented_control(
            "Show",
            options=list(query.GALLERY_FILTERS),
            required=True,
            format_func=query.GALLERY_FILTERS.get,
            key="explain_gallery_filter",
        )
        gallery = query.gallery(explainer, which or "all")
        pages = max(1, -(-len(gallery.indices) // GALLERY_PAGE_SIZE))
        # Widget values from another filter or class pair may be out of range now.
        if st.session_state.get("explain_gallery_page", 1) > pages:
            st.session_state["explain_gallery_page"] = pages
        goto = st.session_state.get("explain_goto")
        if goto is not None and not 0 <= goto < n_test:
            st.session_state["explain_goto"] = None
        nav_col, jump_col = st.columns(2)
        page_number = nav_col.number_input(
            f"Page (of {pages})", min_value=1, max_value=pages, key="explain_gallery_page"
        )
        jump_col.number_input(
            "Go to test image #",
            min_value=0,
            max_value=n_test - 1,
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
        current = query.current_query(explainer)
        tile_grid(
            [
                Tile(
                    image=facts.test_image(explainer, i),
                    caption=f"#{i} {names[gallery.true_labels[i]]} · "
                    + _verdicts(i, gallery, short_labels),
                    button_key=f"explain_pick_{i}",
                    button_args=(int(i),),
                )
                for i in shown
            ],
            columns=GALLERY_COLUMNS,
            button_label="Pick",
            size=56,
            on_click=query.select_test_image,
            selected_key=None
            if current.test_index is None
            else f"explain_pick_{current.test_index}",
        )
        st.caption(
            "Caption: index, true label, and whether each model is right ("
            + "; ".join(f"{short_labels[key]}: {label}" for key, label in model_labels.items())
            + ")."
        )

chosen = query.current_query(explainer)
explanation = explanations.explain(explainer, chosen, settings)

with picked_col:
    st.subheader(chosen.title)
    st.image(upscale(chosen.image, 224), width=224)
    st.caption(f"Exactly what the models see: {facts.image_description(explainer)}.")
    if chosen.upload is not None:
        st.caption(f"Original: {chosen.upload.description}.")
        for note in chosen.upload.notes:
            st.caption(f"• {note}")
        st.button(
            "Back to the test images",
            key="explain_show_test_images",
            on_click=query.show_test_images,
        )
        st.info("An upload has no true label: each model's explanation is of its own prediction.")
    else:
        st.markdown(f"True label: **{explanation.true_label_name}**")
        if query.current_upload(explainer) is not None:
            st.button(
                "Explain my upload again",
                key="explain_back_to_upload",
                on_click=query.select_upload,
            )

# ---------------------------------------------------------------- the heatmap view


@st.dialog("Where the influence comes from", width="large", on_dismiss=query.close_inspector)
def _inspector(model_key: str, train_index: int) -> None:
    """The training image beside the test image, with its per-pixel influence overlaid."""
    explained = explanation.models[model_key]
    score = float(explained.scores[train_index])
    train_label = facts.train_label_name(explainer, train_index)
    st.markdown(
        f"**Training image #{train_index}** ({train_label}) for the **{model_labels[model_key]}**: "
        f"score {score:+.4g} ({ESTIMATE_LABELS[settings.estimate]}), "
        f"so it {'helped' if score > 0 else 'hurt'} the prediction."
    )
    with st.spinner("Computing the per-pixel influence…"):
        values = explanations.heatmap(explainer, chosen, settings, model_key, train_index)
    train_image = facts.train_image(explainer, train_index)
    overlay = signed_overlay(train_image, values)
    left, middle, right = st.columns(3)
    left.image(upscale(chosen.image, 224), caption=chosen.title, width=224)
    middle.image(upscale(train_image, 224), caption=f"Training image #{train_index}", width=224)
    right.image(overlay.image, caption="Per-pixel influence, on the training image", width=224)
    st.caption(
        "Red: brightening that pixel of the training image would raise the test loss of "
        f"{explained.explained_label_name!r} (push the model away from it); blue: would lower it. "
        f"Full colour at |d loss / d pixel| = {overlay.scale:.3g} per intensity step (0-255)."
    )


inspected = query.inspected(chosen)
if inspected is not None:
    _inspector(inspected.model_key, inspected.train_index)

# ---------------------------------------------------------------- every model, side by side
estimate_label = ESTIMATE_LABELS[settings.estimate]
st.markdown(
    f"Scores shown: **{estimate_label}** estimate"
    + (" (the default)." if settings.estimate == "corrected" else " (Koh & Liang's formula).")
    + " Switch in the sidebar."
)
columns = st.columns(len(model_labels), gap="large")
for column, (key, label) in zip(columns, model_labels.items(), strict=True):
    model = explanation.models[key]
    with column, st.container(key=f"explain_model_{key}"):
        st.subheader(label)
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
            if inspected is not None and inspected.model_key == key:
                selected_key = next(
                    (
                        f"explain_inspect_{key}_{kind}_{rank}"
                        for rank, item in enumerate(items)
                        if item.train_index == inspected.train_index
                    ),
                    None,
                )
            tile_grid(
                [
                    Tile(
                        image=facts.train_image(explainer, item.train_index),
                        caption=f"{item.label_name} {item.score:+.3g} · d {item.pixel_distance:.1f}",
                        button_key=f"explain_inspect_{key}_{kind}_{rank}",
                        button_args=(key, item.train_index, chosen.key),
                        help=f"Training image #{item.train_index} ({item.id}): show its "
                        "per-pixel influence beside the test image.",
                    )
                    for rank, item in enumerate(items)
                ],
                columns=TILE_COLUMNS,
                button_label="Inspect",
                on_click=query.inspect,
                selected_key=selected_key,
            )
        st.caption("Tile caption: label · influence score · pixel distance to the test image.")
        trust_link(
            trust.model_reference(explainer, key, settings),
            model_name=label,
            trust_page=trust.TRUST_PAGE,
            verify_page="app_pages/verify.py",
            key=f"explain_trust_{key}",
        )
