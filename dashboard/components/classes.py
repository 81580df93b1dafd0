"""Figures for any number of classes: one colour per class, the top-k lists' label make-up, and
the cross-validated λ curve. Plain values in, Plotly figures out; no core calls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

#: Up to eight classes: Okabe-Ito (colour-blind safe).
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
)


def class_colours(n_classes: int) -> tuple[str, ...]:
    """One distinct colour per class: Okabe-Ito up to 8, Tableau 10 up to 10, Plotly's Dark24 up
    to 24, then Alphabet's 26 (repeated only past 26 classes)."""
    for palette in (OKABE_ITO, qualitative.T10, qualitative.Dark24):
        if n_classes <= len(palette):
            return tuple(palette[:n_classes])
    return tuple(qualitative.Alphabet[i % len(qualitative.Alphabet)] for i in range(n_classes))


def label_makeup(
    rows: Sequence[tuple[str, Mapping[str, int]]], class_names: Sequence[str]
) -> go.Figure:
    """Stacked horizontal bars: how many images of each training label each top-k list holds.

    Args:
        rows: one (list name, e.g. "SVM · most helpful", label name -> count) per bar.
        class_names: every label name, in class order (one colour each, as on the scatter).
    """
    colours = class_colours(len(class_names))
    names = [name for name, _ in rows]
    figure = go.Figure()
    for colour, label in zip(colours, class_names, strict=True):
        counts = [int(counts.get(label, 0)) for _, counts in rows]
        figure.add_trace(
            go.Bar(
                y=names,
                x=counts,
                name=label,
                orientation="h",
                marker={"color": colour},
                hovertemplate=f"{label}: %{{x}}<extra>%{{y}}</extra>",
            )
        )
    figure.update_layout(
        barmode="stack",
        height=90 + 34 * len(rows),
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        xaxis={"title": "training images in the list", "dtick": 1 if _most(rows) <= 12 else None},
        yaxis={"autorange": "reversed"},
        legend={"orientation": "h", "y": -0.35},
    )
    return figure


def _most(rows: Sequence[tuple[str, Mapping[str, int]]]) -> int:
    return max((sum(counts.values()) for _, counts in rows), default=0)


def lambda_curve(
    grid: Sequence[float],
    mean: Sequence[float],
    stderr: Sequence[float],
    *,
    best: float,
    chosen: float,
    criterion: str,
) -> go.Figure:
    """The cross-validated criterion per λ (log-scaled axis), ± one standard error, the best λ,
    the band within one standard error of it, and the chosen λ.

    Args:
        grid, mean, stderr: (G,) the λs tried, the criterion's mean and standard error.
        best, chosen: the λ with the best mean, and the one the rule chose.
        criterion: its name on the y axis, e.g. "held-out log-loss".
    """
    grid = np.asarray(grid, dtype=float)
    mean = np.asarray(mean, dtype=float)
    stderr = np.asarray(stderr, dtype=float)
    at_best = int(np.argmin(np.abs(grid - best)))
    figure = go.Figure()
    low, high = mean[at_best] - stderr[at_best], mean[at_best] + stderr[at_best]
    figure.add_hrect(
        y0=low,
        y1=high,
        fillcolor="#93c5fd",
        opacity=0.25,
        line_width=0,
        annotation_text="within one standard error of the best",
        annotation_position="top left",
    )
    figure.add_trace(
        go.Scatter(
            x=grid,
            y=mean,
            error_y={"type": "data", "array": stderr, "visible": True, "color": "#6b7280"},
            mode="lines+markers",
            name="mean ± standard error",
            line={"color": "#2563eb"},
            hovertemplate="λ = %{x:g}<br>%{y:.4f}<extra></extra>",
        )
    )
    for value, name, symbol, colour in (
        (best, f"best λ = {best:g}", "star", "#D55E00"),
        (chosen, f"chosen λ = {chosen:g}", "diamond-open", "#111827"),
    ):
        i = int(np.argmin(np.abs(grid - value)))
        figure.add_trace(
            go.Scatter(
                x=[grid[i]],
                y=[mean[i]],
                mode="markers",
                name=name,
                marker={"symbol": symbol, "size": 16, "color": colour, "line": {"width": 2}},
                hoverinfo="skip",
            )
        )
    figure.update_xaxes(type="log", title_text="λ (weight decay)", tickvals=list(grid))
    figure.update_yaxes(title_text=criterion)
    figure.update_layout(
        height=360,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"orientation": "h", "y": -0.3},
    )
    return figure
