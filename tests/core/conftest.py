"""Fixtures for running CLI commands end to end on a tiny dataset with the real offline backbone."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.cli import main
from core.data import load_demo


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_idx_dataset(tmp_path_factory) -> Path:
    """A directory of Fashion-MNIST idx files cut from the demo: 12 training and 4 test images of
    T-shirt/top and Shirt (the default pair), one of each other class (every class needs one)."""
    demo = load_demo()
    root = tmp_path_factory.mktemp("fashion-tiny")
    for split, prefix, per_class in (("train", "train", 12), ("test", "t10k", 4)):
        labels = getattr(demo, f"{split}_labels")
        images = getattr(demo, f"{split}_images")
        rows = np.concatenate(
            [np.flatnonzero(labels == c)[: per_class if c in (0, 6) else 1] for c in range(10)]
        )
        rows.sort()
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images[rows][..., 0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels[rows])
    return root


@pytest.fixture(scope="session")
def run_cli(tiny_idx_dataset, tmp_path_factory) -> Callable[..., tuple[int, Any, str]]:
    """run_cli(command, *options) on the tiny dataset -> (exit status, parsed --json or None,
    stderr). Features are cached across calls."""
    cache = tmp_path_factory.mktemp("cli-cache")

    def run(command: str, *options: str, capsys: Any) -> tuple[int, Any, str]:
        capsys.readouterr()
        status = main(
            [
                command,
                "--dataset",
                str(tiny_idx_dataset),
                "--cache-dir",
                str(cache),
                "--quiet",
                "--json",
                *options,
            ]
        )
        out, err = capsys.readouterr()
        return status, (json.loads(out) if status == 0 else None), err

    return run
