"""The Training data pages' experiments: groups of training images, data cleaning, the attack.

Each experiment is described by a frozen run (:class:`GroupRun`, :class:`MislabelRun`,
:class:`AttackRun`): the engine, the model, the test image and core's frozen config, never
anything that identifies a session. The run keys an ``st.cache_data`` computation, so two sessions
asking the same question share it, and a :class:`~dashboard.services.runs.SessionRuns` remembers
the result for the session that asked, so it is shown again, without a click, on coming back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import streamlit as st

from core import attack as core_attack
from core import groups as core_groups
from core import mislabel as core_mislabel
from core.errors import InfluenceExplorerError
from core.explainer import Explainer
from core.labels import (
    GROUP_ESTIMATE_DESCRIPTIONS,
    GROUP_ESTIMATE_LABELS,
    GROUP_KIND_LABELS,
    RANKING_LABELS,
)
from dashboard.services.capacity import retraining
from dashboard.services.query import has_chosen_test_image, selected_test_index
from dashboard.services.runs import SessionRuns, StageProgress
from dashboard.services.settings import EngineSpec, Settings
from dashboard.services.uploads import as_code

__all__ = [
    "ATTACK_DEFAULTS",
    "ATTACK_RUNS",
    "GROUP_DEFAULT_KINDS",
    "GROUP_DEFAULT_PER_SIZE",
    "GROUP_DEFAULT_SIZES",
    "GROUP_ESTIMATES",
    "GROUP_ESTIMATE_DESCRIPTIONS",
    "GROUP_ESTIMATE_LABELS",
    "GROUP_KIND_CHOICES",
    "GROUP_KIND_LABELS",
    "GROUP_RUNS",
    "GROUP_SIZE_CHOICES",
    "MISLABEL_CHECKPOINT_CHOICES",
    "MISLABEL_DEFAULT_CHECKPOINTS",
    "MISLABEL_DEFAULT_FLIP_PERCENT",
    "MISLABEL_RUNS",
    "RANKINGS",
    "RANKING_LABELS",
    "AttackRun",
    "AttackStart",
    "GroupRun",
    "MislabelRun",
    "amplified_difference",
    "attack_config",
    "attack_start",
    "default_group_test_index",
    "found_curve",
    "group_config",
    "group_count",
    "mislabel_config",
    "parse_indices",
    "size_count",
    "size_label",
    "suspicious_csv",
    "suspicious_images",
]

# ------------------------------------------------------------------ groups

#: Kinds offered as choices ("custom" is added by typing training indices).
GROUP_KIND_CHOICES: tuple[str, ...] = tuple(k for k in core_groups.GROUP_KINDS if k != "custom")
#: Group sizes offered, as fractions of the training set (Koh et al. 2019: 0.25% to 25%).
GROUP_SIZE_CHOICES: tuple[float, ...] = tuple(core_groups.DEFAULT_SIZES)
#: Defaults light enough for well under a minute on the demo: 12 groups, 12 retrains.
GROUP_DEFAULT_KINDS: tuple[str, ...] = ("random", "helpful", "harmful")
GROUP_DEFAULT_SIZES: tuple[float, ...] = (0.005, 0.025, 0.1)
GROUP_DEFAULT_PER_SIZE = 2
GROUP_ESTIMATES: tuple[str, ...] = tuple(core_groups.GROUP_ESTIMATES)
#: Most indices a user can type for their own group (the text box is bounded too).
MAX_CUSTOM_INDICES = 5000


def size_count(fraction: float, n_train: int) -> int:
    """A group size given as a fraction of the training set, in images."""
    return core_groups.size_count(fraction, n_train)


def size_label(fraction: float, n_train: int) -> str:
    """A size choice as the page shows it: the images and the share they really are, e.g.
    "2 (0.2%)" for 0.25% of 1000 (which rounds to 2 images)."""
    count = size_count(fraction, n_train)
    share = count / n_train
    return f"{count} ({share:.1%})" if share < 0.1 else f"{count} ({share:.0%})"


def parse_indices(text: str) -> tuple[int, ...]:
    """Training indices typed by a user: whole numbers separated by commas or spaces.

    Raises:
        InfluenceExplorerError: with a message saying which entry is not an index.
    """
    tokens = str(text).replace(",", " ").split()
    if len(tokens) > MAX_CUSTOM_INDICES:
        raise InfluenceExplorerError(
            f"Type at most {MAX_CUSTOM_INDICES} training indices for your own group."
        )
    for token in tokens:
        if not (token.isascii() and token.isdigit()):
            shown = "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in token[:20])
            raise InfluenceExplorerError(
                f"{as_code(shown)} is not a training index: type whole numbers separated by "
                "commas, e.g. 3, 17, 250."
            )
    return tuple(int(token) for token in tokens)


def group_config(
    kinds: Sequence[str],
    sizes: Sequence[float],
    groups_per_size: int,
    custom_text: str,
    *,
    seed: int,
    tail_estimate: str,
) -> core_groups.GroupConfig:
    """The groups to form, from the page's widgets.

    Raises:
        InfluenceExplorerError: an index that is not a number, or settings core refuses.
    """
    custom = parse_indices(custom_text)
    return core_groups.GroupConfig(
        kinds=tuple(kinds),
        sizes=tuple(sorted(float(s) for s in sizes)),
        groups_per_size=int(groups_per_size),
        custom=custom or None,
        seed=int(seed),
        tail_estimate=tail_estimate,
    )


def group_count(config: core_groups.GroupConfig, n_train: int) -> int:
    """How many groups (and so retrains) a config makes on ``n_train`` images, before running."""
    return core_groups.count_groups(config, n_train)


@st.cache_data(max_entries=8, show_spinner=False)
def _first_misclassified(engine: EngineSpec, _explainer: Explainer) -> int:
    return core_groups.first_misclassified(_explainer.models.values(), _explainer.test_labels)


def default_group_test_index(explainer: Explainer, settings: Settings) -> int:
    """The test image this session picked on Explain, else the first one every model gets wrong
    (on a mistake the explained loss is large and group effects are easy to see)."""
    if has_chosen_test_image():
        return selected_test_index(explainer)
    return _first_misclassified(settings.engine, explainer)


@dataclass(frozen=True)
class GroupRun:
    """Predict and measure removing each group on one model and one test image's loss."""

    engine: EngineSpec
    model_key: str
    test_index: int
    config: core_groups.GroupConfig


