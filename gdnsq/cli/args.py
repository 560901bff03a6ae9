"""What several subcommands share: the job file and its overrides, an output folder, and the help formatter."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..config import JobConfig, load_config, parse_cli_overrides, path_kind
from ..errors import ConfigError, StorageError


def formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


class OneLineParser(argparse.ArgumentParser):
    """A usage error (an unknown command, a missing argument, a flag given a value) is one line and exit 2, as
    every other bad input is, instead of argparse's usage block above it; the line says where the usage is.
    Subcommands' parsers are of the same class (``add_subparsers`` makes them with ``type(self)``)."""

    def error(self, message: str):
        self.exit(2, f"gdnsq: error: {message}; '{self.prog} --help' shows the usage\n")


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


@contextlib.contextmanager
def writing_into(path: str, flag: str = "--out") -> Iterator[Path]:
    """The folder ``path`` for a command's output files, checked before anything is written: a file there, a file
    above it or a folder that refuses writes is one line naming ``flag``. Any write that fails inside the block is
    one line too, and a folder this call created is removed again when the block fails (nothing half-written)."""
    out = Path(path)
    if path_kind(out) not in (None, "dir"):
        raise StorageError(f"{flag}: {path} is a file, not a folder")
    created = [p for p in (out, *out.parents) if path_kind(p) is None]
    above = out.parents[len(created) - 1] if created else out  # the nearest folder that exists
    if created and path_kind(above) != "dir":
        raise StorageError(f"{flag}: {path} is inside {above}, which is not a folder")
    _check_writable(above, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield out
    except OSError as e:
        _remove(created)
        where = e.filename or out
        raise StorageError(f"{flag}: cannot write {where} ({e.strerror or type(e).__name__})") from None
    except BaseException:
        _remove(created)
        raise


def check_output_file(path: str, flag: str) -> None:
    """A file a command will write when it ends (``--summary-json``), checked before it starts: a folder there, a
    file above it or a folder that refuses writes is one line now, not a traceback after the training."""
    out = Path(path)
    if path_kind(out) == "dir":
        raise StorageError(f"{flag}: {path} is a folder; give a file path")
    above = next(p for p in out.parents if path_kind(p) is not None)
    if path_kind(above) != "dir":
        raise StorageError(f"{flag}: {path} is inside {above}, which is not a folder")
    _check_writable(above, flag)


def _check_writable(folder: Path, flag: str) -> None:
    """One line naming ``flag`` when ``folder`` refuses a new file (read-only, no permission)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gdnsq-probe-"):
            pass
    except OSError as e:
        raise StorageError(f"{flag}: cannot write into {folder} ({e.strerror or type(e).__name__})") from None


def _remove(created: list[Path]) -> None:
    if created:
        shutil.rmtree(created[-1], ignore_errors=True)  # the outermost folder this call made
