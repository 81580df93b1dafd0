"""The ``influence`` console script (also ``python -m core``).

Each subcommand lives in ``core/commands/<name>.py`` and exposes ``register(subparsers)``, which
adds its parser and sets ``handler``. Every subcommand prints a human-readable report by default and
JSON with ``--json``; domain errors become a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from core import __version__
from core.errors import (
    InfluenceExplorerError,
    NonFiniteFeaturesError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)

#: Subcommand modules under core.commands, in help order; each exposes ``register(subparsers)``.
COMMANDS: tuple[str, ...] = (
    "precompute",
    "explain",
    "verify",
    "groups",
    "mislabel",
    "attack",
    "fragility",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand in COMMANDS registered."""
    parser = argparse.ArgumentParser(
        prog="influence",
        description=(
            "Explain an image classifier's predictions through its training data. Influence "
            "scores are in units of test loss: positive = the training image helped the "
            "prediction (removing it would raise the test loss), negative = it hurt."
        ),
    )
    parser.add_argument("--version", action="version", version=f"influence-explorer {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        # Found by name, so that adding a command is one line in COMMANDS.
        importlib.import_module(f"core.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except InfluenceExplorerError as error:
        print(f"influence {args.command}: error: {error}{_option_hint(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"influence {args.command}: interrupted", file=sys.stderr)
        return 130


def _option_hint(error: InfluenceExplorerError) -> str:
    """The command-line option that fixes ``error``, when there is one (core's messages name
    the setting, e.g. "damping"; this names the flag)."""
    if isinstance(error, NotPositiveDefiniteError) and error.suggested_damping is not None:
        return f" (Try --damping {error.suggested_damping:.2g}.)"
    if isinstance(error, SolverDivergedError):
        return " (Try --solver exact.)"
    if isinstance(error, NonFiniteFeaturesError):
        return " (Try another --backbone.)"
    return ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