@st.cache_data(max_entries=16, show_spinner=False)
def _group_experiment(run: GroupRun, _explainer: Explainer) -> core_groups.GroupExperiment:
    progress = StageProgress(_explainer.models[run.model_key].label)
    try:
        return core_groups.model_group_experiment(
            _explainer.models[run.model_key],
            _explainer.dataset,
            run.config,
            test_index=run.test_index,
            progress=progress,
        )
    finally:
        progress.clear()


#: Predicted (three estimates) and actual (retraining) effects of removing each group, with a
#: progress bar. ``GROUP_RUNS.run(run, explainer)`` raises InfluenceExplorerError when core
#: refuses the settings (e.g. an index out of range).
GROUP_RUNS: SessionRuns[GroupRun, core_groups.GroupExperiment] = SessionRuns(
    "state_group_results", _group_experiment, estimate=retraining("retraining without groups")
)


# ------------------------------------------------------------------ data cleaning

RANKINGS: tuple[str, ...] = tuple(core_mislabel.RANKINGS)
#: Fractions of the training set checked at which the labels found are fixed and the model
#: refitted (one refit per ranking and checkpoint); the curve itself costs no refits.
MISLABEL_CHECKPOINT_CHOICES: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
MISLABEL_DEFAULT_CHECKPOINTS: tuple[float, ...] = (0.1, 0.2)
MISLABEL_DEFAULT_FLIP_PERCENT = 10


@st.cache_data(max_entries=16, show_spinner=False)
def _suspicious(
    engine: EngineSpec, model_key: str, estimate: str, _explainer: Explainer
) -> tuple[core_mislabel.SuspiciousImage, ...]:
    return core_mislabel.suspicious_training_images(
        _explainer.models[model_key], _explainer.dataset, k=None, estimate=estimate
    )


def suspicious_images(
    explainer: Explainer, settings: Settings, model_key: str
) -> tuple[core_mislabel.SuspiciousImage, ...]:
    """Every training image of one model, most suspicious first (largest self-influence, with
    the sidebar's estimate)."""
    return _suspicious(settings.engine, model_key, settings.estimate, explainer)


@st.cache_data(max_entries=16, show_spinner=False)
def _suspicious_csv(
    engine: EngineSpec,
    model_key: str,
    estimate: str,
    _rows: tuple[core_mislabel.SuspiciousImage, ...],
) -> str:
    return core_mislabel.suspicious_csv(_rows)


def suspicious_csv(
    settings: Settings, model_key: str, rows: tuple[core_mislabel.SuspiciousImage, ...]
) -> str:
    """:func:`suspicious_images`' ranking as CSV text (header row, full precision)."""
    return _suspicious_csv(settings.engine, model_key, settings.estimate, rows)


def mislabel_config(
    flip_percent: float, checkpoints: Sequence[float], *, seed: int, estimate: str
) -> core_mislabel.MislabelConfig:
    """The flipped-labels experiment, from the page's widgets.

    Raises:
        InfluenceExplorerError: settings core refuses.
    """
    return core_mislabel.MislabelConfig(
        flip_fraction=float(flip_percent) / 100.0,
        seed=int(seed),
        checkpoints=tuple(sorted(float(c) for c in checkpoints)),
        estimate=estimate,
    )


