"""Verify: retrain without each of the top-k training images and compare with the estimates."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.components.figures import actual_vs_predicted, plotly_config
from dashboard.components.images import upscale
from dashboard.services import InfluenceExplorerError, engines, explanations, facts, links, query
from dashboard.services.settings import ESTIMATE_LABELS, ESTIMATES, current_settings
from dashboard.services.widgets import initial_value

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
        "the model is refitted to convergence from its fitted parameters (same objective). The "
        "actual change in this image's test loss is then compared with every estimate: "
        "**exact in the margin** (the default: the loss at the Newton-predicted outputs), "
        "**Newton-corrected** (the same parameter change, the loss linearised) and "
        "**first order** (Koh & Liang's)."
    )
    st.page_link("app_pages/explain.py", label="Choose another image on Explain", icon="↩")

initial_value("verify_k", 50)
k = int(
    st.number_input(
        "Training images to retrain without, per model (k)",
        min_value=3,
        max_value=200,
        step=5,
        key="verify_k",
        help=(
            "On the demo, k = 50 retrains both models in about 0.4 s on a 2-core machine "
            "(bench.latency); more training images or parameters take longer."
        ),
    )
)
links.publish(settings, explainer)
result = explanations.verification(settings, chosen, k, explainer)
from_server = result is not None and explanations.verified_earlier(settings, chosen, k)
run = st.button(
    "Retrain to verify" if result is None or from_server else "Retrain again",
    key="verify_run",
    type="primary",
)
if from_server and not run:
    st.caption(
        "These results were computed earlier on this server for this image and k, and kept; "
        "press the button to retrain again."
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
    stem = f"verify-{chosen.key.replace(':', '-')[:20]}-k{k}"
    st.plotly_chart(figure, key="verify_scatter", config=plotly_config(stem))
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
                    "time (s)": check.seconds,
                    "converged": check.converged,
                }
            )
    # A static table: every header and value in full at any width (a data grid cut the headers
    # to its columns' widths at 1440 px).
    with st.container(key="verify_table"):
        st.table(
            pd.DataFrame(rows)
            .style.format(
                {
                    "Pearson": "{:.3f}",
                    "Spearman": "{:.3f}",
                    "slope": "{:.3f}",
                    "intercept": "{:.2e}",
                    "time (s)": "{:.1f}",
                    "converged": lambda v: "yes" if v else "no",
                }
            )
            .hide(axis="index")
        )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "model": labels[key],
                    "train #": int(j),
                    "label": facts.train_label_name(explainer, int(j)),
                    "actual": float(check.actual[i]),
                    **{
                        ESTIMATE_LABELS[e]: float(check.predicted[e][i])
                        for e in ESTIMATES
                        if e in check.predicted
                    },
                }
                for key, check in result.items()
                for i, j in enumerate(check.train_indices)
            ]
        ),
        hide_index=True,
        key="verify_points",
        height=250,
        # Widths that fit every header at 1280 px (an auto-sized grid cuts them).
        column_config={
            "model": st.column_config.TextColumn(width=210),
            "train #": st.column_config.NumberColumn(width=70),
            "label": st.column_config.TextColumn(width=100),
            "actual": st.column_config.NumberColumn(format="%.3e", width=100),
            **{
                ESTIMATE_LABELS[e]: st.column_config.NumberColumn(format="%.3e", width=140)
                for e in ESTIMATES
            },
        },
    )
    st.caption("Every retrained image: the actual change in test loss and each estimate's.")
    document, scatter, statistics = explanations.verification_documents(
        explainer, chosen, result, link=links.view_link(settings, explainer)
    )
    with st.container(horizontal=True, key="verify_downloads"):
        for label, name, data, mime in (
            ("Scatter data (CSV)", f"{stem}-points.csv", scatter, "text/csv"),
            ("Statistics (CSV)", f"{stem}-statistics.csv", statistics, "text/csv"),
            ("Everything (JSON)", f"{stem}.json", document, "application/json"),
        ):
            st.download_button(
                label,
                data=data,
                file_name=name,
                mime=mime,
                key=f"verify_download_{name.rsplit('.', 1)[-1]}_{label.split()[0].lower()}",
                on_click="ignore",
                icon=":material/download:",
            )
    st.caption(
        "Points on the dashed y = x line are predicted exactly. Spearman measures whether the "
        "ranking is right; the slope (least squares through the origin, Σ predicted·actual / "
        "Σ predicted²) whether the scale is: 1 means the score is the actual change in test "
        "loss. First order under-estimates high-leverage images, which shows as a slope above 1. "
        "The Newton-corrected estimate takes the test loss's tangent in the outputs; the loss is "
        "convex, so the actual change lies above the tangent whenever the outputs move, most "
        "where the loss is nearly zero and sharply curved (the SVM sure of an image beyond its "
        "margin). Exact in the margin, the default, evaluates the loss at the predicted outputs "
        "instead, so it stays near 1 there; it is off only where the Newton step itself is "
        "(Method says when)."
    )

earlier = explanations.verified_queries(settings)
if earlier:
    st.caption(
        "Verified in this session: "
        + ", ".join(
            f"{title} (k = {n}, read back from an earlier run)"
            if read_back
            else f"{title} (k = {n})"
            for title, n, read_back in earlier
        )
        + ". Results are kept on this server by content, so this page's link shows them to "
        "anyone who opens it, without retraining."
    )
