"""Parsing the comma-separated list options of the groups, mislabel and attack commands.

Each parser raises :class:`~core.errors.InfluenceExplorerError` naming the option, so a bad value
becomes a one-line message and exit status 2 before anything expensive starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from core.errors import InfluenceExplorerError


def add_model_choice(parser: argparse.ArgumentParser) -> None:
    """--model all|KEY[,KEY...]."""
    parser.add_argument(
        "--model",
        default="all",
        help="which models, by key (svm: the RBF SVM on pixels; logreg: the logistic regression "
        "on backbone features; network: your network's last layer, with --network), "
        "comma-separated, or all (default; 'both' also works)",
    )


def model_keys(choice: str, available: Sequence[str]) -> tuple[str, ...]:
    """--model's value as keys of the explainer's models (``available``, in display order)."""
    if choice.strip() in ("all", "both"):
        return tuple(available)
    return parse_choices(choice, "--model", tuple(available))


def _items(text: str, option: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise InfluenceExplorerError(f"{option} needs at least one value.")
    return items


def parse_fractions(text: str, option: str, *, upper_inclusive: bool = False) -> tuple[float, ...]:
    """'0.05,0.1' -> (0.05, 0.1); each must be in (0, 1) (or (0, 1] with ``upper_inclusive``)."""
    values = []
    for item in _items(text, option):
        try:
            value = float(item)
        except ValueError:
            raise InfluenceExplorerError(
                f"{option} takes fractions such as 0.05,0.1; got {item!r}."
            ) from None
        if not (0 < value < 1 or (upper_inclusive and value == 1)):
            bound = "(0, 1]" if upper_inclusive else "(0, 1)"
            raise InfluenceExplorerError(f"{option} values must be in {bound}; got {item}.")
        values.append(value)
    return tuple(values)


def parse_indices(text: str, option: str) -> tuple[int, ...]:
    """'3,17,40' -> (3, 17, 40); non-negative integers."""
    values = []
    for item in _items(text, option):
        if not item.isdigit():
            raise InfluenceExplorerError(
                f"{option} takes non-negative integers such as 3,17,40; got {item!r}."
            )
        values.append(int(item))
    return tuple(values)


def parse_choices(text: str, option: str, choices: Sequence[str]) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each one of ``choices``."""
    values = _items(text, option)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise InfluenceExplorerError(
            f"{option} takes some of {', '.join(choices)}; got {', '.join(map(repr, unknown))}."
        )
    return tuple(values)


def check_test_index(explainer: object, index: int) -> int:
    """A test row of the explainer, or a clear error."""
    n_test = len(explainer.test_labels)  # type: ignore[attr-defined]
    if not 0 <= index < n_test:
        raise InfluenceExplorerError(f"--test-index must be in [0, {n_test}); got {index}.")
    return index