@dataclass(frozen=True)
class MislabelRun:
    """Flip labels, refit every model, rank its training images and fix the labels found."""

    engine: EngineSpec
    config: core_mislabel.MislabelConfig


@st.cache_data(max_entries=16, show_spinner=False)
def _mislabel_experiment(
    run: MislabelRun, model_key: str, _explainer: Explainer
) -> core_mislabel.MislabelExperiment:
    progress = StageProgress(_explainer.models[model_key].label)
    try:
        return core_mislabel.model_mislabel_experiment(
            _explainer.models[model_key], _explainer.dataset, run.config, progress=progress
        )
    finally:
        progress.clear()


def _mislabel_experiments(
    run: MislabelRun, explainer: Explainer
) -> dict[str, core_mislabel.MislabelExperiment]:
    # One cached experiment per model, so a model's result is reused whatever else is asked.
    return {key: _mislabel_experiment(run, key, explainer) for key in explainer.models}


#: Model key -> its flipped-labels experiment, with a progress bar per model.
#: ``MISLABEL_RUNS.run(run, explainer)`` raises InfluenceExplorerError when core refuses.
MISLABEL_RUNS: SessionRuns[MislabelRun, dict[str, core_mislabel.MislabelExperiment]] = SessionRuns(
    "state_mislabel_results",
    _mislabel_experiments,
    estimate=retraining("the flipped-labels experiment", new_engine=True),
)


def found_curve(result: core_mislabel.RankingResult, fractions: Sequence[float]) -> np.ndarray:
    """Fraction of the flipped labels found after checking each fraction of the training set."""
    return core_mislabel.curve_points(result, fractions)


# ------------------------------------------------------------------ attack

ATTACK_DEFAULTS = core_attack.AttackConfig()


def attack_config(
    budget: int, step_size: int, steps: int, n_perturb: int, retrain_every_step: bool
) -> core_attack.AttackConfig:
    """The attack's settings, from the page's widgets.

    Raises:
        InfluenceExplorerError: settings core refuses.
    """
    return core_attack.AttackConfig(
        budget=int(budget),
        step_size=int(step_size),
        steps=int(steps),
        n_perturb=int(n_perturb),
        retrain_every_step=bool(retrain_every_step),
    )


@dataclass(frozen=True)
class AttackRun:
    """Perturb one test image's most helpful training images for one model, within a budget."""

    engine: EngineSpec
    model_key: str
    test_index: int
    config: core_attack.AttackConfig


@st.cache_data(max_entries=16, show_spinner=False)
def _attack(run: AttackRun, _explainer: Explainer) -> core_attack.AttackResult:
    progress = StageProgress(_explainer.models[run.model_key].label)
    try:
        return core_attack.model_attack(
            _explainer.models[run.model_key],
            _explainer.dataset,
            run.test_index,
            run.config,
            progress=lambda done, total: progress("perturbing and retraining, step", done, total),
        )
    finally:
        progress.clear()


#: The attack, retraining after each step, with a progress bar.
#: ``ATTACK_RUNS.run(run, explainer)`` raises InfluenceExplorerError when core refuses.
ATTACK_RUNS: SessionRuns[AttackRun, core_attack.AttackResult] = SessionRuns(
    "state_attack_results", _attack, estimate=retraining("the attack", new_engine=True)
)


def amplified_difference(result: core_attack.AttackResult) -> np.ndarray:
    """(k, H, W, C) uint8: the perturbations made visible, grey = unchanged, ±budget = black/white."""
    return core_attack.amplified_difference(result)


# ------------------------------------------------------------------ attack's first image


@dataclass(frozen=True)
class AttackStart:
    """Where the Attack page starts for one model: its least confident correct test images."""

    suggestions: tuple[int, ...]

    @property
    def first(self) -> int | None:
        return self.suggestions[0] if self.suggestions else None


@st.cache_data(max_entries=16, show_spinner=False)
def _attack_start(
    engine: EngineSpec, model_key: str, count: int, _explainer: Explainer
) -> AttackStart:
    return AttackStart(
        tuple(
            core_attack.lowest_margin_correct(
                _explainer.models[model_key], _explainer.test_labels, count=count
            )
        )
    )


def attack_start(
    explainer: Explainer, settings: Settings, model_key: str, count: int = 5
) -> AttackStart:
    """The model's ``count`` least confident correctly classified test images, least first: where
    an attack has the best chance (core.attack.lowest_margin_correct)."""
    return _attack_start(settings.engine, model_key, int(count), explainer)
