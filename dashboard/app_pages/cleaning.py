"""Data cleaning: training images whose labels look wrong, and how fast each ranking finds them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard.components.figures import found_vs_checked, plotly_config
from dashboard.components.images import png_data_url
from dashboard.components.runs import remembered_or_run
from dashboard.services import InfluenceExplorerError, engines, facts, links, marks, measured
from dashboard.services import experiments as ex
from dashboard.services.notices import notice, pending, settle
from dashboard.services.settings import ESTIMATE_LABELS, current_settings
from dashboard.services.widgets import forget_out_of_range, forget_unless_among, initial_value

_EDITOR_VERSION = "state_clean_editor_version"


def _apply_edits(editor_key: str, shown: list[int]) -> None:
    """Callback of the table's "mark" column: update the marked list, then start a fresh editor
    (its edits are by row, and the rows change with the model, k and the estimate)."""
    edits = st.session_state.get(editor_key, {}).get("edited_rows", {})
    marks.set_marks(
        {shown[int(row)]: bool(change["mark"]) for row, change in edits.items() if "mark" in change}
    )
    st.session_state[_EDITOR_VERSION] = st.session_state.get(_EDITOR_VERSION, 0) + 1


def _marked_section(ranking: tuple, model_key: str) -> None:
    """The marked images: export them, or refit the model without them and see the accuracy."""
    chosen = marks.marked()
    with st.container(key="clean_marked"):
        if not chosen:
            st.caption("No image marked yet.")
            return
        st.markdown(
            f"**Marked ({len(chosen)}):** "
            + ", ".join(f"#{i}" for i in chosen[:40])
            + (" …" if len(chosen) > 40 else "")
        )
        buttons = st.container(horizontal=True, gap="small")
        refit = buttons.button(
            f"Refit the {labels[model_key]} without them", key="clean_refit", type="primary"
        )
        buttons.download_button(
            "Marked list (CSV)",
            data=marks.marked_csv(ranking, chosen),
            file_name=f"marked-{model_key}.csv",
            mime="text/csv",
            key="clean_marked_download",
            on_click="ignore",
            icon=":material/download:",
        )
        buttons.button("Clear marks", key="clean_clear", on_click=marks.clear_marks)
        wanted = (settings.engine, model_key, tuple(chosen))
        if refit:
            st.session_state["state_clean_refit"] = wanted
        if st.session_state.get("state_clean_refit") != wanted:
            return
        try:
            removal = marks.refit_without_marked(explainer, settings, model_key, chosen)
        except InfluenceExplorerError as exc:
            st.error(str(exc))
            return
        a, b, c = st.columns(3)
        change = removal.accuracy_after - removal.accuracy_before
        a.metric("Test accuracy before", f"{removal.accuracy_before:.3f}")
        b.metric(
            "Without the marked images",
            f"{removal.accuracy_after:.3f}",
            f"{change:+.3f} ({len(removal.fixed)} fixed, {len(removal.broken)} broken)",
        )
        c.metric("Refit", f"{removal.seconds:.1f} s")
        st.caption(
            f"The {labels[model_key]} refitted to convergence without the {len(removal.removed)} "
            f"marked training images (their terms dropped; {n_test} test images, so one image is "
            f"{1 / n_test:.3f}). Predictions that changed: "
            + (", ".join(f"#{i}" for i in removal.changed[:30]) or "none")
            + "."
        )


st.title("Data cleaning")
st.markdown(
    "A training image's **self-influence** is its influence on its own loss: how much its loss "
    "would rise if the model were trained without it. It is large for an image the model can "
    "only fit by bending towards it, which is what a wrong label looks like (Koh & Liang 2017, "
    "§5.4). Checking labels in that order should find mistakes sooner than checking at random."
)

settings = current_settings()
explainer = engines.require_explainer(settings, in_process=True)
labels = facts.model_labels(explainer)
n_train = facts.n_train(explainer)
n_test = facts.n_test(explainer)
estimate_label = ESTIMATE_LABELS[settings.estimate]
headline = st.container(key="clean_headline")

forget_unless_among("clean_model", list(labels), what="model")
initial_value("clean_model", facts.default_model(explainer))
forget_out_of_range("clean_k", 1, min(200, n_train), what="list length")
asked_marks = pending(marks.MARKED)
settle(marks.MARKED)
if asked_marks is not None and any(not 0 <= i < n_train for i in marks.marked()):
    notice(
        f"The link marks training images outside 0 to {n_train - 1} ({asked_marks}); only "
        "those in range are kept."
    )
    marks.set_marks({i: False for i in marks.marked() if not 0 <= i < n_train})
initial_value("clean_k", min(20, n_train))
initial_value("clean_flip_percent", ex.MISLABEL_DEFAULT_FLIP_PERCENT)
initial_value("clean_checkpoints", list(ex.MISLABEL_DEFAULT_CHECKPOINTS))
initial_value("clean_seed", 0)

# ---------------------------------------------------------------- the suspicious list
st.header("Most suspicious training images", anchor=False)
model_col, k_col = st.columns([2, 1])
with model_col:
    model_key = st.radio(
        "Model", options=list(labels), format_func=labels.get, key="clean_model", horizontal=True
    )
with k_col:
    k = int(
        st.number_input(
            "Images to list",
            min_value=1,
            max_value=min(200, n_train),
            step=5,
            key="clean_k",
        )
    )
try:
    ranking = ex.suspicious_images(explainer, settings, model_key)
except InfluenceExplorerError as exc:
    st.error(str(exc))
    ranking = ()
if ranking:
    shown = ranking[:k]
    marked_now = set(marks.marked())
    table = pd.DataFrame(
        {
            "mark": [row.train_index in marked_now for row in shown],
            "rank": [row.rank for row in shown],
            "image": [
                png_data_url(facts.train_image(explainer, row.train_index), 56) for row in shown
            ],
            "train #": [row.train_index for row in shown],
            "id": [row.id for row in shown],
            "given label": [row.given_label_name for row in shown],
            "predicted": [row.predicted_label_name for row in shown],
            "disagree": [row.given_label != row.predicted_label for row in shown],
            "self-influence": [row.self_influence for row in shown],
            "training loss": [row.training_loss for row in shown],
        }
    )
    editor_key = f"clean_table_{st.session_state.get(_EDITOR_VERSION, 0)}"
    st.data_editor(
        table,
        hide_index=True,
        key=editor_key,
        row_height=60,
        disabled=[name for name in table.columns if name != "mark"],
        on_change=_apply_edits,
        args=(editor_key, [row.train_index for row in shown]),
        column_config={
            "mark": st.column_config.CheckboxColumn(
                "mark", help="Mark as mislabelled: refit without it below, or export the list."
            ),
            "image": st.column_config.ImageColumn("image", width="small"),
            "disagree": st.column_config.CheckboxColumn(
                "model disagrees", help="The model predicts another class than the given label."
            ),
            "self-influence": st.column_config.NumberColumn(
                format="%.4g", help=f"{estimate_label} self-influence, in units of training loss."
            ),
            "training loss": st.column_config.NumberColumn(format="%.4g"),
        },
    )
    st.download_button(
        f"Download all {len(ranking)} training images, ranked, as CSV",
        data=ex.suspicious_csv(settings, model_key, ranking),
        file_name=f"suspicious-labels-{model_key}.csv",
        mime="text/csv",
        key="clean_download",
        on_click="ignore",
        icon=":material/download:",
    )
    disagree = int(table["disagree"].sum())
    st.caption(
        f"Ranked by **{estimate_label}** self-influence (switch in the sidebar) for the "
        f"{labels[model_key]}. {disagree} of these {len(shown)} are predicted as another class "
        "than their label. A high rank is a reason to look, not proof of a wrong label: unusual "
        "but correctly labelled images rank high too. Tick **mark** to set an image aside."
    )
    _marked_section(ranking, model_key)

# ---------------------------------------------------------------- the experiment
st.header("Would it find flipped labels?", anchor=False)
st.markdown(
    "Flip a share of the training labels on purpose (seeded; each to another of the chosen "
    "classes at random), refit each model to the noisy "
    "labels, and check the training images in order of self-influence, of training loss, or at "
    "random. The curves show how many of the flipped labels each order finds; at each marked "
    "checkpoint the labels found are fixed and the model refitted to measure test accuracy."
)
flip_col, checkpoint_col, seed_col = st.columns([2, 3, 1])
with flip_col:
    flip_percent = st.slider(
        "Labels flipped (%)", min_value=1, max_value=40, step=1, key="clean_flip_percent"
    )
with checkpoint_col:
    checkpoints = st.pills(
        "Fix the labels found after checking",
        options=list(ex.MISLABEL_CHECKPOINT_CHOICES),
        selection_mode="multi",
        format_func=lambda f: f"{f:.0%}",
        key="clean_checkpoints",
        help="Each checkpoint costs one refit per ranking and model; the curves cost nothing.",
    )
with seed_col:
    seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="clean_seed")

config = None
try:
    config = ex.mislabel_config(
        flip_percent, checkpoints or (), seed=int(seed), estimate=settings.estimate
    )
except InfluenceExplorerError as exc:
    st.error(str(exc))

if config is not None:
    refits = 1 + len(ex.RANKINGS) * len(config.checkpoints)
    st.caption(
        f"{refits} fits of each model ({len(labels) * refits} in all; a few seconds each for "
        "the logistic regression on the demo, about one for the SVM)."
    )
run = None if config is None else ex.MislabelRun(settings.engine, config)
own = None if run is None else ex.MISLABEL_RUNS.remembered(run)
with headline:
    if own is not None:
        figures = measured.best_rankings(own, labels)
        source = "Measured here (flipped labels, this page's settings)"
    else:
        figures = measured.committed_best_rankings(explainer, settings)
        source = (
            f"Measured on the bundled demo by `{measured.MISLABEL_MEASURE_COMMAND}` "
            "(10% of labels flipped"
            + (
                ")"
                if not figures or figures[0].same_settings
                else "; not the settings chosen here)"
            )
        )
    if figures:
        st.markdown(
            "**Which ranking finds wrong labels fastest.** "
            + "; ".join(f"{f.label}: {f.text}" for f in figures)
            + f". _{source}._"
        )
links.publish(settings, explainer)
results = remembered_or_run(
    ex.MISLABEL_RUNS,
    run,
    explainer,
    key="clean_run",
    label="Flip labels and look for them",
    running="Refitting…",
    idle="Press the button to flip labels and refit.",
    settings=settings,
)

grid = np.linspace(0.0, 1.0, 201)
st.plotly_chart(
    found_vs_checked(
        [
            (
                labels[key],
                {r: ex.found_curve(result.results[r], grid) for r in result.results},
            )
            for key, result in results.items()
        ],
        checked=grid,
        ranking_labels=ex.RANKING_LABELS,
        checkpoints=config.checkpoints,
    ),
    key="clean_curves",
    config=plotly_config(f"flipped-labels-{config.flip_fraction:.0%}-seed{config.seed}"),
)
rows = []
for key, result in results.items():
    for ranking_name, ranked in result.results.items():
        row = {"model": labels[key], "ranking": ex.RANKING_LABELS[ranking_name]}
        for c in config.checkpoints:
            row[f"found @ {c:.0%} checked"] = ranked.found_after(c)
        for c in config.checkpoints:
            row[f"accuracy, fixed @ {c:.0%}"] = ranked.fixed_accuracy[c]
        row["accuracy, flipped"] = result.noisy_accuracy
        row["accuracy, clean"] = result.clean_accuracy
        rows.append(row)
table = pd.DataFrame(rows)
st.dataframe(
    table,
    hide_index=True,
    key="clean_results",
    column_config={
        name: st.column_config.NumberColumn(format="%.3f")
        for name in table.columns
        if name not in ("model", "ranking")
    },
)
first = next(iter(results.values()))
st.caption(
    f"{len(first.flipped)} of {n_train} training labels flipped (seed {config.seed}). "
    f"Self-influence: {estimate_label}. Accuracy: on the {n_test} test images "
    f"({1 / n_test:.3f} is one image) after fixing the flipped labels found among the "
    "checked images and refitting; with every label flipped as drawn; and with the clean labels."
)
winners = [
    labels[key]
    for key, result in results.items()
    if result.results.get("training_loss") is not None
    and result.results.get("self_influence") is not None
    and result.results["training_loss"].found_after(measured.HEADLINE_CHECKED)
    >= result.results["self_influence"].found_after(measured.HEADLINE_CHECKED)
]
st.info(
    "**Why training loss can beat self-influence.** A wrong label gives an image a large "
    "training loss, and checking by loss finds it directly. Self-influence adds how much the "
    "model bends towards the image, which helps only where the loss's curvature says so: the "
    "SVM's smooth hinge is flat beyond the margin and a straight line on the wrong side of it, so "
    "every image on the wrong side, however wrong its label, has the same gradient and almost no "
    "curvature, and its self-influence measures where it sits in kernel space instead. "
    + (
        f"In this run, training loss found at least as many after checking "
        f"{measured.HEADLINE_CHECKED:.0%} for: {', '.join(winners)}, so check labels in that "
        "order there."
        if winners
        else f"In this run, self-influence found more after checking {measured.HEADLINE_CHECKED:.0%} "
        "for every model."
    )
    + " See docs/beyond-single-points.md for the committed figures."
)
