"""Trust: how far influence can be trusted, measured as Basu, Pope & Feizi (ICLR 2021) did."""

from __future__ import annotations

import streamlit as st

from dashboard.components.trust import (
    correlation_figure,
    curvature_frame,
    fragility_table_frame,
    live_comparison_frame,
    solver_comparison_figure,
    solver_comparison_frame,
    tally,
)
from dashboard.services import InfluenceExplorerError, trust

PLOTLY_CONFIG = {"displaylogo": False}

st.title("Trust: where influence breaks")
st.markdown(
    "An influence score predicts how a test image's loss would change if one training image were "
    "removed. For the two convex models on Explain that prediction can be checked exactly, and it "
    "holds. For neural networks it is known to be fragile (Basu, Pope & Feizi, *Influence "
    "Functions in Deep Learning are Fragile*, ICLR 2021). This page repeats their measurement on "
    "a class pair of the demo: small CNNs trained end to end, with and without "
    "weight decay, influence computed three ways (exact Hessian, conjugate gradients, LiSSA), each "
    "checked against actually retraining without each of its most influential training images."
)
st.markdown(
    "**Your network (Your data).** Its scores describe only its last layer, refitted with every "
    "lower layer frozen; they are checked against retraining that layer, and hold like the convex "
    "models'. What retraining the *whole* network without an image would do is what this page "
    "measures for small CNNs: there influence is less reliable, and influence through the last "
    "layer alone (the *last layer* rows below) agrees worst with retraining the whole network. "
    "So read your network's scores as what its last layer learned from each image, not as what "
    "the whole network did."
)

try:
    results = trust.fragility_results()
except InfluenceExplorerError as exc:
    st.error(str(exc))
    st.stop()

# ---------------------------------------------------------------- conclusions
st.header("What it shows")
found, not_found = st.columns(2, gap="large")
with found:
    st.markdown(
        "**Seen here, as in the paper**\n\n"
        "- **Deeper is less accurate — mildly.** The one-layer CNN agrees best with retraining "
        "(Pearson 0.98–0.99). From depth 2 on it is 0.93–0.98, and for the high-loss test point "
        "the rank correlation falls steadily with depth (Spearman 0.97 → 0.79 from 1 to 4 "
        "layers). The fall is far smaller than the paper's, for far smaller networks.\n"
        "- **The ground truth gets noisy too.** Retraining with two different minibatch orders "
        "gives the same changes up to depth 3, but not at depth 4: part of what looks like "
        "influence failing is the reference itself.\n"
        "- **LiSSA is a little worse than the exact answer**, more so with depth (by up to 0.08), "
        "and here it is also the slowest solver. Conjugate gradients gives the exact answer, "
        "cheaply.\n"
        "- **The test point matters:** the same network can differ by 0.12 in Spearman between "
        "its high-loss and median-loss test image.\n"
        "- **The last-layer shortcut is the weakest link.** Using only the last layer's Hessian "
        "(a common way to make influence affordable) drops agreement to 0.39–0.86."
    )
with not_found:
    st.markdown(
        "**Not seen here**\n\n"
        "- **Width:** 4, 8 and 16 channels are about equally accurate (if anything the narrowest "
        "is worst). The paper's loss with width came from much larger networks than an exact "
        "Hessian can handle here.\n"
        "- **Weight decay:** λ = 0.001 vs none shows no consistent effect. Every network needs "
        "damping (0.012–0.022) ten times larger than λ to make its Hessian invertible, so the "
        "damping, not the weight decay, does the regularising. A stronger weight decay was not "
        "part of this grid.\n\n"
        "**And a caveat:** the scores get the *order* right but not the *scale* — the measured "
        "change is about 2–3 times the predicted one for the high-loss test point. For these "
        "CNNs, read influence as a ranking, not as a predicted loss."
    )
st.caption(
    "Full protocol, curvature and timings: docs/fragility.md in the repository. "
    f"The results below are the committed run (`{results.command or 'influence fragility'}`, "
    f"{results.seconds / 60:.0f} minutes with one torch thread on a busy machine; "
    f"{results.n_train} training and "
    f"{results.n_test} test images of {' vs '.join(results.class_names)})."
)

