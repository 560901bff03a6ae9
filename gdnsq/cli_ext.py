"""Subcommands contributed by the edges, each in its own ``gdnsq/cli_<area>.py`` with ``register(sub)``.

Keeping them out of cli.py lets each edge own its command-line surface.
"""
from __future__ import annotations

import importlib

AREAS = ("cluster", "sweep", "export")


def register(subparsers) -> None:
    for area in AREAS:
        try:
            module = importlib.import_module(f"gdnsq.cli_{area}")
        except ModuleNotFoundError as e:
            if e.name != f"gdnsq.cli_{area}":
                raise
            continue
        module.register(subparsers)
