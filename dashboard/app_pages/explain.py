"""Explain (home): pick or upload an image; see which training images helped and hurt each model."""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from dashboard.components import preparing
from dashboard.components.images import Tile, colour_bar, signed_overlay, tile_grid, upscale
from dashboard.components.trust import trust_link
from dashboard.services import (
    InfluenceExplorerError,
    engines,
    explanations,
    facts,
    first_look,
    links,
    query,
    trust,
    uploads,
)
from dashboard.services.explanations import QUICK_CHECK_K, SIGN_CONVENTION
from dashboard.services.settings import ESTIMATE_LABELS, current_settings
from dashboard.services.widgets import initial_value

GALLERY_COLUMNS = 6
GALLERY_PAGE_SIZE = 2 * GALLERY_COLUMNS
GALLERY_PX = 84
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


def _relative(share: float) -> str:
    """A score as a share of the current loss, e.g. "+92% of loss" or "+3.1× loss"."""
    if not math.isfinite(share):
        return ""
    return f"{share:+.0%} of loss" if abs(share) < 10 else f"{share:+.3g}× loss"


st.title("Explain a prediction")
st.markdown(SIGN_CONVENTION)

settings = current_settings()
# While the backbone's features are computed, the RBF SVM is shown first (a "first look").
look = first_look.explainer_or_first_look(settings)
explainer = look.explainer
names = facts.class_names(explainer)
n_test = facts.n_test(explainer)
n_train = facts.n_train(explainer)
model_labels = facts.model_labels(explainer)
short_labels = facts.model_short_labels(explainer)

# ---------------------------------------------------------------- choose the image
# The title spans the page (filled once the query is known), so a file name has room.
title_area = st.container(key="explain_title")
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
                    caption=(
                        f"#{i} {names[gallery.true_labels[i]]}",
                        _verdicts(i, gallery, short_labels),
                    ),
                    button_key=f"explain_pick_{i}",
                    button_args=(int(i),),
                )
                for i in shown
            ],
            columns=GALLERY_COLUMNS,
            button_label="Pick",
            size=GALLERY_PX,
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
# The quick check and the downloads cover every model: they wait for the full preparation.
quick_check = (
    None if look.pending else explanations.verification(settings, chosen, QUICK_CHECK_K, explainer)
)

with title_area:
    st.subheader(chosen.title)
with picked_col:
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
        if not query.upload_kept():
            st.caption(
                "This upload could not be kept on the server, so a link to it works only in "
                "this session."
            )
    else:
        st.markdown(f"True label: **{explanation.true_label_name}**")
        if query.current_upload(explainer) is not None:
            st.button(
                "Explain my upload again",
                key="explain_back_to_upload",
                on_click=query.select_upload,
            )
    preparing.downloads(
        explainer, chosen, settings, explanation, quick_check, ready=not look.pending
    )

# ---------------------------------------------------------------- the heatmap view


@st.dialog("Where the influence comes from", width="large", on_dismiss=query.close_inspector)
def _inspector(model_key: str, train_index: int) -> None:
    """The training image beside the test image, with its per-pixel influence overlaid."""
    explained = explanation.models[model_key]
    score = float(explained.scores[train_index])
    train_label = facts.train_label_name(explainer, train_index)
    scale = explanations.score_scale(explained)
    st.markdown(
        f"**Training image #{train_index}** ({train_label}) for the **{model_labels[model_key]}**: "
        f"score {score:+.4g} ({ESTIMATE_LABELS[settings.estimate]}; {_relative(scale.relative(score))} "
        f"{explained.loss:.3g}), so it {'helped' if score > 0 else 'hurt'} the prediction."
    )
    with st.spinner("Computing the per-pixel influence…"):
        values = explanations.heatmap(explainer, chosen, settings, model_key, train_index)
    train_image = facts.train_image(explainer, train_index)
    full = explanations.heatmap_scale(values)
    overlay = signed_overlay(train_image, values, scale=full)
    left, middle, right = st.columns(3)
    left.image(upscale(chosen.image, 224), caption=chosen.title.replace("`", ""), width=224)
    middle.image(upscale(train_image, 224), caption=f"Training image #{train_index}", width=224)
    right.image(overlay.image, caption="Per-pixel influence, on the training image", width=224)
    with right, st.container(key="explain_heatmap_scale"):
        st.image(colour_bar(224, 12), width=224)
        st.caption(
            f"−{overlay.scale:.2g} · 0 · +{overlay.scale:.2g} test loss per intensity step "
            "(0–255): no colour at zero, full colour at the ends and beyond."
        )
    floor_note = (
        " Here every value is below that floor, so the colours are faint on purpose."
        if overlay.scale <= explanations.HEATMAP_FLOOR
        else ""
    )
    st.caption(
        "Red: brightening that pixel of the training image would raise the test loss of "
        f"{explained.explained_label_name!r} (push the model away from it); blue: would lower it. "
        "Colour strength grows linearly from zero; full colour is at the 99th percentile of "
        f"|d loss / d pixel|, but never below {explanations.HEATMAP_FLOOR:.2g} per step (a whole "
        f"0–255 swing of one pixel changing the loss by {explanations.NEGLIGIBLE_LOSS_CHANGE:g})."
        + floor_note
    )


