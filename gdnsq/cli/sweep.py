"""``gdnsq sweep SWEEP.yaml [--resume] [--summary-json P] [--section.key value ...]``: a Ray Tune sweep.

Overrides name base-job settings (``--train.epochs 4``) or sweep settings (``--sweep.max_concurrent_trials 1``).
A bad sweep file exits with status 2 before anything starts; a sweep with failed trials exits 1.
"""

from __future__ import annotations


def cmd_sweep(args, extra) -> int:
    from ..config import parse_cli_overrides
    from ..launch.storage import write_json_atomic
    from ..launch.sweep.report import format_table
    from ..launch.sweep.tune import run_sweep
    from .args import check_output_file, job_path

    path = job_path(args.config, extra)
    if path is None:
        from ..errors import SweepError

        raise SweepError("config: no sweep file given (gdnsq sweep SWEEP.yaml or -c SWEEP.yaml)")
    if args.summary_json:
        check_output_file(args.summary_json, "--summary-json")
    summary = run_sweep(path, parse_cli_overrides(extra), resume=args.resume)
    print()
    print(format_table(summary))
    for key in ("registered_model", "parent_run_id", "experiment"):
        if summary.get(key):
            print(f"  {key.replace('_', ' ')}: {summary[key]}")
    for kind, path in summary.get("files", {}).items():
        print(f"  {kind}: {path}")
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return 1 if summary["counts"]["error"] else 0


def register(subparsers, formatter) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="hyperparameter sweep: a job file plus a sweep: section (Ray Tune)",
        description="Runs a Ray Tune sweep: each trial is a Ray Train run of the base job "
        "with settings from sweep.space; the best converged trial is "
        "registered. Any setting can be overridden as --section.key value; "
        "sweep settings as --sweep.key value.",
        usage="gdnsq sweep [SWEEP.yaml | -c SWEEP.yaml] [--resume] [--summary-json P] [--section.key value ...]",
        epilog="examples:\n  gdnsq sweep jobs/imagenet_resnet18_w2a2_sweep.yaml\n"
        "  gdnsq sweep -c jobs/cpu_smallcnn_sweep.yaml --sweep.max_concurrent_trials 1",
        formatter_class=formatter,
    )
    # The sweep file is the first bare word (as for train): a positional would swallow an override's value.
    p.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="SWEEP.yaml",
        help="sweep YAML (a base job plus a sweep: section); or give it as the first word",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue a sweep whose driver stopped; finished trials are not run again"
    )
    p.add_argument("--summary-json", default=None, help="also write the sweep summary as JSON here")
    p.set_defaults(func=cmd_sweep, takes_overrides=True)
