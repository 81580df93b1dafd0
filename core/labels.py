"""What people see for each of core's choices: every display name, in one place.

Core names its choices with short keys ("corrected", "lissa", "high_loss", ...); reports, the CLI
and the dashboard show these names instead. Each wording lives here once, so a page, a CLI report
and a results table never disagree about what a thing is called.

Two kinds of dict, by suffix:

- ``*_LABELS``: the short name, for menus, legends, table cells and column headers.
- ``*_DESCRIPTIONS``: a longer phrase saying what the choice is, for reports and explanations.
  It exists only where something shows it.

Nothing here computes anything. The modules that define the choices (``core.influence``,
``core.groups``, ...) keep the keys; tests/core/test_labels.py checks that every key has its name.
"""

from __future__ import annotations

#: Influence estimates (``core.influence.ESTIMATES``).
ESTIMATE_LABELS: dict[str, str] = {
    "margin": "Exact in the margin",
    "corrected": "Newton-corrected",
    "first_order": "First order (paper)",
}
ESTIMATE_DESCRIPTIONS: dict[str, str] = {
    "margin": "exact in the margin (loss at the Newton-predicted margin)",
    "corrected": "Newton-corrected, loss linearised (H without the point)",
    "first_order": "first order (Koh & Liang)",
}

#: Inverse-Hessian solvers (``core.influence.SOLVERS``): the menu's names, which say how each
#: solves, and the short names the fragility study's tables and charts use.
SOLVER_LABELS: dict[str, str] = {
    "exact": "Exact (Cholesky)",
    "cg": "Conjugate gradients",
    "lissa": "LiSSA",
}
SOLVER_SHORT_LABELS: dict[str, str] = {"exact": "exact", "cg": "CG", "lissa": "LiSSA"}

#: Estimates of a group's effect (``core.groups.GROUP_ESTIMATES``).
GROUP_ESTIMATE_LABELS: dict[str, str] = {
    "first_order": "First order",
    "second_order": "Second order (Basu et al.)",
    "corrected": "Newton-corrected",
}
GROUP_ESTIMATE_DESCRIPTIONS: dict[str, str] = {
    "first_order": "first order (sum of individual scores)",
    "second_order": "second order (Basu et al., pairwise interactions)",
    "corrected": "Newton-corrected (H without the group)",
}

#: How groups are formed (``core.groups.GROUP_KINDS``).
GROUP_KIND_LABELS: dict[str, str] = {
    "random": "random",
    "class": "random within one class",
    "cluster": "k-means clusters",
    "helpful": "most helpful",
    "harmful": "most harmful",
    "custom": "your own group",
}

#: Orders in which training labels are checked (``core.mislabel.RANKINGS``).
RANKING_LABELS: dict[str, str] = {
    "self_influence": "self-influence (largest first)",
    "training_loss": "training loss (largest first)",
    "random": "random order",
}

#: The fragility study's test points (``core.fragility.TEST_POINTS``).
TEST_POINT_LABELS: dict[str, str] = {"high_loss": "high-loss", "median_loss": "median-loss"}
TEST_POINT_DESCRIPTIONS: dict[str, str] = {
    kind: f"{name} test point" for kind, name in TEST_POINT_LABELS.items()
}

__all__ = [
    "ESTIMATE_DESCRIPTIONS",
    "ESTIMATE_LABELS",
    "GROUP_ESTIMATE_DESCRIPTIONS",
    "GROUP_ESTIMATE_LABELS",
    "GROUP_KIND_LABELS",
    "RANKING_LABELS",
    "SOLVER_LABELS",
    "SOLVER_SHORT_LABELS",
    "TEST_POINT_DESCRIPTIONS",
    "TEST_POINT_LABELS",
]
