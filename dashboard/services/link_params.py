"""The parameters a link may carry: their names, what each sets, and how each is read and checked.

See :mod:`.links` for how a link is opened and how the address is kept current.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dashboard.services.settings import DAMPING_CHOICES

#: Most values a list parameter (e.g. Data cleaning's marked images) may carry.
MAX_LIST = 2000
#: Longest text a parameter may carry (Groups' own indices are bounded by their text box too).
MAX_TEXT = 20_000


class LinkValueError(ValueError):
    """A link parameter's value that cannot be used; the message says what is allowed."""


# --------------------------------------------------------------------------- codecs
def whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        text = text.strip()
        if not (text.lstrip("-").isascii() and text.lstrip("-").isdigit()):
            raise LinkValueError(f"a whole number from {low} to {high} is expected")
        value = int(text)
        if not low <= value <= high:
            raise LinkValueError(f"it must be from {low} to {high}")
        return value

    return parse


def non_negative(text: str) -> int:
    return whole(0, 2**31 - 1)(text)


def choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise LinkValueError("it must be one of " + ", ".join(options))
        return text

    return parse


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise LinkValueError("it must be 0 or 1")
    return text == "1"


def _subset(options: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [part for part in text.split(",") if part]
        unknown = [item for item in items if item not in options]
        if unknown:
            raise LinkValueError(
                f"{', '.join(unknown[:3])} {'is' if len(unknown) == 1 else 'are'} not among "
                + ", ".join(options)
            )
        return [option for option in options if option in items]

    return parse


def _fractions(options: Sequence[float]) -> Callable[[str], list[float]]:
    def parse(text: str) -> list[float]:
        chosen = []
        for part in (p for p in text.split(",") if p):
            try:
                value = float(part)
            except ValueError:
                raise LinkValueError(f"{part[:20]!r} is not a number") from None
            match = next((o for o in options if math.isclose(o, value, rel_tol=1e-9)), None)
            if match is None:
                raise LinkValueError("each must be one of " + ", ".join(f"{o:g}" for o in options))
            chosen.append(match)
        return [o for o in options if o in chosen]

    return parse


def _indices(text: str) -> list[int]:
    parts = [part for part in text.split(",") if part]
    if len(parts) > MAX_LIST:
        raise LinkValueError(f"at most {MAX_LIST} indices")
    values = []
    for part in parts:
        if not (part.isascii() and part.isdigit()):
            raise LinkValueError(f"{part[:20]!r} is not a training index")
        values.append(int(part))
    return sorted(set(values))


def _text(text: str) -> str:
    if len(text) > MAX_TEXT:
        raise LinkValueError(f"at most {MAX_TEXT} characters")
    return text


def _join(values: Any) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values or ())


def shown(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return _join(value)
    return str(value)


@dataclass(frozen=True)
class Param:
    """One link parameter of a page: its name in the address and the widget key it sets.

    Attributes:
        name: in the address.
        key: the session-state key (usually a widget's) it sets and is read from.
        parse: address text -> value; raises :class:`LinkValueError` saying what is allowed.
        check: data-dependent checks (a model key, a test index) happen where the value is read,
            so the key is marked pending with the address's text.
    """

    name: str
    key: str
    parse: Callable[[str], Any]
    check: bool = False


#: Each page's own parameters, by URL path ("" is the home page, Explain).
PAGE_PARAMS: dict[str, tuple[Param, ...]] = {
    "explain": (
        Param("filter", "explain_gallery_filter", choice(("all", "misclassified", "disagree"))),
        Param("gpage", "explain_gallery_page", whole(1, 10_000)),
    ),
    "verify": (Param("vk", "verify_k", whole(3, 200)),),
    "groups": (
        Param("model", "groups_model", str, check=True),
        Param("test", "groups_test_index", non_negative, check=True),
        Param("kinds", "groups_kinds", str),  # parsed against core's kinds below
        Param("sizes", "groups_sizes", str),
        Param("per", "groups_per_size", whole(1, 10)),
        Param("seed", "groups_seed", non_negative),
        Param("custom", "groups_custom", _text),
    ),
    "data-cleaning": (
        Param("model", "clean_model", str, check=True),
        Param("list", "clean_k", whole(1, 200), check=True),
        Param("flip", "clean_flip_percent", whole(1, 40)),
        Param("checks", "clean_checkpoints", str),
        Param("seed", "clean_seed", non_negative),
        Param("marked", "state_clean_marked", _indices, check=True),
    ),
    "attack": (
        Param("model", "attack_model", str, check=True),
        Param("test", "attack_test_index", non_negative, check=True),
        Param("budget", "attack_budget", whole(1, 255)),
        Param("step", "attack_step_size", whole(1, 64)),
        Param("steps", "attack_steps", whole(1, 50)),
        Param("perturb", "attack_n_perturb", whole(1, 10)),
        Param("retrain", "attack_retrain", _flag),
    ),
    "trust": (
        Param("point", "trust_chart_point", choice(("high_loss", "median_loss"))),
        Param("wd", "trust_chart_wd", float),
        Param("metric", "trust_chart_metric", choice(("pearson", "spearman"))),
    ),
}
#: Pages that explain the session's query (test image or upload) and so carry ``test``/``upload``.
QUERY_PAGES: tuple[str, ...] = ("explain", "compare", "verify")
#: The sidebar's parameters, in the order they are applied and written.
SIDEBAR_PARAMS: tuple[str, ...] = (
    "dataset",
    "classes",
    "backbone",
    "estimate",
    "k",
    "solver",
    "damping",
    "max_train",
    "size",
)


def late_parsers() -> dict[tuple[str, str], Callable[[str], Any]]:
    """Parsers that need the applications' choices (imported lazily: they import core)."""
    from dashboard.services import experiments as ex

    return {
        ("groups", "kinds"): _subset(ex.GROUP_KIND_CHOICES),
        ("groups", "sizes"): _fractions(ex.GROUP_SIZE_CHOICES),
        ("data-cleaning", "checks"): _fractions(ex.MISLABEL_CHECKPOINT_CHOICES),
    }


def damping(text: str) -> float:
    """One of the sidebar's damping choices, written as a number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    match = next((d for d in DAMPING_CHOICES if math.isclose(d, value, abs_tol=1e-15)), None)
    if match is None:
        raise LinkValueError("it must be one of " + ", ".join(f"{d:g}" for d in DAMPING_CHOICES))
    return match