# ---------------------------------------------------------------- the table
st.header("Influence against retraining")
table = results.table()
frame, styled = fragility_table_frame(table)
st.dataframe(styled, hide_index=True, height="content", key="trust_table")
st.caption(
    "The shape of Basu et al.'s Table 1. Each cell: **Pearson / Spearman** of the influence score "
    "(first order) against the actual change in that test image's loss after retraining without "
    f"each of the model's top {results.config.ground_truth.top_k} training images. Rows: the "
    "convex models (reference, retrained exactly), then each CNN (dN wW: N conv layers of W "
    "channels) with each solver. Columns: the "
    "test image with the highest loss and the median one, with and without weight decay. Amber: "
    "the weaker of the two below 0.9; red: below 0.8. “—”: not run (a convex model without "
    "weight decay has no unique optimum to take influence at)."
)

# ---------------------------------------------------------------- depth and width
st.header("Depth and width")
point_col, wd_col, metric_col = st.columns(3)
with point_col:
    test_point = st.segmented_control(
        "Test image",
        options=list(trust.TEST_POINT_LABELS),
        default="high_loss",
        required=True,
        format_func=lambda kind: trust.TEST_POINT_LABELS[kind],
        key="trust_chart_point",
        persist_state="session",
    )
with wd_col:
    weight_decay = st.segmented_control(
        "Weight decay",
        options=list(results.config.weight_decays),
        default=results.config.weight_decays[0],
        required=True,
        format_func=lambda wd: "none" if wd == 0 else f"{wd:g}",
        key="trust_chart_wd",
        persist_state="session",
    )
with metric_col:
    metric = st.segmented_control(
        "Correlation",
        options=["pearson", "spearman"],
        default="spearman",
        required=True,
        format_func=str.capitalize,
        key="trust_chart_metric",
        persist_state="session",
    )
panels = [
    (vary, *trust.fragility_series(results, vary, test_point, weight_decay))
    for vary in ("depth", "width")
]
st.plotly_chart(
    correlation_figure(panels, metric=metric), key="trust_depth_width", config=PLOTLY_CONFIG
)
st.caption(
    "Each line is one solver on the full network; CG (dashed) lies on the exact line wherever "
    "both ran. Networks above 1500 parameters are too large for the dense Hessian, so their "
    "“exact” is the last layer's only (pink crosses) and CG is the full-network answer."
)

# ---------------------------------------------------------------- exact vs LiSSA
st.header("Exact vs LiSSA")
comparisons = trust.fragility_solver_comparison(results)
if not comparisons:
    st.info("These results have no network where both LiSSA and an exact solution ran.")
else:
    counts = tally(comparisons, "pearson")
    st.markdown(
        "LiSSA estimates the inverse Hessian stochastically, the way influence is computed for "
        "networks too large for an exact Hessian. Against retraining, its Pearson is "
        f"**lower than the exact solution's in {counts['lower']} of {len(comparisons)}** "
        f"network × test image cases, equal in {counts['equal']} and higher in "
        f"{counts['higher']} (to three decimals). Points below the diagonal: LiSSA is worse."
    )
    st.plotly_chart(solver_comparison_figure(comparisons), key="trust_lissa", config=PLOTLY_CONFIG)
    st.caption("Filled markers: weight decay 0.001; open: no weight decay.")
    with st.expander("Every case, with the solvers' agreement and time"):
        st.dataframe(
            solver_comparison_frame(comparisons),
            hide_index=True,
            key="trust_lissa_table",
            column_config={
                "weight decay": st.column_config.NumberColumn(format="%g"),
                "inverse-HVP relative error": st.column_config.NumberColumn(format="%.3f"),
            },
        )
        st.caption(
            "“scores' Pearson with reference”: "
            "LiSSA's scores against the reference's over all training images; relative error "
            "‖s − s_ref‖ / ‖s_ref‖ of the inverse-Hessian-vector product (blank where the "
            "reference covers other parameters)."
        )

