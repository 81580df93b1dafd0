"""Plotly figures for the dashboard. Each takes plain arrays and returns a figure; no core calls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.components.classes import class_colours

ESTIMATE_COLOURS = {"margin": "#D55E00", "corrected": "#2563eb", "first_order": "#E69F00"}
# Above this many points a panel uses WebGL; SVG makes one DOM node per point.
_WEBGL_FROM = 5000


def plotly_config(filename: str, *, scale: int = 2) -> dict:
    """Plotly's chart configuration for ``st.plotly_chart(config=...)``: no logo, and the
    toolbar's camera button saves the figure as ``<filename>.png`` at ``scale`` times its size,
    drawn by the browser (no server-side renderer is needed)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in filename)[:80]
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": "png", "filename": safe or "figure", "scale": scale},
    }


def influence_vs_distance(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    labels: np.ndarray,
    class_names: Sequence[str],
    ids: np.ndarray,
    highlighted: Mapping[str, np.ndarray] | None = None,
) -> go.Figure:
    """The paper's figure: influence against pixel distance of every training image.

    Args:
        panels: one (title, scores (n_train,), pixel_distances (n_train,)) per model.
        labels: (n_train,) class index of each training image.
        class_names: name per class index.
        ids: (n_train,) stable ids, shown on hover.
        highlighted: panel title -> training indices to ring (the top-k).
    """
    figure = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[title for title, _, _ in panels]
    )
    index = np.arange(len(labels))
    scatter = go.Scattergl if len(labels) >= _WEBGL_FROM else go.Scatter
    colours = class_colours(len(class_names))
    for col, (title, scores, distances) in enumerate(panels, start=1):
        for label, name in enumerate(class_names):
            rows = np.flatnonzero(labels == label)
            if rows.size == 0:
                continue
            figure.add_trace(
                scatter(
                    x=distances[rows],
                    y=scores[rows],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    marker={
                        "color": colours[label],
                        "size": 5,
                        "opacity": 0.65,
                    },
                    customdata=np.stack([index[rows], ids[rows]], axis=1),
                    hovertemplate=(
                        "train #%{customdata[0]} (%{customdata[1]})<br>"
                        f"label: {name}<br>"
                        "score: %{y:.3g}<br>pixel distance: %{x:.3g}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
        ring = None if highlighted is None else highlighted.get(title)
        if ring is not None and len(ring):
            ring = np.asarray(ring)
            figure.add_trace(
                scatter(
                    x=distances[ring],
                    y=scores[ring],
                    mode="markers",
                    name="top-k shown on Explain",
                    legendgroup="top-k",
                    showlegend=col == 1,
                    marker={
                        "size": 11,
                        "color": "rgba(0,0,0,0)",
                        "line": {"color": "#111827", "width": 1.5},
                    },
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
        figure.add_hline(y=0, line={"color": "#9ca3af", "width": 1}, row=1, col=col)
        figure.update_xaxes(title_text="Euclidean pixel distance to the test image", row=1, col=col)
        figure.update_yaxes(title_text="influence (Δ test loss)", row=1, col=col)
    figure.update_layout(
        height=430,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.22},
    )
    return figure


def actual_vs_predicted(
    panels: Sequence[tuple[str, Mapping[str, np.ndarray], np.ndarray]],
    *,
    estimate_labels: Mapping[str, str],
) -> go.Figure:
    """Actual change in test loss from retraining against the prediction, with y = x.

    Args:
        panels: one (title, estimate -> predicted (k,), actual (k,)) per model.
        estimate_labels: display name per estimate.
    """
    figure = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[title for title, _, _ in panels]
    )
    for col, (_, predicted, actual) in enumerate(panels, start=1):
        values = [np.asarray(actual)] + [np.asarray(v) for v in predicted.values()]
        lo = float(min(v.min() for v in values))
        hi = float(max(v.max() for v in values))
        pad = 0.05 * (hi - lo or 1.0)
        figure.add_trace(
            go.Scatter(
                x=[lo - pad, hi + pad],
                y=[lo - pad, hi + pad],
                mode="lines",
                name="y = x",
                legendgroup="y=x",
                showlegend=col == 1,
                line={"color": "#6b7280", "dash": "dash", "width": 1},
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        for estimate, values_predicted in predicted.items():
            figure.add_trace(
                go.Scatter(
                    x=values_predicted,
                    y=actual,
                    mode="markers",
                    name=estimate_labels.get(estimate, estimate),
                    legendgroup=estimate,
                    showlegend=col == 1,
                    marker={"color": ESTIMATE_COLOURS.get(estimate), "size": 7, "opacity": 0.8},
                    hovertemplate="predicted %{x:.3g}<br>actual %{y:.3g}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        figure.update_xaxes(title_text="predicted Δ test loss", row=1, col=col)
        figure.update_yaxes(title_text="actual Δ test loss (retrained)", row=1, col=col)
    figure.update_layout(
        height=420,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


# --------------------------------------------------------------------------- training data

#: The three group estimates: the engine's two colours, and green for the second order.
GROUP_ESTIMATE_COLOURS = {**ESTIMATE_COLOURS, "second_order": "#009E73"}
RANKING_COLOURS = {"self_influence": "#2563eb", "training_loss": "#D55E00", "random": "#6b7280"}


def _identity_line(figure: go.Figure, values: Sequence[np.ndarray], **where: int) -> None:
    """A dashed y = x across the range of ``values`` (drawn first, so points sit on top)."""
    finite = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    figure.add_trace(
        go.Scatter(
            x=[lo - pad, hi + pad],
            y=[lo - pad, hi + pad],
            mode="lines",
            name="y = x",
            line={"color": "#6b7280", "dash": "dash", "width": 1},
            hoverinfo="skip",
        ),
        **where,
    )


def group_predicted_vs_actual(
    predicted: Mapping[str, np.ndarray],
    actual: np.ndarray,
    *,
    estimate_labels: Mapping[str, str],
    descriptions: Sequence[str],
) -> go.Figure:
    """Predicted against actual change in a test loss, one point per group and estimate.

    Args:
        predicted: estimate -> (G,) predicted change per group.
        actual: (G,) actual change from retraining without each group.
        estimate_labels: display name per estimate.
        descriptions: (G,) what each group is, shown on hover.
    """
    actual = np.asarray(actual, dtype=float)
    figure = go.Figure()
    _identity_line(figure, [actual, *predicted.values()])
    for estimate, values in predicted.items():
        figure.add_trace(
            go.Scatter(
                x=np.asarray(values, dtype=float),
                y=actual,
                mode="markers",
                name=estimate_labels.get(estimate, estimate),
                marker={
                    "color": GROUP_ESTIMATE_COLOURS.get(estimate),
                    "size": 8,
                    "opacity": 0.8,
                },
                text=list(descriptions),
                hovertemplate="%{text}<br>predicted %{x:.3g}<br>actual %{y:.3g}<extra></extra>",
            )
        )
    figure.update_xaxes(title_text="predicted Δ test loss (removing the group)")
    figure.update_yaxes(title_text="actual Δ test loss (retrained)")
    figure.update_layout(
        height=440,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def ratio_by_group_size(
    sizes: Sequence[float],
    ratios: Mapping[str, Sequence[float]],
    *,
    estimate_labels: Mapping[str, str],
) -> go.Figure:
    """Median actual / predicted change against group size, one line per estimate, with y = 1.

    Args:
        sizes: (S,) group sizes in images, increasing.
        ratios: estimate -> (S,) median actual / predicted over the groups of each size.
        estimate_labels: display name per estimate.
    """
    figure = go.Figure()
    figure.add_hline(y=1.0, line={"color": "#6b7280", "dash": "dash", "width": 1})
    for estimate, values in ratios.items():
        figure.add_trace(
            go.Scatter(
                x=list(sizes),
                y=list(values),
                mode="lines+markers",
                name=estimate_labels.get(estimate, estimate),
                line={"color": GROUP_ESTIMATE_COLOURS.get(estimate)},
                hovertemplate="%{x:.0f} images: actual / predicted %{y:.2f}<extra></extra>",
            )
        )
    figure.update_xaxes(title_text="group size (images)", type="log")
    figure.update_yaxes(title_text="actual / predicted (median)")
    figure.update_layout(
        height=340,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"orientation": "h", "y": -0.3},
    )
    return figure


def found_vs_checked(
    panels: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    *,
    checked: np.ndarray,
    ranking_labels: Mapping[str, str],
    checkpoints: Sequence[float] = (),
) -> go.Figure:
    """Fraction of flipped labels found against fraction of training data checked.

    Args:
        panels: one (title, ranking -> (m,) fraction found) per model.
        checked: (m,) fractions of the training set checked, increasing, shared by all curves.
        ranking_labels: display name per ranking.
        checkpoints: fractions checked to mark with a dotted vertical line.
    """
    figure = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[title for title, _ in panels], shared_yaxes=True
    )
    for col, (_, curves) in enumerate(panels, start=1):
        for ranking, found in curves.items():
            figure.add_trace(
                go.Scatter(
                    x=checked,
                    y=found,
                    mode="lines",
                    name=ranking_labels.get(ranking, ranking),
                    legendgroup=ranking,
                    showlegend=col == 1,
                    line={"color": RANKING_COLOURS.get(ranking), "width": 2},
                    hovertemplate="checked %{x:.0%}: found %{y:.0%}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        for fraction in checkpoints:
            figure.add_vline(
                x=fraction, line={"color": "#9ca3af", "dash": "dot", "width": 1}, row=1, col=col
            )
        figure.update_xaxes(
            title_text="fraction of training data checked", tickformat=".0%", row=1, col=col
        )
    figure.update_yaxes(
        title_text="fraction of flipped labels found", tickformat=".0%", row=1, col=1
    )
    figure.update_yaxes(range=[0, 1.02])
    figure.update_layout(
        height=400,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.25},
    )
    return figure


def loss_history(losses: np.ndarray, *, label: str) -> go.Figure:
    """The attacked test loss after each step's retraining (entry 0: before the attack).

    Args:
        losses: (steps + 1,) test loss; NaN where the model was not retrained.
        label: the label whose loss is shown.
    """
    losses = np.asarray(losses, dtype=float)
    figure = go.Figure(
        go.Scatter(
            x=np.arange(len(losses)),
            y=losses,
            mode="lines+markers",
            connectgaps=True,
            line={"color": "#D55E00"},
            hovertemplate="step %{x}: loss %{y:.4g}<extra></extra>",
        )
    )
    figure.update_xaxes(title_text="attack step (0 = before)", dtick=1)
    figure.update_yaxes(title_text=f"test loss of {label!r}")
    figure.update_layout(height=300, margin={"l": 10, "r": 10, "t": 20, "b": 10})
    return figure
