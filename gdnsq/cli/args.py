"""What several subcommands share: the job file and its overrides, and the help formatter."""

from __future__ import annotations

import argparse

from ..config import JobConfig, load_config, parse_cli_overrides
from ..errors import ConfigError


def formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def job_path(path: str | None, extra: list[str]) -> str | None:
    """The job file: ``-c/--config`` or the first bare word of ``extra`` (taken out of it; argparse cannot
    tell a positional job file from an override's value)."""
    if extra and not extra[0].startswith("-") and "=" not in extra[0]:
        word = extra.pop(0)
        if path is not None:
            raise ConfigError(f"config: two job files given ({path!r} and {word!r}); give one")
        path = word
    return path


def job_config(path: str | None, extra: list[str], **fixed) -> JobConfig:
    """``-c`` or positional job file + ``--section.key value`` overrides (+ ``fixed`` ones) -> JobConfig."""
    path = job_path(path, extra)
    overrides = parse_cli_overrides(extra)
    overrides.update({k: v for k, v in fixed.items() if v is not None})
    return load_config(path, overrides)
