"""The ``gdnsq`` command: the table of subcommand groups (one module each, every command visible from
:data:`COMMAND_GROUPS`), verbosity, and the one place user errors become one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import GdnsqError
from . import cluster, config, export, models, sweep, train
from .args import OneLineParser, formatter

EXIT_USAGE = 2
# Every subcommand, in the order ``gdnsq --help`` lists them: each module's ``register(subparsers, formatter)``.
COMMAND_GROUPS = (train, models, config, cluster, sweep, export)


DESCRIPTION = """GDNSQ quantization-aware training on Ray Train, tracked and served by MLflow.

Every setting has one dotted name (gdnsq config show lists them with defaults and docs) and can be
given as --section.key value after a job file."""

EXAMPLES = """examples:
  gdnsq quickstart                                  # the bundled-data CNN to W2A2 (local Ray + MLflow)
  gdnsq train -c jobs/cpu_smallcnn_w2a2.yaml --train.epochs 4
  gdnsq config show jobs/imagenet_resnet18_w2a2.yaml
  gdnsq models list --tracking-uri http://localhost:5000
  gdnsq <command> --help                            # each command's options and an example"""


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser that runs a command (the leaves of the subcommand tree), with its full name."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for child in subs[0].choices.values():
        yield from _leaf_parsers(child)


def _add_verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    # Subcommands repeat -v/-q so they work after the command too; SUPPRESS keeps the top level's value.
    default = 0 if top else argparse.SUPPRESS
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="more output: debug logs, Ray's and MLflow's own logs (-vv: everything)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default,
        help="less output: no progress, only the header, warnings and the summary",
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gdnsq", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=formatter)
    p.add_argument("--version", action=_Version, nargs=0, help="print gdnsq's and its stack's versions and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub, formatter)
    _add_verbosity(p, top=True)
    for leaf in _leaf_parsers(p):
        _add_verbosity(leaf, top=False)
    return p


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_line())
        parser.exit()


def _version_line() -> str:
    """``gdnsq X (torch A, ray B, mlflow C, timm D)`` from package metadata: nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    parts = []
    for dist in ("torch", "ray", "mlflow", "timm", "ffcv"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return f"gdnsq {__version__} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    verbosity = args.verbose - args.quiet
    from ..launch.console import setup_logging

    setup_logging(verbosity)
    args.verbosity = verbosity
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except (GdnsqError, FileNotFoundError) as e:  # user errors: one line; anything else keeps its traceback
        print(f"gdnsq: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
