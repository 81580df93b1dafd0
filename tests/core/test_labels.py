"""Every choice core defines has exactly one display name in core.labels, and nothing else."""

from __future__ import annotations

import pytest

from core import labels
from core.fragility import TEST_POINTS
from core.groups import GROUP_ESTIMATES, GROUP_KINDS
from core.influence import ESTIMATES, SOLVERS
from core.mislabel import RANKINGS


@pytest.mark.parametrize(
    ("names", "keys"),
    [
        (labels.ESTIMATE_LABELS, ESTIMATES),
        (labels.ESTIMATE_DESCRIPTIONS, ESTIMATES),
        (labels.SOLVER_LABELS, SOLVERS),
        (labels.SOLVER_SHORT_LABELS, SOLVERS),
        (labels.GROUP_ESTIMATE_LABELS, GROUP_ESTIMATES),
        (labels.GROUP_ESTIMATE_DESCRIPTIONS, GROUP_ESTIMATES),
        (labels.GROUP_KIND_LABELS, GROUP_KINDS),
        (labels.RANKING_LABELS, RANKINGS),
        (labels.TEST_POINT_LABELS, TEST_POINTS),
        (labels.TEST_POINT_DESCRIPTIONS, TEST_POINTS),
    ],
)
def test_every_key_has_a_name_in_the_order_core_defines(names: dict, keys: tuple) -> None:
    # Same keys, same order: menus and legends list the choices in core's order.
    assert tuple(names) == tuple(keys)
    assert all(isinstance(name, str) and name.strip() for name in names.values())


def test_the_label_dicts_live_only_in_core_labels() -> None:
    import core.fragility
    import core.groups
    import core.influence
    import core.mislabel

    for module, name in (
        (core.influence, "ESTIMATE_LABELS"),
        (core.groups, "GROUP_ESTIMATE_LABELS"),
        (core.mislabel, "RANKING_LABELS"),
    ):
        assert not hasattr(module, name), f"{module.__name__}.{name} duplicates core.labels"
    # fragility reads its test-point names from core.labels rather than holding its own.
    assert core.fragility.TEST_POINT_LABELS is labels.TEST_POINT_LABELS
