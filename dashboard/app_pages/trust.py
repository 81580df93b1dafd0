"""Trust: how far influence can be trusted, measured as Basu, Pope & Feizi (ICLR 2021) did."""

from __future__ import annotations

import streamlit as st

from dashboard.components.figures import plotly_config
from dashboard.components.study import noise_floor_frame, study_comparison_frame
from dashboard.components.trust import (
    correlation_figure,
    curvature_frame,
    fragility_table_frame,
    live_comparison_frame,
    solver_comparison_figure,
    solver_comparison_frame,
    tally,
)
from dashboard.services import InfluenceExplorerError, links, trust
from dashboard.services.settings import current_settings
from dashboard.services.widgets import forget_unless_among, initial_value

st.title("Trust: where influence breaks")
st.markdown(
    "An influence score predicts how a test image's loss would change if one training image were "
    "removed. For the two convex models on Explain that prediction can be checked exactly, and it "
    "holds. For neural networks it is known to be fragile (Basu, Pope & Feizi, *Influence "
    "Functions in Deep Learning are Fragile*, ICLR 2021). This page repeats their measurement on "
    "a class pair of the demo, with networks sized for a CPU that stand for theirs: a small CNN, "
    "LeNet-5, a ResNet-8 without BatchNorm and a 50-channel CNN, trained end to end with and "
    "without weight decay. Influence is computed through the whole network with conjugate "
    "gradients (CG) and LiSSA, and with the last layer's Hessian only, and each is checked "
    "against retraining without each of its 40 most influential training images, as in the "
    "study."
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

if results.missing:
    st.warning(
        f"The committed run is partial: {len(results.missing)} cell"
        f"{'s' if len(results.missing) != 1 else ''} of its grid were not run (shown as “—”): "
        + "; ".join(results.missing)
        + "."
    )
st.caption(
    "Full protocol, curvature and timings: docs/fragility.md in the repository. "
    f"The results below are the committed run (`{results.command or 'influence fragility'}`, "
    f"{results.seconds / 3600:.1f} hours of wall time with one torch thread on a busy machine; "
    f"{results.n_train} training and "
    f"{results.n_test} test images of {' vs '.join(results.class_names)})."
)

# ---------------------------------------------------------------- the study's numbers
st.header("The study's numbers next to ours")
comparison = trust.fragility_study_comparison(results)
st.dataframe(
    study_comparison_frame(comparison), hide_index=True, height="content", key="trust_study"
)
st.caption(
    "Study: Basu et al.'s Table 1 (MNIST, their highest-loss test point as we read it) and the "
    "Spearman figures of their width experiment (they give no Pearson there). Ours: the "
    "high-loss test point of two Fashion-MNIST classes; **P / S** = Pearson / Spearman of the "
    "score against retraining, CG through the whole network, mean over repeats (the study used "
    "LiSSA for its large networks: our LiSSA column). Noise ceiling: the best Pearson the "
    "retraining noise allows (next section). Reading: “matches” when ours is within "
    f"{trust.MATCH_TOLERANCE:g} of each number the study gives."
)
ran = [r for r in comparison if r.reading != "not run"]
st.markdown(
    "**What reproduced and what did not.** "
    + " ".join(
        f"{r.study.finding.capitalize()}: the study {r.study.pearson:.2f} / "
        f"{r.study.spearman:.2f}, here {r.cg_pearson:.2f} / {r.cg_spearman:.2f} "
        f"({r.reading})."
        if r.study.pearson == r.study.pearson  # the width series has no Pearson (NaN)
        else f"{r.study.finding.capitalize()}: the study's Spearman {r.study.spearman:.2f}, "
        f"here {r.cg_spearman:.2f} ({r.reading})."
        for r in ran
    )
    + (
        " Not run here: " + ", ".join(r.study.finding for r in comparison if r not in ran) + "."
        if len(ran) < len(comparison)
        else ""
    )
)
st.markdown(
    "**Why they differ.** *Data:* two similar Fashion-MNIST classes (T-shirt/top vs Shirt), "
    f"{results.n_train} training images pooled to "
    f"{results.config.image_size}×{results.config.image_size}, against all of MNIST: the "
    "high-loss test images here are confidently wrong, and each training image matters more. "
    "*Size:* our counterparts are far smaller (a ResNet-8 with 8 channels for ResNet-50), small "
    "enough to retrain hundreds of times on a CPU. *Protocol:* every network here needs damping "
    "(|λ_min| + 0.01, many times the weight decay of 0.001) to make its Hessian invertible, and "
    "in the inverse-Hessian product that damping, not the weight decay, does the regularising, "
    "which is why removing weight decay costs far less here than in the study; and retraining for "
    "a tenth of the training at a small learning rate goes only part of the way, so the measured "
    "changes are smaller than the predicted ones. docs/fragility.md gives the numbers behind "
    "each reason."
)

# ---------------------------------------------------------------- the noise floor
st.header("The noise floor of retraining")
floor = trust.fragility_noise_floor(results)
if not floor:
    st.info("These results have no network retrained with more than one minibatch order.")
else:
    within = sum(1 for r in floor if r.verdict == "within noise")
    st.markdown(
        "Retraining is itself random, so the “actual” change has noise, and no score "
        "could agree with it perfectly. Each network is retrained with nothing removed over "
        f"several minibatch orders (chance std: how far the test loss moves by chance), and "
        f"each removal with {results.config.ground_truth.seeds} minibatch orders; from their "
        "spread follows the **noise ceiling**, the best Pearson a perfect score could reach, and "
        "a lack-of-fit test says whether a correlation's shortfall from 1 is **within noise**. "
        f"Here **{within} of {len(floor)}** network × weight decay × test point × solver "
        "cells are within noise; the others fall short of what the noise allows, so their "
        "disagreement is influence's own error, not the ground truth's."
    )
    st.dataframe(noise_floor_frame(floor), hide_index=True, key="trust_noise_floor")
    st.caption(
        "Each removal's change is measured against a control retrained from the same optimum "
        "with the same minibatch order and nothing removed, so most of the chance movement "
        "cancels (per-seed Pearson: the score against one minibatch order's changes alone). "
        "Spread over repeats: the range over networks trained from other seeds."
    )

# ---------------------------------------------------------------- the table
st.header("Influence against retraining, every cell")
table = results.table()
frame, styled = fragility_table_frame(table)
st.dataframe(styled, hide_index=True, height="content", key="trust_table")
st.caption(
    "The shape of Basu et al.'s Table 1. Each cell: **Pearson / Spearman** of the influence score "
    "(first order) against the actual change in that test image's loss after retraining without "
    f"each of the model's top {results.config.ground_truth.top_k} training images, mean over "
    "repeats. Rows: the convex models (reference, retrained exactly), then each network (CNN "
    "dN wW: N conv layers of W channels) with each solver. Columns: the test image with the "
    "highest loss and the median one, with and without weight decay. Amber: the weaker of the "
    "two below 0.9; red: below 0.8. “—”: not run (a convex model without weight decay has no "
    "unique optimum to take influence at)."
)

# ---------------------------------------------------------------- depth and width
st.header("Depth and width")
# First values through Session State (a link may set them there; see services/links.py).
forget_unless_among("trust_chart_wd", list(results.config.weight_decays), what="weight decay")
initial_value("trust_chart_point", "high_loss")
initial_value("trust_chart_wd", results.config.weight_decays[0])
initial_value("trust_chart_metric", "spearman")
point_col, wd_col, metric_col = st.columns(3)
with point_col:
    test_point = st.segmented_control(
        "Test image",
        options=list(trust.TEST_POINT_LABELS),
        required=True,
        format_func=lambda kind: trust.TEST_POINT_LABELS[kind],
        key="trust_chart_point",
        persist_state="session",
    )
with wd_col:
    weight_decay = st.segmented_control(
        "Weight decay",
        options=list(results.config.weight_decays),
        required=True,
        format_func=lambda wd: "none" if wd == 0 else f"{wd:g}",
        key="trust_chart_wd",
        persist_state="session",
    )
with metric_col:
    metric = st.segmented_control(
        "Correlation",
        options=["pearson", "spearman"],
        required=True,
        format_func=str.capitalize,
        key="trust_chart_metric",
        persist_state="session",
    )
links.publish(current_settings())
panels = [
    (vary, *trust.fragility_series(results, vary, test_point, weight_decay))
    for vary in ("depth", "width")
]
panels = [panel for panel in panels if panel[2]]
if not panels:
    st.info("The committed grid has no small CNNs of two depths or two widths to draw.")
else:
    st.plotly_chart(
        correlation_figure(panels, metric=metric),
        key="trust_depth_width",
        config=plotly_config(f"trust-{metric}-{test_point}-wd{weight_decay:g}"),
    )
    st.caption(
        "Each line is one solver; CG (dashed) lies on the exact line wherever both ran. Networks "
        f"above {results.config.influence.exact_max_params} parameters are too large for the "
        "dense Hessian, so their “exact” is the last layer's only (pink crosses) and CG is the "
        "full-network answer."
    )

# ---------------------------------------------------------------- exact vs LiSSA
st.header("LiSSA against the exact solution")
comparisons = trust.fragility_solver_comparison(results)
if not comparisons:
    st.info("These results have no network where both LiSSA and an exact solution ran.")
else:
    counts = tally(comparisons, "pearson")
    st.markdown(
        "LiSSA estimates the inverse Hessian stochastically, the way influence is computed for "
        "networks too large for an exact Hessian. Against retraining, its Pearson is "
        f"**lower than the exact solution's (CG's for networks too large for the dense Hessian) "
        f"in {counts['lower']} of {len(comparisons)}** "
        f"network × test image cases, equal in {counts['equal']} and higher in "
        f"{counts['higher']} (to three decimals). Points below the diagonal: LiSSA is worse. "
        "Where LiSSA does better, its truncated series has not converged in the flattest "
        "directions (its note says how much error it keeps), which acts like extra damping."
    )
    st.plotly_chart(
        solver_comparison_figure(comparisons),
        key="trust_lissa",
        config=plotly_config("trust-exact-vs-lissa"),
    )
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
        help="CNN dN wW: N 3×3 conv layers of W channels, tanh, then a linear head. LeNet-5 "
        "(30k parameters) and the ResNet-8 take minutes even with the quick protocol.",
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