with st.expander("Curvature, damping and how reliable the ground truth is"):
    st.dataframe(
        curvature_frame(results.settings),
        hide_index=True,
        key="trust_curvature",
        column_config={
            "weight decay": st.column_config.NumberColumn(format="%g"),
            "train accuracy": st.column_config.NumberColumn(format="%.3f"),
            "test accuracy": st.column_config.NumberColumn(format="%.3f"),
            "λ_min": st.column_config.NumberColumn(format="%.4f"),
            "λ_max": st.column_config.NumberColumn(format="%.2f"),
            "damping δ": st.column_config.NumberColumn(format="%.3f"),
            "time (s)": st.column_config.NumberColumn(format="%.0f"),
        },
    )
    st.caption(
        "Every trained network sits where its Hessian has slightly negative eigenvalues "
        "(λ_min < 0), so influence needs damping: δ = max(0, −λ_min) + 0.01, the same for all "
        "three solvers. Seed-to-seed Pearson: how well two retrainings with different minibatch "
        "orders agree on the actual changes (1 = perfectly reproducible ground truth)."
    )

# ---------------------------------------------------------------- live run
st.header("Run one setting yourself")
protocols = trust.trust_protocols(results)
arch_col, wd_live_col, protocol_col = st.columns(3)
with arch_col:
    architecture = st.selectbox(
        "Network",
        options=list(trust.TRUST_ARCHITECTURES),
        format_func=lambda a: a.label,
        help="CNN dN wW: N 3×3 conv layers of W channels, tanh, then a linear head.",
        key="trust_live_arch",
        persist_state="session",
    )
with wd_live_col:
    live_weight_decay = st.segmented_control(
        "Weight decay",
        options=list(trust.TRUST_WEIGHT_DECAYS),
        default=trust.TRUST_WEIGHT_DECAYS[0],
        required=True,
        format_func=lambda wd: "none" if wd == 0 else f"{wd:g}",
        key="trust_live_wd",
        persist_state="session",
    )
with protocol_col:
    protocol_name = st.radio(
        "Protocol",
        options=list(protocols),
        format_func=lambda name: protocols[name].label,
        horizontal=True,
        key="trust_live_protocol",
        persist_state="session",
        help="Quick: the CLI's --quick grid, from about 20 seconds for the smallest network. "
        "As in the table: the committed protocol, minutes per network.",
    )
protocol = protocols[protocol_name]
setting = trust.trust_setting(architecture, live_weight_decay)
committed, relation = trust.committed_counterpart(results, setting)
st.caption(f"{protocol.label}: {protocol.description}.")
if protocol_name == "committed" and committed is not None:
    st.caption(
        f"The committed run of {committed.label} took {committed.seconds:.0f} s on one busy core."
    )

result = trust.trust_run(setting, protocol.config)
if st.button(
    "Train, explain and retrain",
    key="trust_run",
    type="primary",
    disabled=result is not None,
    help="Deterministic given its seeds: a setting run once is remembered for your session.",
):
    try:
        result = trust.run_trust_setting(setting, protocol.config)
    except InfluenceExplorerError as exc:
        st.error(str(exc))
        result = None

if result is None:
    st.info(
        "Not run yet in this session. The run trains the network, computes its influence with "
        "each solver for its high-loss and median-loss test images, and retrains to check it; "
        "leaving the page cancels it."
    )
else:
    with st.container(key="trust_live_result"):
        decay = (
            "no weight decay"
            if result.weight_decay == 0
            else f"weight decay {result.weight_decay:g}"
        )
        st.subheader(f"{result.label}, {decay}")
        curvature = next((c for c in result.curvature if c.scope == "all"), None)
        damping = max((r.damping for r in result.solvers if r.scope == "all"), default=float("nan"))
        a, b, c, d = st.columns(4)
        a.metric("Test accuracy", f"{result.test_accuracy:.3f}")
        b.metric("λ_min", f"{curvature.smallest_eigenvalue:.4f}" if curvature else "—")
        c.metric("Damping δ", f"{damping:.3f}")
        d.metric("Time", f"{result.seconds:.0f} s")
        st.dataframe(
            live_comparison_frame(result, committed),
            hide_index=True,
            key="trust_live_table",
        )
        st.caption(
            "Pearson / Spearman of each solver's scores against retraining, this run next to "
            f"{relation}."
            + (
                " The quick protocol trains on fewer images for fewer epochs and retrains fewer "
                "points, so compare the two in kind, not to the digit."
                if protocol_name != "committed"
                else ""
            )
        )
