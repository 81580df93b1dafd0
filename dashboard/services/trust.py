"""The Trust page (Basu, Pope & Feizi's fragility study) and the line linking each explanation to it.

The committed study (docs/fragility-results.json) is shared read-only data, cached by the file's
identity; a live run of one setting is cached by its content (the Setting and the study's frozen
FragilityConfig), so sessions asking the same question share it, and each session remembers the
runs it asked for so they are shown again when the user comes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import streamlit as st

from core.errors import InfluenceExplorerError
from core.explainer import Explainer
from core.features import PixelFeaturizer
from core.fragility import (
    MATCH_TOLERANCE,
    Architecture,
    CorrelationSeries,
    FragilityConfig,
    FragilityResults,
    NoiseFloorRow,
    SeriesPoint,
    Setting,
    SettingResult,
    SolverComparison,
    StudyComparison,
    bundled_results_path,
    correlation_series,
    load_results,
    noise_floor,
    run_setting,
    solver_comparison,
    solver_label,
    study_comparison,
)
from core.labels import TEST_POINT_DESCRIPTIONS, TEST_POINT_LABELS
from core.trust import ReferenceCell, TrustReference, trust_reference
from dashboard.services.capacity import network_run
from dashboard.services.runs import SessionRuns, StageProgress
from dashboard.services.settings import DEMO_SPEC, Settings

__all__ = [
    "MATCH_TOLERANCE",
    "TEST_POINT_DESCRIPTIONS",
    "TEST_POINT_LABELS",
    "TRUST_ARCHITECTURES",
    "TRUST_PAGE",
    "TRUST_QUICK_CONFIG",
    "TRUST_WEIGHT_DECAYS",
    "ReferenceCell",
    "ReferenceLookup",
    "TrustProtocol",
    "TrustReference",
    "TrustRun",
    "committed_counterpart",
    "fragility_noise_floor",
    "fragility_results",
    "fragility_series",
    "fragility_solver_comparison",
    "fragility_study_comparison",
    "model_reference",
    "run_trust_setting",
    "trust_protocols",
    "trust_run",
    "trust_setting",
]

TRUST_PAGE = "app_pages/trust.py"
#: Networks offered for a live run: the quick grid's small CNNs, then the study's counterparts
#: (CNN d2 w8 for its small CNN, LeNet-5, a ResNet-8 for its ResNets, 50 channels for its width).
TRUST_ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(1, 4),
    Architecture(2, 4),
    Architecture(1, 8),
    Architecture(2, 8),
    Architecture(3, 8),
    Architecture(4, 8),
    Architecture(2, 16),
    Architecture.lenet5(),
    Architecture.resnet(8, 8),
    Architecture(2, 50),
)
TRUST_WEIGHT_DECAYS: tuple[float, ...] = (1e-3, 0.0)
#: The live run's default protocol: the CLI's ``--quick`` grid (200 images, 60 epochs, one
#: seed); its smallest setting takes about 20 s on one busy core.
TRUST_QUICK_CONFIG = FragilityConfig.quick()


@st.cache_data(max_entries=2, show_spinner="Reading the fragility results…")
def _fragility_results(path: str, modified_ns: int, size: int) -> FragilityResults:
    # modified_ns and size only key the cache: a regenerated file is read again.
    return load_results(path)


def fragility_results() -> FragilityResults:
    """The committed full-grid study (docs/fragility-results.json).

    Raises:
        InfluenceExplorerError: the file is missing, damaged or of another format version.
    """
    path = bundled_results_path()
    try:
        info = path.stat()
    except OSError:
        return load_results(path)  # raises the domain error that says how to regenerate it
    return _fragility_results(str(path), info.st_mtime_ns, info.st_size)


def fragility_series(
    results: FragilityResults, vary: str, test_point: str, weight_decay: float
) -> tuple[str, tuple[CorrelationSeries, ...]]:
    """A chart panel: correlation against ``vary`` ("depth" or "width") for one test point and
    weight decay, one series per solver, and the panel's title (which says what is held fixed).

    The "exact (last layer)" networks are added as their own series even when there is only one
    on the line (core's series need two networks): they show what the last-layer shortcut costs.
    """
    series = correlation_series(results, vary, test_point=test_point, weight_decay=weight_decay)
    if not series:
        return f"Against {vary}", ()
    # The most populated line fixes the other dimension (the committed grid has one per panel).
    fixed = max(series, key=lambda c: len(c.points)).fixed
    chosen = [c for c in series if c.fixed == fixed]
    last_layer = solver_label("exact", "last")
    last = []
    for s in results.settings:
        if s.model != "cnn" or s.skipped or s.weight_decay != weight_decay:
            continue
        x, other = (s.depth, s.width) if vary == "depth" else (s.width, s.depth)
        result = s.solver("exact", "last")
        point = result.point(test_point) if result is not None else None
        if other == fixed and point is not None:
            last.append(SeriesPoint(x, s.label, s.n_params, point.pearson, point.spearman))
    if last and not any(c.solver == last_layer for c in chosen):
        chosen.append(
            CorrelationSeries(
                vary,
                fixed,
                last_layer,
                test_point,
                weight_decay,
                tuple(sorted(last, key=lambda p: p.x)),
            )
        )
    other_name = "width" if vary == "depth" else "depth"
    return f"Against {vary} ({other_name} {fixed})", tuple(chosen)


def fragility_solver_comparison(results: FragilityResults) -> tuple[SolverComparison, ...]:
    """LiSSA against the exact solution (CG where exact covered only the last layer)."""
    return solver_comparison(results, "lissa", "exact")


def fragility_study_comparison(results: FragilityResults) -> tuple[StudyComparison, ...]:
    """Each number of Basu et al.'s Table 1 (and width series) next to our counterpart's."""
    return study_comparison(results)


def fragility_noise_floor(results: FragilityResults) -> tuple[NoiseFloorRow, ...]:
    """Every network cell's correlations next to the best agreement retraining noise allows."""
    return noise_floor(results)


# --------------------------------------------------------------------------- live runs


@dataclass(frozen=True)
class TrustProtocol:
    """A protocol a live run can follow: the study's configuration and a plain description."""

    name: str
    label: str
    config: FragilityConfig
    description: str


def _describe_protocol(config: FragilityConfig) -> str:
    gt = config.ground_truth
    solvers = ", ".join(solver_label(s, "all") for s in config.influence.solvers)
    return (
        f"{config.n_train} training images ({config.image_size}×{config.image_size}), "
        f"{config.training.epochs} epochs of SGD, solvers {solvers}; ground truth: retrain "
        f"without each of the top {gt.top_k} for {gt.retrain_fraction:g} of the epochs, "
        f"{gt.seeds} minibatch order{'s' if gt.seeds != 1 else ''}"
    )


def trust_protocols(results: FragilityResults) -> dict[str, TrustProtocol]:
    """The live run's protocols: "quick" (the default) and "committed" (the table's own)."""
    return {
        "quick": TrustProtocol(
            "quick", "Quick", TRUST_QUICK_CONFIG, _describe_protocol(TRUST_QUICK_CONFIG)
        ),
        "committed": TrustProtocol(
            "committed", "As in the table", results.config, _describe_protocol(results.config)
        ),
    }


def trust_setting(architecture: Architecture, weight_decay: float) -> Setting:
    return Setting.network(architecture, weight_decay)


def committed_counterpart(
    results: FragilityResults, setting: Setting
) -> tuple[SettingResult | None, str]:
    """The committed network to compare a live run with, and how it relates to it.

    The same network and weight decay if the grid has it (its first repeat); otherwise the grid's
    closest network with that weight decay (same family if possible, then the same depth, then
    the nearest width), said so.
    """
    arch = setting.architecture
    candidates = [
        s
        for s in results.settings
        if s.is_network and not s.skipped and s.weight_decay == setting.weight_decay
    ]
    if arch is None or not candidates:
        return None, "The committed grid has no network with this weight decay."
    best = min(
        candidates,
        key=lambda s: (
            s.model != arch.family,
            abs(s.depth - arch.depth),
            abs(math.log2(s.width / arch.width)),
            s.width,
            s.repeat,
        ),
    )
    if (best.model, best.depth, best.width) == (arch.family, arch.depth, arch.width):
        return best, f"the committed {best.label}, {_weight_decay_text(best.weight_decay)}"
    return best, (
        f"the closest committed network, {best.label} ({arch.label} is not in the committed "
        f"grid), {_weight_decay_text(best.weight_decay)}"
    )


def _weight_decay_text(weight_decay: float) -> str:
    return "no weight decay" if weight_decay == 0 else f"weight decay {weight_decay:g}"


@dataclass(frozen=True)
class TrustRun:
    """A live run: one network and weight decay, under one protocol."""

    setting: Setting
    config: FragilityConfig


@st.cache_data(max_entries=16, show_spinner=False)
def _live_setting(run: TrustRun) -> SettingResult:
    setting = run.setting
    progress = StageProgress(f"{setting.label}, {_weight_decay_text(setting.weight_decay)}")
    try:
        # One torch thread: these networks are so small that more threads only add overhead,
        # and the server's cores are shared with other sessions.
        return run_setting(
            setting,
            run.config,
            progress=lambda done, total, stage: progress(stage, done, total),
            threads=1,
        )
    finally:
        progress.clear()


_TRUST_RUNS: SessionRuns[TrustRun, SettingResult] = SessionRuns(
    "state_trust_runs", _live_setting, estimate=network_run
)


def trust_run(setting: Setting, config: FragilityConfig) -> SettingResult | None:
    """This session's earlier live run of exactly this setting and protocol, if any."""
    return _TRUST_RUNS.remembered(TrustRun(setting, config))


def run_trust_setting(setting: Setting, config: FragilityConfig) -> SettingResult:
    """Train one network, compute its influence with every solver and retrain to check it, with
    a progress bar; shared by content across sessions and remembered for this one.

    Raises:
        InfluenceExplorerError: core refused the setting or a solver failed for good.
    """
    return _TRUST_RUNS.run(TrustRun(setting, config))


# --------------------------------------------------------------------------- Explain's trust line


@dataclass(frozen=True)
class ReferenceLookup:
    """The committed study's reference for one of Explain's models, or why there is none.

    Attributes:
        reference: the reference numbers, or None.
        unavailable: when there is no reference, why (a sentence for the page); else "".
    """

    reference: TrustReference | None
    unavailable: str = ""


def model_reference(explainer: Explainer, model_key: str, settings: Settings) -> ReferenceLookup:
    """The committed study's reference numbers for one of Explain's models, if it has them."""
    try:
        results = fragility_results()
    except InfluenceExplorerError:
        return ReferenceLookup(
            None, "The committed study could not be read; the Trust page says why."
        )
    fitted = explainer.models[model_key]
    same_classes = settings.dataset == DEMO_SPEC and tuple(explainer.class_names) == tuple(
        results.class_names
    )
    reference = trust_reference(
        results,
        fitted.model,
        estimate=settings.estimate,
        on_pixels=fitted.featurizer.name == PixelFeaturizer.name,
        same_classes=same_classes,
    )
    if reference is None:
        return ReferenceLookup(
            None,
            "The committed study has no reference row for this kind of model; the Trust page "
            "shows how influence fares on networks trained end to end.",
        )
    return ReferenceLookup(reference)
