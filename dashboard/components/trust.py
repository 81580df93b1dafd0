"""Render helpers for the Trust page and for the link to it from each explanation.

They take the fragility study's result objects (plain frozen dataclasses) and return data frames
and Plotly figures; only :func:`trust_link` draws with Streamlit. Nothing here calls core; the
test points' names come from the Trust service.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard.services.trust import TEST_POINT_DESCRIPTIONS, TEST_POINT_LABELS

#: Colours per solver (Okabe-Ito). CG gives the exact answer wherever both ran, so it is dashed
#: over the exact line rather than hidden by it.
SOLVER_STYLES: dict[str, dict[str, Any]] = {
    "exact": {"color": "#0072B2", "dash": "solid", "symbol": "circle"},
    "CG": {"color": "#009E73", "dash": "dash", "symbol": "diamond-open"},
    "LiSSA": {"color": "#D55E00", "dash": "solid", "symbol": "square"},
    "exact (last layer)": {"color": "#CC79A7", "dash": "dot", "symbol": "x"},
}
TEST_POINT_COLOURS = {"high_loss": "#D55E00", "median_loss": "#0072B2"}


def _cell_style(pearson: float, spearman: float) -> str:
    """Background for a table cell by its weaker correlation (blank when not run)."""
    if not (math.isfinite(pearson) and math.isfinite(spearman)):
        return "color: #9ca3af"
    worst = min(pearson, spearman)
    if worst < 0.8:
        return "background-color: #fde2e1"
    if worst < 0.9:
        return "background-color: #fdf0d5"
    return ""


def fragility_table_frame(table: Any) -> tuple[pd.DataFrame, Any]:
    """Basu et al.'s Table 1 as a data frame and a Styler that shades the weak cells.

    Args:
        table: a ``FragilityTable`` (rows: models; columns: (test point, weight decay)).
    Returns:
        (frame, styler): frame has a "model" column, then one "Pearson / Spearman" text column per
        (test point, weight decay); the styler shades cells whose weaker correlation is < 0.9
        (amber) or < 0.8 (red).
    """
    frame = pd.DataFrame(table.to_records())
    labels = list(table.column_labels())
    styles = pd.DataFrame(
        [
            [""] + [_cell_style(cell.pearson, cell.spearman) for cell in row.cells]
            for row in table.rows
        ],
        columns=["model", *labels],
        index=frame.index,
    )
    return frame, frame.style.apply(lambda _: styles, axis=None)


def correlation_figure(
    panels: Sequence[tuple[str, str, Sequence[Any]]], *, metric: str = "pearson"
) -> go.Figure:
    """Correlation with retraining against depth and against width, one line per solver.

    Args:
        panels: one (vary, title, series) per panel: vary is "depth" or "width"; each series is
            a ``CorrelationSeries`` (its ``solver`` label names the line, its points give x,
            Pearson and Spearman).
        metric: "pearson" or "spearman".
    """
    figure = make_subplots(
        rows=1,
        cols=len(panels),
        subplot_titles=[title for _, title, _ in panels],
        horizontal_spacing=0.08,
    )
    shown: set[str] = set()
    values: list[float] = []
    order = {name: i for i, name in enumerate(SOLVER_STYLES)}
    for col, (vary, _, series_list) in enumerate(panels, start=1):
        ticks: set[int] = set()
        for series in sorted(series_list, key=lambda c: order.get(c.solver, len(order))):
            style = SOLVER_STYLES.get(series.solver, {"color": "#6b7280", "dash": "solid"})
            xs = [p.x for p in series.points]
            ys = [getattr(p, metric) for p in series.points]
            ticks.update(xs)
            values.extend(y for y in ys if math.isfinite(y))
            figure.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers" if len(xs) > 1 else "markers",
                    name=series.solver,
                    legendgroup=series.solver,
                    showlegend=series.solver not in shown,
                    line={"color": style["color"], "dash": style["dash"], "width": 2},
                    marker={"size": 9, "symbol": style.get("symbol", "circle")},
                    customdata=[[p.label, p.n_params] for p in series.points],
                    hovertemplate=(
                        f"{series.solver}<br>%{{customdata[0]}} (%{{customdata[1]}} parameters)"
                        f"<br>{metric.capitalize()} %{{y:.3f}}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
            shown.add(series.solver)
        figure.update_xaxes(
            title_text="depth (conv layers)" if vary == "depth" else "width (channels)",
            tickvals=sorted(ticks),
            type="log" if vary == "width" else "linear",  # widths double: 4, 8, 16
            row=1,
            col=col,
        )
    low = min(values, default=0.0)
    figure.update_yaxes(range=[min(0.9, low) - 0.03, 1.01])
    figure.update_yaxes(title_text=f"{metric.capitalize()} with retraining", row=1, col=1)
    figure.update_layout(
        height=400,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def solver_comparison_figure(comparisons: Sequence[Any]) -> go.Figure:
    """LiSSA (or another solver) against the reference solver, one point per (network, weight
    decay, test point), for Pearson and Spearman; below the diagonal, the solver is worse.

    Args:
        comparisons: ``SolverComparison`` objects.
    """
    figure = make_subplots(rows=1, cols=2, subplot_titles=["Pearson", "Spearman"])
    all_values = [
        v
        for c in comparisons
        for v in (c.pearson, c.spearman, c.reference_pearson, c.reference_spearman)
        if math.isfinite(v)
    ]
    low = min([*all_values, 0.9]) - 0.02
    for col, metric in enumerate(("pearson", "spearman"), start=1):
        figure.add_trace(
            go.Scatter(
                x=[low, 1.0],
                y=[low, 1.0],
                mode="lines",
                name="equal",
                legendgroup="equal",
                showlegend=col == 1,
                line={"color": "#9ca3af", "dash": "dash", "width": 1},
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        for kind, colour in TEST_POINT_COLOURS.items():
            chosen = [c for c in comparisons if c.test_point == kind]
            if not chosen:
                continue
            figure.add_trace(
                go.Scatter(
                    x=[getattr(c, f"reference_{metric}") for c in chosen],
                    y=[getattr(c, metric) for c in chosen],
                    mode="markers",
                    name=TEST_POINT_DESCRIPTIONS[kind],
                    legendgroup=kind,
                    showlegend=col == 1,
                    marker={
                        "color": colour,
                        "size": 9,
                        "symbol": [
                            "circle" if c.weight_decay > 0 else "circle-open" for c in chosen
                        ],
                    },
                    customdata=[
                        [
                            c.label,
                            "no weight decay"
                            if c.weight_decay == 0
                            else f"weight decay {c.weight_decay:g}",
                            c.solver,
                            c.reference,
                        ]
                        for c in chosen
                    ],
                    hovertemplate=(
                        "%{customdata[0]}, %{customdata[1]}<br>%{customdata[2]} %{y:.3f}"
                        " vs %{customdata[3]} %{x:.3f}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
        figure.update_xaxes(
            title_text="reference (exact; CG where exact is last-layer only)",
            range=[low, 1.0],
            row=1,
            col=col,
        )
        figure.update_yaxes(title_text="LiSSA", range=[low, 1.0], row=1, col=col)
    figure.update_layout(
        height=380,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.25},
    )
    return figure


def solver_comparison_frame(comparisons: Sequence[Any]) -> pd.DataFrame:
    """One row per (network, weight decay, test point): the solver against its reference."""
    return pd.DataFrame(
        [
            {
                "network": c.label,
                "weight decay": c.weight_decay,
                "test point": TEST_POINT_LABELS.get(c.test_point, c.test_point),
                "reference": c.reference,
                "reference Pearson": c.reference_pearson,
                f"{c.solver} Pearson": c.pearson,
                "reference Spearman": c.reference_spearman,
                f"{c.solver} Spearman": c.spearman,
                "scores' Pearson with reference": c.score_pearson,
                "inverse-HVP relative error": c.relative_error,
                f"{c.solver} time (s)": c.seconds,
                "reference time (s)": c.reference_seconds,
            }
            for c in comparisons
        ]
    )


def live_comparison_frame(live: Any, committed: Any | None) -> pd.DataFrame:
    """A live run's Pearson / Spearman per solver and test point, next to a committed network's.

    Args:
        live: the live ``SettingResult``.
        committed: the committed ``SettingResult`` to compare with, or None.
    """
    rows = []
    for solver in live.solvers:
        reference = None
        if committed is not None:
            reference = committed.solver(solver.solver, solver.scope) or committed.solver(
                solver.solver
            )
        row: dict[str, Any] = {"solver": solver.label}
        for kind, name in TEST_POINT_LABELS.items():
            mine = solver.point(kind)
            theirs = reference.point(kind) if reference is not None else None
            row[f"{name}: this run"] = _pair(mine)
            row[f"{name}: committed"] = _pair(theirs)
        if solver.error:
            row["note"] = solver.error
        rows.append(row)
    return pd.DataFrame(rows)


def _pair(point: Any | None) -> str:
    if point is None or not (math.isfinite(point.pearson) and math.isfinite(point.spearman)):
        return "—"
    return f"{point.pearson:.2f} / {point.spearman:.2f}"


def curvature_frame(settings: Sequence[Any]) -> pd.DataFrame:
    """Per trained model: size, accuracy, curvature, damping, ground-truth reliability, time."""
    rows = []
    for s in settings:
        if s.skipped:
            continue
        curvature = next((c for c in s.curvature if c.scope == "all"), None)
        damping = max((r.damping for r in s.solvers if r.scope == "all"), default=math.nan)
        seed = s.ground_truth.seed_pearson if s.ground_truth is not None else ()
        rows.append(
            {
                "model": s.label,
                "weight decay": s.weight_decay,
                "parameters": s.n_params,
                "train accuracy": s.train_accuracy,
                "test accuracy": s.test_accuracy,
                "λ_min": curvature.smallest_eigenvalue if curvature else math.nan,
                "λ_max": curvature.largest_eigenvalue if curvature else math.nan,
                "damping δ": damping,
                "seed-to-seed Pearson (high / median)": " / ".join(
                    f"{v:.3f}" for v in seed if math.isfinite(v)
                )
                or "exact refits",
                "time (s)": s.seconds,
            }
        )
    return pd.DataFrame(rows)


def trust_link(
    lookup: Any,
    *,
    model_name: str,
    trust_page: str,
    verify_page: str,
    key: str,
) -> None:
    """One short line under an explanation: how far its scores can be trusted, with links.

    Args:
        lookup: a ``ReferenceLookup``: the committed study's reference numbers for this model
            (a ``TrustReference``), or why there are none.
        model_name: the model as Explain names it.
        trust_page, verify_page: page scripts for ``st.page_link``.
        key: container key (page-prefixed).
    """
    reference = lookup.reference
    with st.container(key=key):
        if reference is None:
            text = f"How far can the {model_name}'s scores be trusted? {lookup.unavailable}"
        else:
            first, *others = reference.cells
            numbers = (
                f"Pearson {first.pearson:.2f} / Spearman {first.spearman:.2f} "
                f"({first.test_point} test image)"
            )
            numbers += "".join(
                f", {c.pearson:.2f} / {c.spearman:.2f} ({c.test_point})" for c in others
            )
            text = (
                f"**How far can these scores be trusted?** — reference row *{reference.row}*: "
                f"{numbers}; {reference.estimate} estimate against exact retraining, for "
                f"{reference.measures}. The Verify page checks this very image."
            )
        st.caption(text)
        with st.container(horizontal=True, gap="medium"):
            st.page_link(trust_page, label="See Trust", icon=":material/verified_user:")
            st.page_link(verify_page, label="Verify this image", icon=":material/fact_check:")


def tally(comparisons: Sequence[Any], metric: str = "pearson", decimals: int = 3) -> dict[str, int]:
    """How often the solver is below, equal to or above its reference, compared at ``decimals``."""
    out = {"lower": 0, "equal": 0, "higher": 0}
    for c in comparisons:
        mine = round(getattr(c, metric), decimals)
        reference = round(getattr(c, f"reference_{metric}"), decimals)
        out["lower" if mine < reference else "equal" if mine == reference else "higher"] += 1
    return out
