"""Verify: retrain without each of the top-k training images and compare with the estimates."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.components.figures import actual_vs_predicted
from dashboard.components.images import upscale
from dashboard.services import InfluenceExplorerError, engines, explanations, facts, query
from dashboard.services.settings import ESTIMATE_LABELS, ESTIMATES, current_settings

st.title("Verify by retraining")

settings = current_settings()
explainer = engines.require_explainer(settings)
chosen = query.current_query(explainer)
labels = facts.model_labels(explainer)

image_col, text_col = st.columns([1, 5])
image_col.image(upscale(chosen.image, 112), width=112)
with text_col:
    st.subheader(chosen.title)
    st.markdown(
        "For each model, the top-k training images by |influence| are removed one at a time and "
        "the model is refitted to convergence (warm-started Newton, same objective). The actual "
        "change in this image's test loss is then compared with both estimates: "
        "**Newton-corrected** (the default) and **first order** (Koh & Liang's)."
    )
    st.page_link("app_pages/explain.py", label="Choose another image on Explain", icon="↩")

k = int(
    st.number_input(
        "Training images to retrain without, per model (k)",
        min_value=3,
        max_value=200,
        value=50,
        step=5,
        key="verify_k",
        help="About 0.5 s per retrain per model on the demo; 50 takes under a minute.",
    )
)
result = explanations.verification(settings, chosen, k)
run = st.button(
    "Retrain to verify" if result is None else "Retrain again",
    key="verify_run",
    type="primary",
)
if run:
    bar = st.progress(0.0, text="Starting…")
    stages: list[str] = []

    def show(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            stages.append(stage)
        fraction = (len(stages) - 1 + done / max(total, 1)) / len(labels)
        bar.progress(min(fraction, 1.0), text=f"{stage}: {done}/{total}")

    hint = st.caption("Retraining… navigate to another page to cancel.")
    try:
        result = explanations.run_verification(explainer, chosen, settings, k, show)
    except InfluenceExplorerError as exc:
        st.error(engines.error_message(exc, settings))
        result = None
    bar.empty()
    hint.empty()

if result is None:
    st.info("Not verified yet for this image and k. Press the button to retrain.")
else:
    figure = actual_vs_predicted(
        [(labels[key], check.predicted, check.actual) for key, check in result.items()],
        estimate_labels=ESTIMATE_LABELS,
    )
    st.plotly_chart(figure, key="verify_scatter", config={"displaylogo": False})
    shown = ESTIMATE_LABELS[settings.estimate]
    with st.container(key="verify_summary"):
        for column, (key, check) in zip(st.columns(len(result)), result.items(), strict=True):
            agreement = check.agreement[settings.estimate]
            with column:
                st.markdown(f"**{labels[key]}** · {shown} estimate")
                a, b, c, d = st.columns(4)
                a.metric("Pearson", f"{agreement.pearson:.3f}")
                b.metric("Spearman", f"{agreement.spearman:.3f}")
                c.metric("Slope", f"{agreement.slope:.2f}")
                d.metric("Time", f"{check.seconds:.1f} s")
    rows = []
    for key, check in result.items():
        for estimate in ESTIMATES:
            agreement = check.agreement[estimate]
            rows.append(
                {
                    "model": labels[key],
                    "estimate": ESTIMATE_LABELS[estimate],
                    "Pearson": agreement.pearson,
                    "Spearman": agreement.spearman,
                    "slope": agreement.slope,
                    "intercept": agreement.intercept,
                    "n": agreement.n,
                    "retraining time (s)": check.seconds,
                    "all converged": check.converged,
                }
            )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        key="verify_table",
        column_config={
            "Pearson": st.column_config.NumberColumn(format="%.3f"),
            "Spearman": st.column_config.NumberColumn(format="%.3f"),
            "slope": st.column_config.NumberColumn(format="%.3f"),
            "intercept": st.column_config.NumberColumn(format="%.2e"),
            "retraining time (s)": st.column_config.NumberColumn(format="%.1f"),
        },
    )
    st.caption(
        "Points on the dashed y = x line are predicted exactly. Spearman measures whether the "
        "ranking is right; the slope whether the scale is (1 means the score is the actual change "
        "in test loss). First-order estimates typically under-estimate high-leverage points, "
        "which shows as a slope above 1. Both estimates linearise the test loss in the "
        "parameters; the loss is convex, so the actual change lies a little above that line "
        "whenever the parameters move. That shows where the loss is nearly zero and sharply "
        "curved (the SVM sure of an image well beyond its margin): changes of a millionth, all "
        "shifted up, ranked right but with a slope away from 1."
    )

earlier = explanations.verified_queries(settings)
if earlier:
    st.caption(
        "Verified in this session (kept while the session lasts): "
        + ", ".join(f"{title} (k = {n})" for title, n in earlier)
    )
