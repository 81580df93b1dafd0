"""The results file and the progress file of a long run, as JSON.

Both are written atomically (a temporary file renamed into place), so a run killed at any moment
leaves the previous complete file. Nothing is unpickled: the dataclasses are rebuilt field by
field from their type hints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InfluenceExplorerError
from core.fragility.config import FragilityConfig
from core.fragility.results import FORMAT_VERSION, FragilityResults, SettingResult

#: What a progress file says it is.
PROGRESS_KIND = "fragility-progress"


def results_to_dict(results: FragilityResults) -> dict[str, Any]:
    """Plain JSON values (NaN and infinities become null)."""
    return _encode(results)


def results_from_dict(data: dict[str, Any]) -> FragilityResults:
    """Inverse of :func:`results_to_dict`.

    Raises:
        InfluenceExplorerError: not a results document of this version.
    """
    if not isinstance(data, dict) or "settings" not in data or "config" not in data:
        raise InfluenceExplorerError("This is not a fragility results document.")
    _check_version(data, "fragility results")
    try:
        return _decode(FragilityResults, data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InfluenceExplorerError(f"The fragility results are damaged: {error}.") from error


def save_results(results: FragilityResults, path: str | os.PathLike[str]) -> Path:
    """Write the results file atomically."""
    return _write_json(results_to_dict(results), Path(path))


def load_results(path: str | os.PathLike[str] | None = None) -> FragilityResults:
    """Read a results file (default: the committed one, :func:`bundled_results_path`)."""
    path = Path(path) if path is not None else bundled_results_path()
    return results_from_dict(
        _read_json(path, "fragility results", f"influence fragility --output {path}")
    )


def bundled_results_path() -> Path:
    """The full grid's results committed with the code: docs/fragility-results.json."""
    return Path(__file__).resolve().parents[2] / "docs" / "fragility-results.json"


def progress_path(output: str | os.PathLike[str]) -> Path:
    """Where a run writing ``output`` keeps its finished cells: next to it, ``<name>.progress``."""
    output = Path(output)
    return output.with_name(output.name + ".progress")


@dataclass(frozen=True)
class Progress:
    """The finished cells of a run that has not written its results yet.

    Attributes:
        config: the study being run (a resumed run must ask for the same one).
        dataset, class_names, n_train, n_test: the data it runs on.
        cells: finished cells, keyed by :attr:`Cell.key <core.fragility.config.Cell.key>`.
        seconds: wall time spent so far, over every resumed run.
        command: how the run was started.
    """

    config: FragilityConfig
    dataset: str
    class_names: tuple[str, ...]
    n_train: int
    n_test: int
    cells: tuple[tuple[str, SettingResult], ...]
    seconds: float
    command: str = ""

    def finished(self) -> dict[str, SettingResult]:
        return dict(self.cells)


def save_progress(progress: Progress, path: str | os.PathLike[str]) -> Path:
    """Write the progress file atomically (after every finished cell)."""
    data = _encode(progress)
    data["kind"] = PROGRESS_KIND
    data["format_version"] = FORMAT_VERSION
    return _write_json(data, Path(path))


def load_progress(path: str | os.PathLike[str]) -> Progress | None:
    """A run's progress file, or None if there is none.

    Raises:
        InfluenceExplorerError: the file exists but is not a progress file of this version.
    """
    path = Path(path)
    if not path.exists():
        return None
    data = _read_json(path, "fragility progress", "delete it to start over")
    if not isinstance(data, dict) or data.get("kind") != PROGRESS_KIND:
        raise InfluenceExplorerError(f"{path} is not a fragility progress file.")
    _check_version(data, f"fragility progress file {path}")
    try:
        return _decode(Progress, data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InfluenceExplorerError(
            f"The fragility progress file {path} is damaged ({error}); delete it to start over."
        ) from error


def _check_version(data: dict[str, Any], what: str) -> None:
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise InfluenceExplorerError(
            f"The {what} have format version {version!r}; this code reads {FORMAT_VERSION}. "
            "Rerun `influence fragility` to regenerate them."
        )


def _write_json(data: dict[str, Any], path: Path) -> Path:
    text = json.dumps(data, indent=1, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; results are for sharing
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _read_json(path: Path, what: str, remedy: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InfluenceExplorerError(f"No {what} at {path}; run `{remedy}`.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InfluenceExplorerError(f"Cannot read {what} {path}: {error}.") from error


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.ndarray):
        return _encode(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else math.nan
        options = [a for a in args if a is not type(None)]
        for option in options:
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return _decode(option, value)
        if float in options and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in names})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value, strict=True))
    if tp is float:
        return math.nan if value is None else float(value)
    if tp is int:
        return int(value)
    if tp is str:
        return str(value)
    if tp is bool:
        return bool(value)
    return value
