"""Figures the Training data pages quote from committed measurements, and the same headline from
this session's own run.

Data cleaning's headline (the best ranking per model) and Attack's success count for its defaults
are measured, never asserted: each comes from a committed output of a named command
(docs/mislabel-demo.json, docs/attack-defaults.json), read here, and the page says when the
settings shown differ from the ones measured. After a run in the session, the page's own figures
replace the committed ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import mislabel as core_mislabel
from core.explainer import Explainer
from dashboard.services.experiments import ATTACK_DEFAULTS, RANKING_LABELS, RANKINGS
from dashboard.services.settings import Settings

__all__ = [
    "ATTACK_MEASURE_COMMAND",
    "HEADLINE_CHECKED",
    "MISLABEL_MEASURE_COMMAND",
    "CommittedFigure",
    "attack_defaults_measured",
    "best_rankings",
    "committed_best_rankings",
]


#: The share of the training set checked at which the Data cleaning headline compares rankings.
HEADLINE_CHECKED = 0.1
#: The commands whose committed output the Training data pages quote (run from the repository).
MISLABEL_MEASURE_COMMAND = "influence mislabel --json > docs/mislabel-demo.json"
ATTACK_MEASURE_COMMAND = (
    "influence attack --pick lowest-margin --n-test 10 --json > docs/attack-defaults.json"
)
_DOCS = Path(__file__).resolve().parents[2] / "docs"


@dataclass(frozen=True)
class CommittedFigure:
    """A figure read off a committed measurement, for one model, and whether it was measured on
    the settings the page shows (else the page says what it was measured on)."""

    label: str
    text: str
    same_settings: bool


def _committed(name: str) -> dict[str, Any] | None:
    try:
        return json.loads((_DOCS / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _same_engine(payload: dict[str, Any], explainer: Explainer, settings: Settings) -> bool:
    labels = {fitted.label for fitted in explainer.models.values()}
    return (
        settings.dataset == "demo"
        and list(payload.get("classes", [])) == list(explainer.class_names)
        and {m.get("label") for m in payload.get("models", {}).values()} <= labels
    )


def committed_best_rankings(explainer: Explainer, settings: Settings) -> list[CommittedFigure]:
    """Per model of the committed flipped-labels run (docs/mislabel-demo.json): the ranking that
    found the most flipped labels after checking :data:`HEADLINE_CHECKED` of the data."""
    payload = _committed("mislabel-demo.json")
    if payload is None:
        return []
    same = _same_engine(payload, explainer, settings) and settings.estimate == payload.get(
        "estimate"
    )
    out = []
    for model in payload.get("models", {}).values():
        found = {}
        for name, ranking in model.get("rankings", {}).items():
            curve = ranking.get("curve", {})
            checked, values = curve.get("checked", []), curve.get("found", [])
            hits = [
                v
                for c, v in zip(checked, values, strict=False)
                if math.isclose(c, HEADLINE_CHECKED)
            ]
            if hits:
                found[name] = float(hits[0])
        if found:
            out.append(
                CommittedFigure(
                    str(model.get("label")), _ranking_sentence(found), same_settings=same
                )
            )
    return out


def _ranking_sentence(found: dict[str, float]) -> str:
    order = [name for name in RANKINGS if name in found]
    best = max(order, key=lambda name: (found[name], -order.index(name)))
    others = ", ".join(
        f"{RANKING_LABELS[name].split(' (')[0]} {found[name]:.0%}" for name in order if name != best
    )
    return (
        f"**{RANKING_LABELS[best].split(' (')[0]}** finds {found[best]:.0%} of the flipped labels "
        f"after checking {HEADLINE_CHECKED:.0%} of the training data ({others})"
    )


def best_rankings(
    results: dict[str, core_mislabel.MislabelExperiment], labels: dict[str, str]
) -> list[CommittedFigure]:
    """The same headline from this session's own run."""
    out = []
    for key, result in results.items():
        found = {
            name: ranking.found_after(HEADLINE_CHECKED) for name, ranking in result.results.items()
        }
        out.append(CommittedFigure(labels[key], _ranking_sentence(found), same_settings=True))
    return out


def attack_defaults_measured(explainer: Explainer, settings: Settings) -> list[CommittedFigure]:
    """Per model of the committed attack run (docs/attack-defaults.json): how many of its least
    confident correct test images the default attack flipped."""
    payload = _committed("attack-defaults.json")
    if payload is None:
        return []
    defaults = ATTACK_DEFAULTS
    same_config = all(
        payload.get(name) == getattr(defaults, name)
        for name in ("budget", "step_size", "steps", "n_perturb", "retrain_every_step")
    )
    same = same_config and _same_engine(payload, explainer, settings)
    out = []
    for model in payload.get("models", {}).values():
        attacks = model.get("attacks", [])
        flipped = sum(bool(a.get("flipped")) for a in attacks)
        out.append(
            CommittedFigure(
                str(model.get("label")),
                f"{flipped} of {len(attacks)} flipped",
                same_settings=same,
            )
        )
    return out
