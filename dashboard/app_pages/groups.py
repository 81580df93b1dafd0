"""Groups: the predicted and the actual effect of removing whole groups of training images."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from dashboard.components.figures import (
    group_predicted_vs_actual,
    plotly_config,
    ratio_by_group_size,
)
from dashboard.components.runs import remembered_or_run, retraining_test_image
from dashboard.services import InfluenceExplorerError, engines, facts, links
from dashboard.services import experiments as ex
from dashboard.services.settings import current_settings
from dashboard.services.widgets import forget_out_of_range, forget_unless_among, initial_value


def _figure(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _sentence(text: str) -> str:
    """``text`` with a capital first letter (str.capitalize would lower "Basu" and "H")."""
    return text[:1].upper() + text[1:]


st.title("Groups of training images")
st.markdown(
    "What if a whole group of training images were removed: a hundred random ones, one cluster, "
    "the fifty that helped most? Each group's effect on a test image's loss is **predicted** "
    "three ways and **measured** by retraining without it. A change is the test loss after "
    "removing the group minus before: **positive, the group helped** the prediction; "
    "negative, it hurt. Units: test loss."
)

settings = current_settings()
explainer = engines.require_explainer(settings, in_process=True)
labels = facts.model_labels(explainer)
n_train = facts.n_train(explainer)
n_test = facts.n_test(explainer)

forget_unless_among("groups_model", list(labels), what="model")
initial_value("groups_model", facts.default_model(explainer))
initial_value("groups_kinds", list(ex.GROUP_DEFAULT_KINDS))
initial_value("groups_sizes", list(ex.GROUP_DEFAULT_SIZES))
initial_value("groups_per_size", ex.GROUP_DEFAULT_PER_SIZE)
initial_value("groups_custom", "")
initial_value("groups_seed", 0)
forget_out_of_range("groups_test_index", 0, n_test - 1, what="test image")
# Not kept across pages on purpose: it starts from the image picked on Explain each visit.
initial_value("groups_test_index", ex.default_group_test_index(explainer, settings))

image_col, settings_col = st.columns([1, 2], gap="large")
with image_col:
    model_key = st.radio("Model", options=list(labels), format_func=labels.get, key="groups_model")
    test_index = int(
        st.number_input(
            "Test image #",
            min_value=0,
            max_value=n_test - 1,
            step=1,
            key="groups_test_index",
            help="Defaults to the test image picked on Explain, or else the first one every "
            "model gets wrong (a mistake has a large loss, so group effects are easy to see).",
        )
    )
    retraining_test_image(
        explainer,
        model_key,
        test_index,
        labels[model_key],
        "The loss explained is that of the true label.",
    )

with settings_col:
    per_size = st.number_input(
        "Groups of each random kind per size",
        min_value=1,
        max_value=10,
        step=1,
        key="groups_per_size",
        help="Random, class and cluster groups are drawn this many times per size.",
    )
    with st.expander("Your own group, and the seed"):
        custom_text = st.text_input(
            "Training indices of your own group (optional)",
            key="groups_custom",
            max_chars=20_000,
            placeholder="e.g. 3, 17, 250",
            help=f"Whole numbers from 0 to {n_train - 1}, separated by commas or spaces. "
            "The group is added to the others.",
        )
        seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="groups_seed")

# Full width: at 1280 px a column cuts a row of pills short.
kinds = st.pills(
    "Kinds of group",
    options=list(ex.GROUP_KIND_CHOICES),
    selection_mode="multi",
    format_func=ex.GROUP_KIND_LABELS.get,
    key="groups_kinds",
    help="Random; random within one class (the classes in turn); k-means clusters of the "
    "model's inputs (backbone features for the logistic regression, pixels for the SVM); "
    "the test image's most helpful and most harmful training images (one group per size).",
)
sizes = st.pills(
    "Group sizes: images (share of the training set)",
    options=list(ex.GROUP_SIZE_CHOICES),
    selection_mode="multi",
    format_func=lambda f: ex.size_label(f, n_train),
    key="groups_sizes",
)

config = None
try:
    config = ex.group_config(
        kinds or (),
        sizes or (),
        int(per_size),
        custom_text,
        seed=int(seed),
        tail_estimate=settings.estimate,
    )
except InfluenceExplorerError as exc:
    st.error(str(exc))

if config is not None:
    count = ex.group_count(config, n_train)
    st.caption(
        f"{count} groups, so {count} retrains of the {labels[model_key]} to convergence "
        "(about a second each on the demo), plus three cheap predictions per group."
    )
    if count > 60:
        st.warning(
            f"{count} retrains will take minutes. Fewer sizes or kinds make a quicker first look."
        )

links.publish(settings, explainer)
result = remembered_or_run(
    ex.GROUP_RUNS,
    None if config is None else ex.GroupRun(settings.engine, model_key, test_index, config),
    explainer,
    key="groups_run",
    label="Predict and retrain",
    running="Retraining…",
    idle="Press the button to predict and retrain.",
    settings=settings,
)

names = ex.GROUP_ESTIMATE_LABELS
st.subheader(
    f"{len(result.groups)} groups · test image #{test_index} · {labels[model_key]}",
    anchor=False,
)
if not result.converged:
    st.warning(
        "Some retrains stopped before reaching the tolerance; their actual values are rough."
    )
st.plotly_chart(
    group_predicted_vs_actual(
        result.predicted,
        result.actual,
        estimate_labels=names,
        descriptions=[group.description for group in result.groups],
    ),
    key="groups_scatter",
    config=plotly_config(f"groups-test-{test_index}-{model_key}"),
)
errors = result.mean_absolute_error()
with st.container(key="groups_summary"):
    for column, estimate in zip(
        st.columns(len(ex.GROUP_ESTIMATES)), ex.GROUP_ESTIMATES, strict=True
    ):
        agreement = result.agreement[estimate]
        with column:
            st.markdown(f"**{names[estimate]}**")
            a, b, c = st.columns(3)
            a.metric("Spearman", _figure(agreement.spearman))
            b.metric("Pearson", _figure(agreement.pearson))
            c.metric("Slope", _figure(agreement.slope, 2))
            st.caption(
                f"{_sentence(ex.GROUP_ESTIMATE_DESCRIPTIONS[estimate])}. "
                f"Mean |predicted − actual| = {errors[estimate]:.3g}."
            )
st.caption(
    "How to read it. Each group is one point per estimate: its predicted change (x) against the "
    "change measured by retraining without it (y). On the dashed y = x line a prediction is exact. "
    "Spearman says whether the groups are ranked right, Pearson whether they lie on a line, the "
    "slope of actual against predicted whether the scale is right: **a slope above 1 means the "
    "estimate under-estimates** the group's effect. The first order estimate is the sum of the "
    "members' individual scores; the second order adds how the members interact (Basu, You & "
    "Feizi 2020); the Newton-corrected one is an exact Newton step without the whole group, of "
    "which the other two are the first one and two terms."
)

st.subheader("Under-estimation by group size", anchor=False)
trend = result.size_trend
st.plotly_chart(
    ratio_by_group_size(
        [t.mean_size for t in trend],
        {e: [t.ratio[e] for t in trend] for e in ex.GROUP_ESTIMATES},
        estimate_labels=names,
    ),
    key="groups_ratio",
    config=plotly_config(f"groups-ratio-test-{test_index}-{model_key}"),
)
st.dataframe(
    pd.DataFrame(
        [
            {
                "group size (images)": t.target_size,
                "groups": t.n_groups,
                **{f"actual / predicted, {names[e]}": t.ratio[e] for e in ex.GROUP_ESTIMATES},
            }
            for t in trend
        ]
    ),
    hide_index=True,
    key="groups_trend_table",
    column_config={
        f"actual / predicted, {names[e]}": st.column_config.NumberColumn(format="%.2f")
        for e in ex.GROUP_ESTIMATES
    },
)
st.caption(
    "Median over the groups of each size of actual ÷ predicted change. Above the dashed line at 1 "
    "the estimate under-estimates what removing the group really does. Koh et al. (2019) report "
    "this under-estimation for the first order estimate; on the bundled demo the logistic "
    "regression's first order estimate under-estimates by a factor of 1.3 to 1.8 at every size, "
    "the Newton-corrected one hardly at all (docs/beyond-single-points.md)."
)

with st.expander("Every group, and the figures per kind"):
    rows = []
    for i, group in enumerate(result.groups):
        row = {"group": group.description, "kind": group.kind, "size": group.size}
        row.update({names[e]: float(result.predicted[e][i]) for e in ex.GROUP_ESTIMATES})
        row["actual"] = float(result.actual[i])
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="groups_table")
    kind_rows = [
        {
            "kind": ex.GROUP_KIND_LABELS.get(kind, kind),
            "estimate": names[estimate],
            "Spearman": agreement.spearman,
            "Pearson": agreement.pearson,
            "slope": agreement.slope,
            "groups": agreement.n,
        }
        for kind, by_estimate in result.agreement_by_kind.items()
        for estimate, agreement in by_estimate.items()
    ]
    st.dataframe(
        pd.DataFrame(kind_rows),
        hide_index=True,
        key="groups_kind_table",
        column_config={
            name: st.column_config.NumberColumn(format="%.3f")
            for name in ("Spearman", "Pearson", "slope")
        },
    )
    st.caption(
        f"Predicting took {result.predict_seconds:.1f} s, retraining {result.retrain_seconds:.1f} s."
    )
