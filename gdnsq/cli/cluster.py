"""``gdnsq submit`` and ``gdnsq jobs``: run job files on a Ray cluster through its job server.

The logic, and how the cluster token reaches this machine, is in :mod:`gdnsq.launch.submit`.
"""
from __future__ import annotations

import json
import sys

from ..config import parse_cli_overrides

ADDRESS_HELP = "job server URL, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"
TOKEN_HELP = ("Token auth: the cluster token is read from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH or "
              "~/.ray/auth_token (get it on the head with 'ray get-auth-token').")


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "submit", help="validate a job file here, then run it on a Ray cluster",
        description="Validates JOB (with any --section.key value overrides) locally, uploads its folder as "
                    "the job's working_dir and runs 'gdnsq train JOB' there ('gdnsq sweep' for sweep files) "
                    "with the cluster's installed gdnsq. Prints the submission id.",
        epilog=TOKEN_HELP + " A run with an existing name and storage path resumes: use --name for a fresh one.")
    s.add_argument("job", help="job YAML (or sweep YAML with a sweep: section)")
    s.add_argument("--address", default=None, help=ADDRESS_HELP)
    s.add_argument("--name", default=None, help="run name (overrides the job's name:)")
    s.add_argument("--submission-id", default=None, help="Ray submission id (default: gdnsq-<name>-<random>)")
    s.add_argument("--working-dir", default=None, help="folder to upload (default: the job file's folder)")
    s.add_argument("--ship-code", action="store_true",
                   help="run this machine's gdnsq package (uploaded as py_modules) instead of the cluster's")
    s.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 1 unless it succeeded")
    s.add_argument("--dry-run", action="store_true", help="validate and print the submission as JSON; submit nothing")
    s.set_defaults(func=cmd_submit)

    j = subparsers.add_parser("jobs", help="list, inspect, follow or stop submitted jobs", epilog=TOKEN_HELP)
    jsub = j.add_subparsers(dest="action", required=True)
    jl = jsub.add_parser("list", help="every job on the cluster, oldest first")
    js = jsub.add_parser("status", help="status of one job")
    jg = jsub.add_parser("logs", help="a job's driver logs")
    jg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    jt = jsub.add_parser("stop", help="stop a running job")
    for sp in (jl, js, jg, jt):
        sp.add_argument("--address", default=None, help=ADDRESS_HELP)
        sp.set_defaults(func=cmd_jobs)
    for sp in (js, jg, jt):
        sp.add_argument("submission_id", metavar="ID")


def _fail(e: Exception) -> int:
    print(f"gdnsq: error: {e}", file=sys.stderr)
    return 2


def cmd_submit(args, extra) -> int:
    from ..launch import submit as sm

    sub = sm.build_submission(args.job, parse_cli_overrides(extra), name=args.name,
                              submission_id=args.submission_id, working_dir=args.working_dir,
                              ship_code=args.ship_code)
    for w in sub.warnings:
        print(f"gdnsq: warning: {w}", file=sys.stderr)
    if args.dry_run:
        print(json.dumps({k: v for k, v in vars(sub).items() if k != "warnings"}, indent=2))
        return 0
    try:
        submission_id = sm.submit(sub, args.address)
        print(submission_id, flush=True)
        if not args.follow:
            print(f"gdnsq: submitted; follow with: gdnsq jobs logs {submission_id} --follow", file=sys.stderr)
            return 0
        status = sm.follow_logs(args.address, submission_id, sys.stdout)
    except sm.ClusterError as e:
        return _fail(e)
    print(f"gdnsq: job {submission_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args, extra) -> int:
    from ..launch import submit as sm

    try:
        if args.action == "list":
            for row in sm.list_jobs(args.address):
                print(f"{row['submission_id']:<36} {row['status']:<10} {row['name'] or row['entrypoint']}")
        elif args.action == "status":
            info = sm.job_info(args.address, args.submission_id)
            print(info["status"] + (f"  {info['message']}" if info["message"] else ""))
        elif args.action == "logs":
            if args.follow:
                status = sm.follow_logs(args.address, args.submission_id, sys.stdout)
                print(f"gdnsq: job {args.submission_id} {status}", file=sys.stderr)
            else:
                sys.stdout.write(sm.job_logs(args.address, args.submission_id))
        else:
            stopped = sm.stop_job(args.address, args.submission_id)
            print(f"{args.submission_id}: {'stop requested' if stopped else 'already ended'}")
    except sm.ClusterError as e:
        return _fail(e)
    return 0
