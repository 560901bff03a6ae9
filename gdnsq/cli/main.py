"""The ``gdnsq`` command: subcommands that parse arguments and call the library; no logic here.

Errors in user input (config, data, model names, references) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from importlib import resources
from pathlib import Path

from ..config import JobConfig, load_config, parse_cli_overrides
from ..errors import ConfigError, GdnsqError
from . import cluster, export, sweep

EXIT_USAGE = 2


def _job_config(path: str | None, extra: list[str], **fixed) -> JobConfig:
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


def print_summary(s: dict) -> None:
    from ..training.bits import format_table

    print()
    print(f"model {s['model']}  target W{s['target_w']:g}A{s['target_a']:g}  ({s['split']} split)")
    print(f"  FP top-1         {s['fp_top1']:6.2f} %")
    print(f"  quantized top-1  {s['top1']:6.2f} %   (ns_top1 {s['ns_top1']:.2f})")
    print(f"  average bits     W {s['avg_bits_w']:.2f}   A {s['avg_bits_a']:.2f}")
    print(f"  converged        {'yes' if s['converged'] else 'NO'}")
    print(format_table(s["layers"]))
    for key in ("registered_model", "mlflow_run_id"):
        if s.get(key):
            print(f"  {key.replace('_', ' ')}: {s[key]}")


def cmd_train(args, extra) -> int:
    from ..launch.local import run
    from ..launch.storage import write_json_atomic

    if args.cmd == "quickstart":
        fixed = {}
        if args.target:
            fixed["quant.target_w"], fixed["quant.target_a"] = _parse_target(args.target)
        if args.no_ray:
            fixed["ray.enabled"] = "false"
        cfg = _job_config(str(_quickstart_config()), extra, **fixed)
    else:
        # The job file is the first bare word; argparse cannot tell it from an override's value.
        config = extra.pop(0) if extra and not extra[0].startswith("-") and "=" not in extra[0] else None
        cfg = _job_config(config, extra, **({"ray.enabled": "false"} if args.no_ray else {}))
    summary = run(cfg)
    print_summary(summary)
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return 0


def cmd_data(args, extra) -> int:
    from ..data.ffcv_io import write_imagenet

    write_imagenet(args.src, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                   compress_probability=args.compress_probability)
    return 0


def cmd_models(args, extra) -> int:
    import json

    from ..tracking import registry

    if args.action == "list":
        for row in registry.list_models():
            print(json.dumps(row))
    elif args.action == "show":
        print(json.dumps(registry.show_model(args.ref), indent=2, default=str))
    else:
        ref = args.ref
        if args.max_bytes is not None or args.max_bops is not None:  # the most accurate version within a budget
            chosen = registry.select_by_budget(ref, max_bytes=args.max_bytes, max_bops=args.max_bops)
            print(json.dumps(chosen))
            ref = chosen["ref"]
        out = registry.pull_model(ref, args.out)
        print(f"pulled {ref} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gdnsq", description="GDNSQ quantization-aware training on Ray.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quickstart", help="quantize the bundled-data CNN (trains its FP teacher first)",
                       epilog="Any setting can be overridden as --section.key value (e.g. --train.epochs 4).")
    q.add_argument("--target", default=None, help="bit target like W2A2 (default from the embedded job: W2A2)")
    t = sub.add_parser("train", help="run a job file (any setting overridable as --section.key value)",
                       usage="gdnsq train [JOB.yaml] [--summary-json P] [--no-ray] [--section.key value ...]")
    for sp in (q, t):
        sp.add_argument("--summary-json", default=None, help="write the run summary as JSON here")
        sp.add_argument("--no-ray", action="store_true", help="run in-process without Ray Train")
        sp.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="action", required=True)
    w = dsub.add_parser("write", help="ImageFolder tree (train/, val/) -> FFCV .beton files")
    w.add_argument("src")
    w.add_argument("out")
    w.add_argument("--max-resolution", type=int, default=256)
    w.add_argument("--jpeg-quality", type=int, default=90)
    w.add_argument("--compress-probability", type=float, default=0.5)
    w.set_defaults(func=cmd_data)

    m = sub.add_parser("models", help="the MLflow model registry")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list").set_defaults(func=cmd_models)
    ms = msub.add_parser("show")
    ms.add_argument("ref", help="NAME, NAME@ALIAS or NAME/VERSION")
    ms.set_defaults(func=cmd_models)
    mp = msub.add_parser("pull")
    mp.add_argument("ref")
    mp.add_argument("--out", required=True)
    mp.add_argument("--max-bytes", type=float, default=None,
                    help="pull the most accurate converged version of NAME whose packed file is at most this size")
    mp.add_argument("--max-bops", type=float, default=None, help="... whose BOPs are at most this (with --max-bytes: both)")
    mp.set_defaults(func=cmd_models)

    # The other command groups, one module each: every subcommand is visible from this table.
    for group in (cluster, sweep, export):
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if extra and args.cmd not in ("quickstart", "train", "sweep", "submit"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except (GdnsqError, FileNotFoundError) as e:  # user errors: one line; anything else keeps its traceback
        print(f"gdnsq: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
