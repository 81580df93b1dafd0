"""Basu, Pope & Feizi's own numbers next to ours.

Only numbers we are confident the study reports are quoted, and each says how sure we are of
what exactly it measured. The study ran on MNIST with the full training set and networks up to
ResNet-50; ours run on two Fashion-MNIST classes with networks a CPU can retrain hundreds of
times, so each row pairs a study network with the closest one here (docs/fragility.md says where
the protocols differ and why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.fragility.reporting import mean_of, span_of
from core.fragility.results import FragilityResults, PointResult
from core.networks import Architecture

#: How far apart (in correlation) our mean and the study's number may be and still "match".
MATCH_TOLERANCE = 0.1


@dataclass(frozen=True)
class StudyNumber:
    """A correlation the study reports, and the network here that stands for its network.

    Attributes:
        finding: what the number is about, in a few words.
        network, dataset: the study's network and dataset.
        weight_decay: the study's weight decay (1e-3 or 0).
        pearson, spearman: the study's values (NaN where it gives none).
        source: where in the study it is.
        caveat: what we are not sure of about it, or "".
        counterpart: our network standing for the study's.
    """

    finding: str
    network: str
    dataset: str
    weight_decay: float
    pearson: float
    spearman: float
    source: str
    caveat: str
    counterpart: Architecture


_TEST_POINT_CAVEAT = (
    "which of the study's test points (highest or median loss) this column is for was not "
    "checked against the paper here; compared with our high-loss test point"
)

#: The study's numbers quoted in docs/fragility.md and on the Trust page.
STUDY_NUMBERS: tuple[StudyNumber, ...] = (
    StudyNumber(
        "small CNN, with weight decay",
        "small CNN",
        "MNIST",
        1e-3,
        0.95,
        0.87,
        "Table 1",
        _TEST_POINT_CAVEAT,
        Architecture(2, 8),
    ),
    StudyNumber(
        "small CNN, without weight decay",
        "small CNN",
        "MNIST",
        0.0,
        0.41,
        0.35,
        "Table 1",
        _TEST_POINT_CAVEAT,
        Architecture(2, 8),
    ),
    StudyNumber(
        "LeNet, with weight decay",
        "LeNet",
        "MNIST",
        1e-3,
        0.83,
        0.51,
        "Table 1",
        _TEST_POINT_CAVEAT,
        Architecture.lenet5(),
    ),
    StudyNumber(
        "deep residual network, with weight decay",
        "ResNet-50",
        "MNIST",
        1e-3,
        0.24,
        0.22,
        "Table 1",
        _TEST_POINT_CAVEAT + "; ours is a ResNet-8, 50 layers are far beyond a CPU",
        Architecture.resnet(8, 8),
    ),
    StudyNumber(
        "width: 8 channels",
        "CNN, 8 channels",
        "MNIST subset",
        1e-3,
        math.nan,
        0.82,
        "width experiment (text)",
        "the study's exact network, weight decay and test point for this series are not "
        "verified here",
        Architecture(2, 8),
    ),
    StudyNumber(
        "width: 50 channels",
        "CNN, 50 channels",
        "MNIST subset",
        1e-3,
        math.nan,
        0.56,
        "width experiment (text)",
        "the study's exact network, weight decay and test point for this series are not "
        "verified here",
        Architecture(2, 50),
    ),
)


@dataclass(frozen=True)
class StudyComparison:
    """One of the study's numbers next to ours.

    Attributes:
        study: the study's number and its caveat.
        label: our network; test_point: ours it is compared with ("high_loss").
        repeats: our repeats averaged (0: not run here).
        cg_pearson, cg_spearman: ours with the full-network CG solution (means over repeats).
        cg_pearson_range, cg_spearman_range: (min, max) over repeats.
        lissa_pearson, lissa_spearman: ours with LiSSA (the study's solver for large networks).
        last_layer_pearson, last_layer_spearman: ours with the last layer's Hessian (NaN when
            the network got the full exact Hessian instead).
        pearson_ceiling: the best Pearson our ground truth's noise allows (CG's top k).
        within_noise: CG's repeats within noise of perfect.
        reading: "matches" (our mean within 0.1 of each number the study gives), "higher here",
            "lower here", or "not run".
    """

    study: StudyNumber
    label: str
    test_point: str
    repeats: int
    cg_pearson: float
    cg_spearman: float
    cg_pearson_range: tuple[float, float]
    cg_spearman_range: tuple[float, float]
    lissa_pearson: float
    lissa_spearman: float
    last_layer_pearson: float
    last_layer_spearman: float
    pearson_ceiling: float
    within_noise: int
    reading: str


def study_comparison(
    results: FragilityResults, test_point: str = "high_loss"
) -> tuple[StudyComparison, ...]:
    """Each of the study's numbers (:data:`STUDY_NUMBERS`) next to our counterpart's."""
    return tuple(_compare(number, results, test_point) for number in STUDY_NUMBERS)


def _points(
    results: FragilityResults, number: StudyNumber, solver: str, scope: str, kind: str
) -> list[PointResult]:
    out = []
    arch = number.counterpart
    for s in results.settings:
        if s.skipped or s.model != arch.family or s.weight_decay != number.weight_decay:
            continue
        if (s.depth, s.width, s.activation) != (arch.depth, arch.width, arch.activation):
            continue
        r = s.solver(solver, scope)
        p = r.point(kind) if r is not None else None
        if p is not None:
            out.append(p)
    return out


def _compare(number: StudyNumber, results: FragilityResults, kind: str) -> StudyComparison:
    cg = _points(results, number, "cg", "all", kind)
    lissa = _points(results, number, "lissa", "all", kind)
    last = _points(results, number, "exact", "last", kind)
    cg_pearson = mean_of(p.pearson for p in cg)
    cg_spearman = mean_of(p.spearman for p in cg)
    differences = [
        ours - theirs
        for ours, theirs in ((cg_pearson, number.pearson), (cg_spearman, number.spearman))
        if math.isfinite(ours) and math.isfinite(theirs)
    ]
    if not cg or not differences:
        reading = "not run"
    elif all(abs(d) <= MATCH_TOLERANCE for d in differences):
        reading = "matches"
    else:
        reading = "higher here" if sum(differences) > 0 else "lower here"
    return StudyComparison(
        study=number,
        label=number.counterpart.label,
        test_point=kind,
        repeats=len(cg),
        cg_pearson=cg_pearson,
        cg_spearman=cg_spearman,
        cg_pearson_range=span_of(p.pearson for p in cg),
        cg_spearman_range=span_of(p.spearman for p in cg),
        lissa_pearson=mean_of(p.pearson for p in lissa),
        lissa_spearman=mean_of(p.spearman for p in lissa),
        last_layer_pearson=mean_of(p.pearson for p in last),
        last_layer_spearman=mean_of(p.spearman for p in last),
        pearson_ceiling=mean_of(p.noise.pearson_ceiling for p in cg if p.noise is not None),
        within_noise=sum(1 for p in cg if p.noise is not None and p.noise.within_noise),
        reading=reading,
    )
