"""Subcommands of the ``influence`` CLI; each module has ``register(subparsers)``."""
