"""Options, progress and output shared by the CLI subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json and --quiet."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of a report"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """--dataset, --classes, --image-size."""
    parser.add_argument(
        "--dataset",
        default="demo",
        help=(
            "'demo' (bundled Fashion-MNIST subset, default), 'fashion-mnist' (the Debian package's "
            "full idx files), a directory of idx files, or an ImageFolder directory with "
            "train/<class>/ and test/<class>/"
        ),
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="two class names or indices separated by a comma, e.g. 'T-shirt/top,Shirt' "
        "(default: the dataset's default pair)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="side length ImageFolder images are resized to (default 64; idx data keeps 28)",
    )


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    """--cache-dir."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="artifact cache directory (default: $INFLUENCE_CACHE_DIR or ~/.cache/influence-explorer)",
    )


class ProgressBar:
    """A one-line progress bar on stderr, used as a ``progress(done, total)`` callback."""

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done >= total else ""
        self.stream.write(
            f"\r{self.label:<28} [{bar}] {done}/{total} {now - self.start:6.1f}s{end}"
        )
        self.stream.flush()


def to_jsonable(value: Any) -> Any:
    """Numbers, arrays and dataclasses as plain JSON values (NaN and infinities become null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def emit(payload: Any, args: argparse.Namespace, human: Callable[[Any], str]) -> None:
    """Print ``payload`` as JSON (``--json``) or as the report ``human(payload)`` builds."""
    if getattr(args, "json", False):
        json.dump(to_jsonable(payload), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(human(payload).rstrip("\n") + "\n")
