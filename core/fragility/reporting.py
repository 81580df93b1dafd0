"""Views over a study's results: Basu et al.'s Table 1 shape (averaged over repeats), the noise
floor next to each correlation, correlation against depth and width, solver against solver."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InfluenceExplorerError
from core.fragility.config import FRAGILITY_SOLVERS, TEST_POINTS, wd_text
from core.fragility.results import FragilityResults, PointResult, SettingResult
from core.labels import TEST_POINT_DESCRIPTIONS, TEST_POINT_LABELS

MODEL_ORDER = {"logistic": 0, "svm": 1, "cnn": 2, "lenet": 3, "resnet": 4}


def mean_of(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN if none)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def span_of(values: Iterable[float]) -> tuple[float, float]:
    """(min, max) of the finite values ((NaN, NaN) if none)."""
    finite = [v for v in values if math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (math.nan, math.nan)


# ============================================================================ the table
@dataclass(frozen=True)
class TableCell:
    """Pearson and Spearman of one (model row, test point, weight decay), averaged over the
    cell's repeats; NaN when not run.

    Attributes:
        pearson, spearman: means over repeats.
        n: points per repeat (top k).
        note: why the cell is empty, or "".
        repeats: repeats averaged.
        pearson_range, spearman_range: (min, max) over repeats.
        pearson_ceiling: mean over repeats of the best Pearson the ground truth's noise allows
            (NaN for exact retraining or one seed).
        within_noise: repeats whose correlations are within retraining noise of perfect.
    """

    pearson: float = math.nan
    spearman: float = math.nan
    n: int = 0
    note: str = ""
    repeats: int = 0
    pearson_range: tuple[float, float] = (math.nan, math.nan)
    spearman_range: tuple[float, float] = (math.nan, math.nan)
    pearson_ceiling: float = math.nan
    within_noise: int = 0

    @property
    def available(self) -> bool:
        return math.isfinite(self.pearson) and math.isfinite(self.spearman)

    def text(self) -> str:
        if not self.available:
            return "—"
        return f"{self.pearson:.2f} / {self.spearman:.2f}"

    @classmethod
    def of(cls, points: list[PointResult]) -> TableCell:
        """The cell over one point result per repeat."""
        ceilings = [p.noise.pearson_ceiling for p in points if p.noise is not None]
        return cls(
            pearson=mean_of(p.pearson for p in points),
            spearman=mean_of(p.spearman for p in points),
            n=len(points[0].predicted),
            repeats=len(points),
            pearson_range=span_of(p.pearson for p in points),
            spearman_range=span_of(p.spearman for p in points),
            pearson_ceiling=mean_of(ceilings),
            within_noise=sum(1 for p in points if p.noise is not None and p.noise.within_noise),
        )


@dataclass(frozen=True)
class TableRow:
    """A model row of the table: a convex model, or a network with one solver."""

    label: str
    model: str
    depth: int
    width: int
    solver: str
    scope: str
    cells: tuple[TableCell, ...]


@dataclass(frozen=True)
class FragilityTable:
    """Basu et al.'s Table 1 shape: rows are models, columns (test point, weight decay), cells
    Pearson / Spearman of influence against retraining."""

    columns: tuple[tuple[str, float], ...]
    rows: tuple[TableRow, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.columns)

    def column_labels(self) -> tuple[str, ...]:
        return tuple(f"{TEST_POINT_LABELS[kind]}, {wd_text(wd)}" for kind, wd in self.columns)

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per row with a "Pearson / Spearman" string per column (for a data frame)."""
        return [
            {
                "model": row.label,
                **{c: cell.text() for c, cell in zip(self.column_labels(), row.cells, strict=True)},
            }
            for row in self.rows
        ]

    def to_markdown(self, *, noise: bool = False) -> str:
        """The table as a Markdown pipe table (for docs and ``st.markdown``).

        With ``noise``, each cell also gives the Pearson ceiling the ground truth's noise allows
        ("≤ 0.97") and, when every repeat is within that noise, a check mark.
        """
        header = ["model", *self.column_labels()]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            texts = [_noise_text(c) if noise else c.text() for c in row.cells]
            lines.append("| " + " | ".join([row.label, *texts]) + " |")
        return "\n".join(lines)

    def to_text(self) -> str:
        """The table as aligned plain text (what the CLI prints)."""
        kinds = list(dict.fromkeys(kind for kind, _ in self.columns))
        label_width = max([len("model"), *(len(r.label) for r in self.rows)]) + 2
        per_kind = max(1, len(self.columns) // max(len(kinds), 1))
        cell_width = max(
            13,
            *(len(wd_text(wd)) + 2 for _, wd in self.columns),
            *(-(-(len(TEST_POINT_DESCRIPTIONS[k]) + 2) // per_kind) for k in kinds),
        )
        header1 = " " * label_width
        header2 = "model".ljust(label_width)
        for kind in kinds:
            span = sum(1 for k, _ in self.columns if k == kind) * cell_width
            header1 += TEST_POINT_DESCRIPTIONS[kind].center(span)
        for _, wd in self.columns:
            header2 += wd_text(wd).center(cell_width)
        lines = [header1.rstrip(), header2.rstrip(), "-" * len(header2)]
        for row in self.rows:
            line = row.label.ljust(label_width)
            line += "".join(cell.text().center(cell_width) for cell in row.cells)
            lines.append(line.rstrip())
        return "\n".join(lines)


def _noise_text(cell: TableCell) -> str:
    text = cell.text()
    if not cell.available or not math.isfinite(cell.pearson_ceiling):
        return text
    mark = " ✓" if cell.within_noise == cell.repeats and cell.repeats > 0 else ""
    return f"{text} (≤ {cell.pearson_ceiling:.2f}{mark})"


def _row_key(s: SettingResult, solver: str, scope: str, label: str) -> tuple:
    return (s.model, s.depth, s.width, s.activation, solver, scope, label)


def build_table(results: FragilityResults) -> FragilityTable:
    """Basu et al.'s Table 1 from a study: one row per convex model and per (network, solver),
    each cell averaged over the cell's repeats."""
    columns = tuple(
        (kind, float(wd)) for kind in TEST_POINTS for wd in results.config.weight_decays
    )
    points: dict[tuple, dict[tuple[str, float], list[PointResult]]] = {}
    notes: dict[tuple, dict[tuple[str, float], str]] = {}
    for s in results.settings:
        if s.skipped:
            key = _row_key(s, "exact", "all", s.label)
            points.setdefault(key, {})
            for kind in TEST_POINTS:
                notes.setdefault(key, {})[(kind, s.weight_decay)] = s.skipped
            continue
        for r in s.solvers:
            label = s.label if not s.is_network else f"{s.label} · {r.label}"
            key = _row_key(s, r.solver, r.scope, label)
            cells = points.setdefault(key, {})
            for kind in TEST_POINTS:
                p = r.point(kind)
                if p is not None:
                    cells.setdefault((kind, s.weight_decay), []).append(p)
                else:
                    notes.setdefault(key, {})[(kind, s.weight_decay)] = r.error or "not run"
    # A model's placeholder row (all its cells skipped) only stays if no cell of it ran.
    ran = {key[:4] for key, found in points.items() if found}
    keys = [key for key, found in points.items() if found or key[:4] not in ran]
    solver_order = {name: i for i, name in enumerate(FRAGILITY_SOLVERS)}
    keys.sort(key=lambda k: (MODEL_ORDER[k[0]], k[1], k[2], k[3], solver_order[k[4]], k[5]))
    rows = []
    for key in keys:
        cells = []
        for column in columns:
            found = points[key].get(column)
            if found:
                cells.append(TableCell.of(found))
            else:
                cells.append(TableCell(note=notes.get(key, {}).get(column, "not run")))
        rows.append(TableRow(key[6], key[0], key[1], key[2], key[4], key[5], tuple(cells)))
    return FragilityTable(columns=columns, rows=tuple(rows))


# ============================================================================ noise floor
@dataclass(frozen=True)
class NoiseFloorRow:
    """One network, weight decay, test point and solver: the agreement with retraining next to
    the best agreement the retraining noise allows, over the cell's repeats.

    Attributes:
        label, model: the network; weight_decay; test_point; solver: its label.
        pearson, spearman: means over repeats.
        pearson_range, spearman_range: (min, max) over repeats.
        seed_pearson_range: (min, max) over repeats and seeds of the correlation with a single
            seed's actual changes.
        pearson_ceiling: mean sqrt(reliability) (see :class:`~core.fragility.results.NoiseBound`).
        pearson_floor: mean over repeats of the lowest Pearson within noise of perfect (the
            lack-of-fit test of :class:`~core.fragility.results.NoiseBound`).
        within_noise, repeats: repeats within noise of perfect, of how many.
        chance_std: how far this test point's loss moves by chance when the network is retrained
            with nothing removed (mean over repeats of the standard deviation over seeds).
        effect_rms: the size of the measured changes (root mean square, mean over repeats).
    """

    label: str
    model: str
    weight_decay: float
    test_point: str
    solver: str
    pearson: float
    spearman: float
    pearson_range: tuple[float, float]
    spearman_range: tuple[float, float]
    seed_pearson_range: tuple[float, float]
    pearson_ceiling: float
    pearson_floor: float
    within_noise: int
    repeats: int
    chance_std: float
    effect_rms: float

    @property
    def verdict(self) -> str:
        """ "within noise" (every repeat), "below noise floor" (none) or "mixed"."""
        if self.within_noise == self.repeats:
            return "within noise"
        return "below noise floor" if self.within_noise == 0 else "mixed"


def noise_floor(results: FragilityResults) -> tuple[NoiseFloorRow, ...]:
    """Every network's correlations next to what retraining noise allows (docs/fragility.md,
    "The noise floor"), in table order."""
    groups: dict[tuple, list[tuple[SettingResult, int, PointResult]]] = {}
    for s in results.settings:
        if not s.is_network or s.skipped or s.ground_truth is None:
            continue
        for r in s.solvers:
            for i, p in enumerate(r.points):
                if p.noise is None:
                    continue
                key = (
                    s.model,
                    s.depth,
                    s.width,
                    s.activation,
                    s.label,
                    s.weight_decay,
                    p.kind,
                    r.label,
                )
                groups.setdefault(key, []).append((s, i, p))
    out = []
    for key, members in groups.items():
        ps = [p for _, _, p in members]
        gts = [(s.ground_truth, i) for s, i, _ in members]
        seeds = [v for p in ps if p.noise is not None for v in p.noise.seed_pearson_range]
        out.append(
            NoiseFloorRow(
                label=key[4],
                model=key[0],
                weight_decay=key[5],
                test_point=key[6],
                solver=key[7],
                pearson=mean_of(p.pearson for p in ps),
                spearman=mean_of(p.spearman for p in ps),
                pearson_range=span_of(p.pearson for p in ps),
                spearman_range=span_of(p.spearman for p in ps),
                seed_pearson_range=span_of(seeds),
                pearson_ceiling=mean_of(p.noise.pearson_ceiling for p in ps if p.noise),
                pearson_floor=mean_of(p.noise.pearson_floor for p in ps if p.noise),
                within_noise=sum(1 for p in ps if p.noise and p.noise.within_noise),
                repeats=len(ps),
                chance_std=mean_of(g.chance_std[i] for g, i in gts if g and len(g.chance_std) > i),
                effect_rms=mean_of(g.effect_rms[i] for g, i in gts if g and len(g.effect_rms) > i),
            )
        )
    solver_rank = {"exact": 0, "CG": 1, "LiSSA": 2, "exact (last layer)": 3}
    out.sort(
        key=lambda r: (
            MODEL_ORDER[r.model],
            r.label,
            -r.weight_decay,
            TEST_POINTS.index(r.test_point),
            solver_rank.get(r.solver, 9),
        )
    )
    return tuple(out)


# ============================================================================ series
@dataclass(frozen=True)
class SeriesPoint:
    """One network of a depth or width series (means over its repeats)."""

    x: int
    label: str
    n_params: int
    pearson: float
    spearman: float


@dataclass(frozen=True)
class CorrelationSeries:
    """Correlation against depth (width fixed) or width (depth fixed) of the small CNNs, for one
    solver, test point and weight decay: a line of the Trust page's chart."""

    vary: str
    fixed: int
    solver: str
    test_point: str
    weight_decay: float
    points: tuple[SeriesPoint, ...]

    @property
    def name(self) -> str:
        other = "width" if self.vary == "depth" else "depth"
        return (
            f"{self.solver}, {TEST_POINT_DESCRIPTIONS[self.test_point]}, "
            f"{wd_text(self.weight_decay)} "
            f"({other} {self.fixed})"
        )


def correlation_series(
    results: FragilityResults,
    vary: str = "depth",
    *,
    solver: str | None = None,
    test_point: str | None = None,
    weight_decay: float | None = None,
) -> tuple[CorrelationSeries, ...]:
    """Pearson and Spearman of the small CNNs ("cnn" family) against depth or width, one series
    per (other dimension's value, solver label, test point, weight decay) with at least two
    networks; repeats are averaged.

    Args:
        vary: "depth" or "width".
        solver: keep only this solver label (e.g. "exact", "LiSSA", "exact (last layer)").
        test_point: keep only "high_loss" or "median_loss".
        weight_decay: keep only this λ.
    """
    if vary not in ("depth", "width"):
        raise InfluenceExplorerError(f"vary must be 'depth' or 'width'; got {vary!r}.")
    groups: dict[tuple[int, str, str, float], dict[int, list[tuple[SettingResult, PointResult]]]]
    groups = {}
    for s in results.settings:
        if s.model != "cnn" or s.skipped:
            continue
        if weight_decay is not None and s.weight_decay != weight_decay:
            continue
        x, fixed = (s.depth, s.width) if vary == "depth" else (s.width, s.depth)
        for r in s.solvers:
            if solver is not None and r.label != solver:
                continue
            for p in r.points:
                if test_point is not None and p.kind != test_point:
                    continue
                key = (fixed, r.label, p.kind, s.weight_decay)
                groups.setdefault(key, {}).setdefault(x, []).append((s, p))
    out = []
    for (fixed, label, kind, wd), by_x in groups.items():
        if len(by_x) < 2:
            continue
        pts = tuple(
            SeriesPoint(
                x,
                members[0][0].label,
                members[0][0].n_params,
                mean_of(p.pearson for _, p in members),
                mean_of(p.spearman for _, p in members),
            )
            for x, members in sorted(by_x.items())
        )
        out.append(CorrelationSeries(vary, fixed, label, kind, wd, pts))
    return tuple(sorted(out, key=lambda c: (c.fixed, c.weight_decay, c.test_point, c.solver)))


# ============================================================================ solvers
@dataclass(frozen=True)
class SolverComparison:
    """A solver against the reference (exact, else CG) on one network, test point and repeat.

    Attributes:
        label: network; weight_decay; test_point.
        solver, reference: solver labels.
        pearson, spearman: the solver's scores against retraining (its own top k).
        reference_pearson, reference_spearman: the reference's against retraining.
        score_pearson: the solver's scores against the reference's over all training points.
        relative_error: ‖s - s_ref‖/‖s_ref‖ of the inverse-HVP (NaN across parameter scopes).
        seconds, reference_seconds: solve times.
        repeat: which repeat of the cell.
    """

    label: str
    weight_decay: float
    test_point: str
    solver: str
    reference: str
    pearson: float
    spearman: float
    reference_pearson: float
    reference_spearman: float
    score_pearson: float
    relative_error: float
    seconds: float
    reference_seconds: float
    repeat: int = 0


def solver_comparison(
    results: FragilityResults, solver: str = "lissa", reference: str = "exact"
) -> tuple[SolverComparison, ...]:
    """Solver vs reference on every network cell where both ran (e.g. LiSSA vs exact).

    The reference is the named solver on all parameters; where it only ran on the last layer
    (large networks), CG on all parameters is used instead and named as such.
    """
    out = []
    for s in results.settings:
        if not s.is_network or s.skipped:
            continue
        mine = s.solver(solver)
        ref = s.solver(reference, "all") or s.solver("cg", "all")
        if mine is None or ref is None or ref is mine or not mine.points or not ref.points:
            continue
        for p in mine.points:
            q = ref.point(p.kind)
            if q is None:
                continue
            out.append(
                SolverComparison(
                    label=s.label,
                    weight_decay=s.weight_decay,
                    test_point=p.kind,
                    solver=mine.label,
                    reference=ref.label,
                    pearson=p.pearson,
                    spearman=p.spearman,
                    reference_pearson=q.pearson,
                    reference_spearman=q.spearman,
                    score_pearson=p.score_pearson,
                    relative_error=p.relative_error,
                    seconds=mine.seconds,
                    reference_seconds=ref.seconds,
                    repeat=s.repeat,
                )
            )
    return tuple(out)
