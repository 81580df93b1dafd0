"""Running cells and whole grids, with resumable progress for long runs."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core.data import Dataset
from core.errors import InfluenceExplorerError
from core.fragility.codec import Progress, load_progress, save_progress
from core.fragility.config import Cell, FragilityConfig, Setting, wd_text
from core.fragility.convex_cell import run_convex_cell, skipped_result
from core.fragility.data import StudyData, prepare_data
from core.fragility.network_cell import planned_units as network_units
from core.fragility.network_cell import run_network_cell
from core.fragility.results import FragilityResults, SettingResult
from core.fragility.tracking import Progress as ProgressCallback
from core.fragility.tracking import Tracker
from core.networks import torch_threads

#: Called with each finished cell of a grid and its position: on_cell(result, index, total).
CellCallback = Callable[[SettingResult, int, int], None]
#: Progress units of a convex cell.
CONVEX_UNITS = 12


def planned_units(setting: Setting, config: FragilityConfig) -> int:
    """Progress units a setting reports (training epochs, stages, retraining epochs)."""
    return network_units(config) if setting.is_network else CONVEX_UNITS


def run_setting(
    setting: Setting,
    config: FragilityConfig | None = None,
    *,
    data: StudyData | None = None,
    progress: ProgressCallback | None = None,
    threads: int | None = 1,
    repeat: int = 0,
) -> SettingResult:
    """Train one model of the grid, compute its influence with every solver, check by retraining.

    This is the dashboard's live single-cell run; it works for every network family, e.g.
    ``run_setting(Setting.network(Architecture.lenet5(), 1e-3), config)``.

    Args:
        setting: the model and weight decay.
        config: study settings (default :class:`FragilityConfig`); its grid lists are ignored.
        data: prepared data (default :func:`prepare_data` on the bundled demo).
        progress: called as progress(done, total, stage).
        threads: torch threads for the run (restored afterwards); None leaves them alone.
        repeat: which repeat (training seed) of the cell.
    Returns:
        The cell's :class:`SettingResult`.
    """
    config = config if config is not None else FragilityConfig()
    with torch_threads(threads):
        data = data if data is not None else prepare_data(config)
        tracker = Tracker(progress, planned_units(setting, config))
        return _run_cell(Cell(setting, repeat), config, data, tracker)


def _run_cell(
    cell: Cell, config: FragilityConfig, data: StudyData, tracker: Tracker
) -> SettingResult:
    start = tracker.done
    if cell.setting.is_network:
        result = run_network_cell(cell, config, data, tracker)
    else:
        result = run_convex_cell(cell.setting, config, data, tracker)
    tracker.finish(start, planned_units(cell.setting, config))
    tracker.stage("done")
    return result


def run_fragility(
    config: FragilityConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    dataset: Dataset | None = None,
    command: str = "",
    threads: int | None = 1,
    progress_file: str | os.PathLike[str] | None = None,
    on_cell: CellCallback | None = None,
) -> FragilityResults:
    """Run the whole grid (every cell of :meth:`FragilityConfig.cells`).

    With ``progress_file``, each finished cell is written to it atomically, and a run started
    again with the same file and configuration continues after its last finished cell.

    Args:
        config: the study (default: the full grid of docs/fragility.md; hours on one core).
        progress: called as progress(done, total, stage).
        dataset: default the bundled demo.
        command: how the run was started, recorded in the results.
        threads: torch threads for the run (restored afterwards); None leaves them alone.
        progress_file: where finished cells are kept (see :func:`core.fragility.progress_path`);
            its cells are reused by any grid with the same protocol
            (:meth:`FragilityConfig.protocol`), so a grid can also be narrowed or extended.
        on_cell: called after each cell finishes (also for cells taken from the progress file).
    Raises:
        InfluenceExplorerError: the progress file belongs to another protocol or dataset.
    """
    config = config if config is not None else FragilityConfig()
    with torch_threads(threads):
        return _run_grid(config, progress, dataset, command, progress_file, on_cell)


def _run_grid(
    config: FragilityConfig,
    progress: ProgressCallback | None,
    dataset: Dataset | None,
    command: str,
    progress_file: str | os.PathLike[str] | None,
    on_cell: CellCallback | None,
) -> FragilityResults:
    started = time.perf_counter()
    data = prepare_data(config, dataset)
    cells = _cells_for(config, data)
    previous = _resume(progress_file, config, data)
    finished = previous.finished() if previous is not None else {}
    spent = previous.seconds if previous is not None else 0.0
    todo = [c for c in cells if c.key not in finished]
    tracker = Tracker(progress, sum(planned_units(c.setting, config) for c in todo))
    for i, cell in enumerate(cells):
        if cell.key in finished:
            if on_cell is not None:
                on_cell(finished[cell.key], i, len(cells))
            continue
        tracker.prefix = f"[{i + 1}/{len(cells)}] {cell.setting.label}, " + (
            f"{wd_text(cell.setting.weight_decay)}"
            + (f", repeat {cell.repeat}" if config.repeats > 1 else "")
            + ": "
        )
        finished[cell.key] = _run_cell(cell, config, data, tracker)
        if progress_file is not None:
            save_progress(
                _progress(
                    config, data, cells, finished, spent + time.perf_counter() - started, command
                ),
                progress_file,
            )
        if on_cell is not None:
            on_cell(finished[cell.key], i, len(cells))
    return _results(config, data, cells, finished, spent + time.perf_counter() - started, command)


def _cells_for(config: FragilityConfig, data: StudyData) -> tuple[Cell, ...]:
    cells = config.cells()
    if data.n_classes > 2:
        cells = tuple(c for c in cells if c.setting.model != "svm")  # the SVM is binary
    return cells


def _resume(
    path: str | os.PathLike[str] | None, config: FragilityConfig, data: StudyData
) -> Progress | None:
    """The progress file's finished cells, if they were run with this protocol and data (all of
    them: cells another grid of the same protocol ran stay in the file for later runs)."""
    if path is None:
        return None
    previous = load_progress(path)
    if previous is None:
        return None
    if previous.config.protocol() != config.protocol() or previous.dataset != data.name:
        raise InfluenceExplorerError(
            f"The progress file {path} belongs to a run with another protocol or dataset "
            f"({previous.dataset}, {len(previous.cells)} cells finished, started as "
            f"`{previous.command}`). Run with the same protocol to continue it (the grid's "
            "networks, weight decays and repeats may change), pass --restart to discard it, or "
            "choose another --output."
        )
    return dataclasses.replace(previous, config=config)


def _progress(
    config: FragilityConfig,
    data: StudyData,
    cells: tuple[Cell, ...],
    finished: dict[str, SettingResult],
    seconds: float,
    command: str,
) -> Progress:
    # The grid's cells in order, then finished cells of other grids with the same protocol.
    order = [c.key for c in cells if c.key in finished]
    order += [key for key in finished if key not in set(order)]
    return Progress(
        config=config,
        dataset=data.name,
        class_names=data.class_names,
        n_train=int(data.X_train.shape[0]),
        n_test=int(data.X_test.shape[0]),
        cells=tuple((key, finished[key]) for key in order),
        seconds=seconds,
        command=command,
    )


def _results(
    config: FragilityConfig,
    data: StudyData,
    cells: tuple[Cell, ...],
    finished: dict[str, SettingResult],
    seconds: float,
    command: str,
) -> FragilityResults:
    progress = _progress(config, data, cells, finished, seconds, command)
    return _assemble(progress, cells)


def _assemble(progress: Progress, cells: tuple[Cell, ...]) -> FragilityResults:
    """Results from finished cells; the grid's other cells are rows that say "not run"."""
    finished = progress.finished()
    settings = tuple(
        finished[c.key]
        if c.key in finished
        else skipped_result(c.setting, "not run: the grid was stopped before it", 0.0, c.repeat)
        for c in cells
    )
    return FragilityResults(
        config=progress.config,
        dataset=progress.dataset,
        class_names=progress.class_names,
        n_train=progress.n_train,
        n_test=progress.n_test,
        settings=settings,
        seconds=progress.seconds,
        torch_threads=torch.get_num_threads(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=progress.command,
        missing=tuple(c.key for c in cells if c.key not in finished),
        load_average=_load_average(),
    )


def results_from_progress(
    path: str | os.PathLike[str], config: FragilityConfig | None = None
) -> FragilityResults:
    """The results of a stopped run: the cells of ``config``'s grid (default: the grid the run
    was last running) that the progress file holds, the rest marked "not run".

    Raises:
        InfluenceExplorerError: there is no progress file at ``path``, or it has another protocol
            than ``config``.
    """
    previous = load_progress(path)
    if previous is None:
        raise InfluenceExplorerError(f"No fragility progress file at {path}.")
    if config is not None and config.protocol() != previous.config.protocol():
        raise InfluenceExplorerError(
            f"The progress file {path} was run with another protocol than the grid asked for; "
            "give the options it was started with."
        )
    config = config if config is not None else previous.config
    cells = config.cells()
    if len(previous.class_names) > 2:
        cells = tuple(c for c in cells if c.setting.model != "svm")  # the SVM is binary
    return _assemble(dataclasses.replace(previous, config=config), cells)


def _load_average() -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in Path("/proc/loadavg").read_text().split()[:3])
    except (OSError, ValueError):
        try:
            return tuple(os.getloadavg())
        except OSError:
            return ()
