"""``gdnsq submit`` and ``gdnsq jobs``: run job files on a Ray cluster through its job server.

The logic is in :mod:`gdnsq.launch.submit` (building a submission) and :mod:`gdnsq.launch.job_server` (the
client, and how the cluster token reaches this machine).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import parse_cli_overrides

ADDRESS_HELP = (
    "job server address, HEAD:8265 or http(s)://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)"
)
TOKEN_HELP = (
    "Token auth: the cluster token is read from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH or "
    "~/.ray/auth_token (get it on the head with 'ray get-auth-token')."
)


SUBMIT_EXAMPLES = """examples:
  gdnsq submit jobs/imagenet_resnet18_w2a2.yaml --address HEAD:8265      # waits, streams the logs
  RAY_ADDRESS=http://127.0.0.1:8265 gdnsq submit -c jobs/cpu_smallcnn_w2a2.yaml --no-wait --train.epochs 2
  gdnsq submit jobs/imagenet_resnet18_w2a2.yaml --runtime-env env.yaml --name r18-w2a2-try2"""
JOBS_EXAMPLES = """examples:
  gdnsq jobs list --address HEAD:8265
  gdnsq jobs logs gdnsq-quickstart-1a2b3c4d --follow"""


def register(subparsers, formatter) -> None:
    s = subparsers.add_parser(
        "submit",
        help="validate a job file here, then run it on a Ray cluster (like ray job submit)",
        description="Validates JOB (with any --section.key value overrides) locally, uploads its folder as "
        "the job's working_dir and runs 'gdnsq train JOB' there ('gdnsq sweep' for sweep files) "
        "with the cluster's installed gdnsq. As 'ray job submit' does, it then waits and streams "
        "the job's logs (Ctrl-C leaves the job running), exiting 0 only if the job succeeded; "
        "--no-wait prints the submission id and returns.",
        usage="gdnsq submit [JOB.yaml | -c JOB.yaml] [--address HEAD:8265] [--no-wait] [--runtime-env FILE] "
        "[--working-dir DIR] [--section.key value ...]",
        epilog=TOKEN_HELP + " A run with an existing name and storage path resumes: use --name for a fresh one."
        "\n\n" + SUBMIT_EXAMPLES,
        formatter_class=formatter,
    )
    # The job file is the first bare word (as for train): a positional would swallow an override's value.
    s.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="JOB.yaml",
        help="job YAML (or sweep YAML with a sweep: section); or give it as the first word",
    )
    s.add_argument("--address", default=None, help=ADDRESS_HELP)
    s.add_argument("--name", default=None, help="run name (overrides the job's name:)")
    s.add_argument("--submission-id", default=None, help="Ray submission id (default: gdnsq-<name>-<random>)")
    s.add_argument("--working-dir", default=None, help="folder to upload (default: the job file's folder)")
    s.add_argument(
        "--runtime-env",
        default=None,
        metavar="FILE",
        help="YAML runtime env merged over gdnsq's (env_vars, pip, ...), as in ray job submit",
    )
    s.add_argument("--runtime-env-json", default=None, metavar="JSON", help="the same, inline JSON")
    s.add_argument(
        "--ship-code",
        action="store_true",
        help="run this machine's gdnsq package (uploaded as py_modules) instead of the cluster's",
    )
    s.add_argument("--no-wait", action="store_true", help="print the submission id and return; do not stream logs")
    s.add_argument("--follow", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    s.add_argument("--dry-run", action="store_true", help="validate and print the submission as JSON; submit nothing")
    s.set_defaults(func=cmd_submit, takes_overrides=True)

    j = subparsers.add_parser(
        "jobs",
        help="list, inspect, follow or stop submitted jobs",
        description="Jobs on a Ray cluster's job server.",
        epilog=TOKEN_HELP + "\n\n" + JOBS_EXAMPLES,
        formatter_class=formatter,
    )
    jsub = j.add_subparsers(dest="action", required=True)
    jl = jsub.add_parser(
        "list",
        help="every job on the cluster, oldest first",
        description="Every job, oldest first.",
        epilog="example:\n  gdnsq jobs list --address HEAD:8265",
        formatter_class=formatter,
    )
    js = jsub.add_parser(
        "status",
        help="status of one job",
        description="One job's status and message.",
        epilog="example:\n  gdnsq jobs status ID",
        formatter_class=formatter,
    )
    jg = jsub.add_parser(
        "logs",
        help="a job's driver logs",
        description="A job's driver logs (all so far, or streamed until it ends with --follow).",
        epilog="example:\n  gdnsq jobs logs ID --follow",
        formatter_class=formatter,
    )
    jg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    jt = jsub.add_parser(
        "stop",
        help="stop a running job",
        description="Asks the job server to stop a job.",
        epilog="example:\n  gdnsq jobs stop ID",
        formatter_class=formatter,
    )
    for sp in (jl, js, jg, jt):
        sp.add_argument("--address", default=None, help=ADDRESS_HELP)
        sp.set_defaults(func=cmd_jobs)
    for sp in (js, jg, jt):
        sp.add_argument("submission_id", metavar="ID")


def _fail(e: Exception) -> int:
    print(f"gdnsq: error: {e}", file=sys.stderr)
    return 2


def cmd_submit(args, extra) -> int:
    from ..errors import ClusterError, ConfigError
    from ..launch import job_server as js
    from ..launch import submit as sm
    from .args import job_path

    job = job_path(args.config, extra)
    if job is None:
        raise ConfigError("config: no job file given (gdnsq submit JOB.yaml or -c JOB.yaml)")
    sub = sm.build_submission(
        job,
        parse_cli_overrides(extra),
        name=args.name,
        submission_id=args.submission_id,
        working_dir=args.working_dir,
        ship_code=args.ship_code,
        runtime_env=sm.read_runtime_env(args.runtime_env, args.runtime_env_json),
    )
    for w in sub.warnings:
        print(f"gdnsq: warning: {w}", file=sys.stderr)
    if args.dry_run:
        print(json.dumps({k: v for k, v in vars(sub).items() if k != "warnings"}, indent=2))
        return 0
    try:
        submission_id = js.submit(sub, args.address)
        print(submission_id, flush=True)
        if args.no_wait:
            print(f"gdnsq: submitted; follow with: gdnsq jobs logs {submission_id} --follow", file=sys.stderr)
            return 0
        print(f"gdnsq: streaming the logs of {submission_id} (Ctrl-C stops watching, not the job)", file=sys.stderr)
        try:
            status = js.follow_logs(args.address, submission_id, sys.stdout)
        except KeyboardInterrupt:
            print(f"\ngdnsq: still running; stop with: gdnsq jobs stop {submission_id}", file=sys.stderr)
            return 130
    except ClusterError as e:
        return _fail(e)
    print(f"gdnsq: job {submission_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args, extra) -> int:
    from ..errors import ClusterError
    from ..launch import job_server as js

    try:
        if args.action == "list":
            for row in js.list_jobs(args.address):
                print(f"{row['submission_id']:<36} {row['status']:<10} {row['name'] or row['entrypoint']}")
        elif args.action == "status":
            info = js.job_info(args.address, args.submission_id)
            print(info["status"] + (f"  {info['message']}" if info["message"] else ""))
        elif args.action == "logs":
            if args.follow:
                status = js.follow_logs(args.address, args.submission_id, sys.stdout)
                print(f"gdnsq: job {args.submission_id} {status}", file=sys.stderr)
            else:
                sys.stdout.write(js.job_logs(args.address, args.submission_id))
        else:
            stopped = js.stop_job(args.address, args.submission_id)
            print(f"{args.submission_id}: {'stop requested' if stopped else 'already ended'}")
    except ClusterError as e:
        return _fail(e)
    return 0
