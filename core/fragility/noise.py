"""The noise floor of retraining: how well perfect influence scores could agree with a ground
truth measured with S minibatch orders (derivation in :class:`~core.fragility.results.NoiseBound`
and docs/fragility.md)."""

from __future__ import annotations

import math

import numpy as np

from core.fragility.results import NoiseBound
from core.validation import agreement

#: Significance level of the lack-of-fit test behind "within noise".
LEVEL = 0.05


def noise_bound(predicted: np.ndarray, actual_by_seed: np.ndarray) -> NoiseBound:
    """The best agreement ``predicted`` could have with the seed mean of ``actual_by_seed``, and
    whether its shortfall from that is within retraining noise.

    Args:
        predicted: (k,) scores of the retrained points.
        actual_by_seed: (S, k) their actual changes, one row per minibatch order.
    Returns:
        The :class:`NoiseBound`; with one seed only the per-seed ranges are known.
    """
    p = np.asarray(predicted, dtype=np.float64)
    a = np.asarray(actual_by_seed, dtype=np.float64)
    per_seed = [agreement(p, row) for row in a]
    pearson_range = _range([g.pearson for g in per_seed])
    spearman_range = _range([g.spearman for g in per_seed])
    s, k = a.shape
    if s < 2 or k < 4 or np.ptp(p) == 0:
        nan = math.nan
        return NoiseBound(nan, nan, nan, nan, False, pearson_range, spearman_range)
    mean = a.mean(0)
    noise = float(a.var(0, ddof=1).mean()) / s  # error variance of a seed mean, k(S-1) df
    total = float(np.sum((mean - mean.mean()) ** 2))
    reliability = float(np.clip(1.0 - noise * (k - 1) / total, 0.0, 1.0)) if total > 0 else 0.0
    # Lack of fit against pure error: if the truth were linear in the scores, the residuals of
    # the line would be retraining noise alone, RSS / (k - 2) ~ noise · F(k - 2, k(S - 1)).
    slope, intercept = np.polyfit(p, mean, 1)
    residual = float(np.sum((mean - (slope * p + intercept)) ** 2))
    df_fit, df_noise = k - 2, k * (s - 1)
    if noise > 0:
        # Imported here: every command of the command line imports this module, and
        # scipy.stats alone takes about a second to import.
        from scipy import stats

        p_value = float(stats.f.sf(residual / df_fit / noise, df_fit, df_noise))
        critical = float(stats.f.isf(LEVEL, df_fit, df_noise)) * df_fit * noise
        floor = math.sqrt(max(0.0, 1.0 - critical / total)) if total > 0 else 0.0
    else:  # no noise at all: only an exact line is within it
        exact = residual <= 1e-12 * max(total, 1e-300)
        p_value, floor = (1.0 if exact else 0.0), 1.0
    pearson = agreement(p, mean).pearson
    return NoiseBound(
        reliability=reliability,
        pearson_ceiling=math.sqrt(reliability),
        pearson_floor=floor,
        lack_of_fit_p=p_value,
        within_noise=bool(slope > 0 and p_value >= LEVEL and math.isfinite(pearson)),
        seed_pearson_range=pearson_range,
        seed_spearman_range=spearman_range,
    )


def _range(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (math.nan, math.nan)