inspected = query.inspected(chosen, explainer, later=tuple(look.pending_labels))
if inspected is not None:
    _inspector(inspected.model_key, inspected.train_index)

# ---------------------------------------------------------------- every model, side by side
estimate_label = ESTIMATE_LABELS[settings.estimate]
st.markdown(
    f"Scores shown: **{estimate_label}** estimate"
    + {
        "margin": " (the default: the test loss evaluated at the predicted change of the outputs).",
        "corrected": " (the test loss linearised).",
        "first_order": " (Koh & Liang's formula).",
    }.get(settings.estimate, ".")
    + " Switch in the sidebar."
)
columns = st.columns(len(model_labels) + len(look.pending_labels), gap="large")
for column, (key, label) in zip(
    columns[len(model_labels) :], look.pending_labels.items(), strict=True
):
    with column:
        preparing.pending_model(key, label, look.pending, n_train)  # type: ignore[arg-type]
for column, (key, label) in zip(columns[: len(model_labels)], model_labels.items(), strict=True):
    model = explanation.models[key]
    scale = explanations.score_scale(model)
    with column, st.container(key=f"explain_model_{key}"):
        st.subheader(label)
        probability = float(model.probabilities[model.predicted])
        verdict = ""
        if explanation.true_label is not None:
            verdict = " ✓" if model.predicted == explanation.true_label else " ✗ (wrong)"
        st.markdown(
            f"Predicts **{model.predicted_name}** "
            f"({explanations.probability_text(explainer, key, probability)}){verdict}."
            f"{facts.runners_up(model.probabilities, facts.class_names(explainer))} "
            f"Explaining the loss of **{model.explained_label_name}** "
            f"(loss {model.loss:.3g})."
        )
        if model.familiarity.unusual:
            with st.container(key=f"explain_ood_{key}"):
                st.warning(model.familiarity.message(label), icon=":material/help:")
        if scale.negligible:
            with st.container(key=f"explain_negligible_{key}"):
                st.info(scale.message(label), icon=":material/exposure_zero:")
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
                        caption=(
                            item.label_name,
                            f"{item.score:+.3g}",
                            f"{_relative(scale.relative(item.score))}",
                            f"d {item.pixel_distance:.1f}",
                        ),
                        button_key=f"explain_inspect_{key}_{kind}_{rank}",
                        button_args=(key, item.train_index, chosen.key),
                        help=f"Training image #{item.train_index} ({item.id}): score "
                        f"{item.score:+.4g}, pixel distance {item.pixel_distance:.2f}. Show its "
                        "per-pixel influence beside the test image.",
                    )
                    for rank, item in enumerate(items)
                ],
                columns=TILE_COLUMNS,
                button_label="Inspect",
                on_click=query.inspect,
                selected_key=selected_key,
            )
        st.caption(
            "Tile: label · influence score · the score as a share of the current loss · pixel "
            "distance to the test image."
        )
        trust_link(
            trust.model_reference(explainer, key, settings),
            model_name=label,
            trust_page=trust.TRUST_PAGE,
            verify_page="app_pages/verify.py",
            key=f"explain_trust_{key}",
        )
        with st.container(key=f"explain_check_{key}"):
            check = None if quick_check is None else quick_check.get(key)
            if check is not None:
                agreement = check.agreement[settings.estimate]
                st.markdown(
                    f"**This image, checked** by retraining without each of its top "
                    f"{len(check.train_indices)} ({estimate_label}):"
                )
                a, b, c = st.columns(3)
                a.metric("Pearson", f"{agreement.pearson:.3f}")
                b.metric("Spearman", f"{agreement.spearman:.3f}")
                c.metric("Slope", f"{agreement.slope:.2f}")
                if scale.negligible:
                    st.caption(
                        "With changes this small the slope and correlations describe differences "
                        "of less than a millionth of the loss."
                    )
            elif look.pending:
                st.caption("The check by retraining opens once every model is ready.")
            elif st.button(
                "Check this image now",
                key=f"explain_run_check_{key}",
                icon=":material/fact_check:",
                help=f"Retrain every model without each of its top {QUICK_CHECK_K} training "
                "images by |score| and compare with the scores (about ten seconds on the demo).",
            ):
                bar = st.progress(0.0, text="Retraining…")

                def _progress(stage: str, done: int, total: int, bar: Any = bar) -> None:
                    bar.progress(min(1.0, done / max(total, 1)), text=f"{stage}: {done}/{total}")

                try:
                    explanations.run_verification(
                        explainer, chosen, settings, QUICK_CHECK_K, _progress
                    )
                except InfluenceExplorerError as exc:
                    st.error(engines.error_message(exc, settings))
                else:
                    st.rerun()

links.publish(settings, explainer)
