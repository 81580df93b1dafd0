"""Data cleaning: training images whose labels look wrong, and how fast each ranking finds them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard.components.figures import found_vs_checked
from dashboard.components.images import png_data_url
from dashboard.components.runs import remembered_or_run
from dashboard.services import InfluenceExplorerError, engines, facts
from dashboard.services import experiments as ex
from dashboard.services.settings import ESTIMATE_LABELS, current_settings
from dashboard.services.widgets import forget_out_of_range, forget_unless_among, initial_value

st.title("Data cleaning")
st.markdown(
    "A training image's **self-influence** is its influence on its own loss: how much its loss "
    "would rise if the model were trained without it. It is large for an image the model can "
    "only fit by bending towards it, which is what a wrong label looks like (Koh & Liang 2017, "
    "§5.4). Checking labels in that order should find mistakes sooner than checking at random."
)

settings = current_settings()
explainer = engines.require_explainer(settings)
labels = facts.model_labels(explainer)
n_train = facts.n_train(explainer)
n_test = facts.n_test(explainer)
estimate_label = ESTIMATE_LABELS[settings.estimate]

forget_unless_among("clean_model", list(labels))
initial_value("clean_model", facts.default_model(explainer))
forget_out_of_range("clean_k", 1, min(200, n_train))
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
    table = pd.DataFrame(
        {
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
    st.dataframe(
        table,
        hide_index=True,
        key="clean_table",
        row_height=60,
        column_config={
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
        "but correctly labelled images rank high too."
    )

# ---------------------------------------------------------------- the experiment
st.header("Would it find flipped labels?", anchor=False)
st.markdown(
    "Flip a share of the training labels on purpose (seeded), refit each model to the noisy "
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
results = remembered_or_run(
    ex.MISLABEL_RUNS,
    None if config is None else ex.MislabelRun(settings.engine, config),
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
    config={"displaylogo": False},
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
st.info(
    "**Why training loss can beat self-influence for the SVM.** The smooth hinge is flat beyond "
    "the margin and a straight line on the wrong side of it. Every image on the wrong side, "
    "however wrong its label, has the same loss gradient and almost no curvature, so its "
    "self-influence measures where the image sits in kernel space, not how wrong its label is. "
    "Its training loss does grow with how far on the wrong side it is, so for the SVM (on the "
    "demo: self-influence hardly better than random) check labels by training loss. For the "
    "logistic regression both find flipped labels several times faster than random checking. "
    "See docs/beyond-single-points.md for the figures."
)
