"""Render helpers for the Trust page's comparison with Basu et al.'s own numbers and for the
noise floor of retraining.

They take core's result objects (``StudyComparison``, ``NoiseFloorRow``) and return data frames
of display text; nothing here computes a statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from dashboard.services.trust import TEST_POINT_LABELS

#: The study-vs-ours table's columns, in order (tests read them by name).
STUDY_COLUMNS: tuple[str, ...] = (
    "study's network",
    "data, λ",
    "study P / S",
    "ours",
    "ours: CG P / S",
    "spread over repeats",
    "ours: LiSSA P / S",
    "ours: last layer P / S",
    "noise ceiling",
    "reading",
)


def _number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"


def _size(value: float) -> str:
    """A loss difference, whose scale differs by test point: two significant digits."""
    return f"{value:.2g}" if math.isfinite(value) else "—"


def _pair(pearson: float, spearman: float) -> str:
    if not (math.isfinite(pearson) or math.isfinite(spearman)):
        return "—"
    return f"{_number(pearson)} / {_number(spearman)}"


def _span(low_high: tuple[float, float]) -> str:
    low, high = low_high
    if not (math.isfinite(low) and math.isfinite(high)):
        return "—"
    return _number(low) if round(low, 2) == round(high, 2) else f"{low:.2f}–{high:.2f}"


def _weight_decay(value: float) -> str:
    return "none" if value == 0 else f"{value:g}"


def study_comparison_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """One row per number the study reports, next to our counterpart's (high-loss test point).

    Args:
        rows: ``StudyComparison`` objects.
    Returns:
        A frame with :data:`STUDY_COLUMNS`; "—" where a value was not measured (the study gives
        no Pearson for its width series; a network not run here).
    """
    records = []
    for r in rows:
        spread = "—"
        if r.repeats:
            spread = (
                f"P {_span(r.cg_pearson_range)}, S {_span(r.cg_spearman_range)} "
                f"({r.repeats} repeat{'s' if r.repeats != 1 else ''})"
            )
        ceiling = "—"
        if math.isfinite(r.pearson_ceiling):
            ceiling = f"≤ {r.pearson_ceiling:.2f}" + (
                f", {r.within_noise}/{r.repeats} within noise" if r.repeats else ""
            )
        records.append(
            dict(
                zip(
                    STUDY_COLUMNS,
                    (
                        r.study.network,
                        f"{r.study.dataset}, {_weight_decay(r.study.weight_decay)}",
                        _pair(r.study.pearson, r.study.spearman),
                        r.label,
                        _pair(r.cg_pearson, r.cg_spearman),
                        spread,
                        _pair(r.lissa_pearson, r.lissa_spearman),
                        _pair(r.last_layer_pearson, r.last_layer_spearman),
                        ceiling,
                        r.reading,
                    ),
                    strict=True,
                )
            )
        )
    return pd.DataFrame(records, columns=list(STUDY_COLUMNS))


def noise_floor_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """One row per (network, weight decay, test point, solver): its agreement with retraining,
    the best agreement the retraining noise allows, and whether the shortfall is within noise.

    Args:
        rows: ``NoiseFloorRow`` objects.
    """
    return pd.DataFrame(
        [
            {
                "network": r.label,
                "λ": _weight_decay(r.weight_decay),
                "test point": TEST_POINT_LABELS.get(r.test_point, r.test_point),
                "solver": r.solver,
                "Pearson": _number(r.pearson),
                "Spearman": _number(r.spearman),
                "spread over repeats (P)": _span(r.pearson_range) if r.repeats > 1 else "1 run",
                "per-seed Pearson": _span(r.seed_pearson_range),
                "noise ceiling": _number(r.pearson_ceiling),
                "within noise from": _number(r.pearson_floor),
                "verdict": f"{r.verdict} ({r.within_noise}/{r.repeats})",
                "chance std of the loss": _size(r.chance_std),
                "size of the effects (rms)": _size(r.effect_rms),
            }
            for r in rows
        ]
    )


__all__ = ["STUDY_COLUMNS", "noise_floor_frame", "study_comparison_frame"]
