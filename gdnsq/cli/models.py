"""``gdnsq models list|show|pull``: the MLflow model registry, from this folder's store or any other.

The store is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``./.gdnsq/mlflow.db``; these
commands only read, so they never create a store (a missing local one is an error naming the URI).
"""

from __future__ import annotations

import json
import shlex
import sys

URI_HELP = (
    "MLflow tracking URI: http(s)://HOST:PORT for a server, sqlite:///PATH for a local store "
    "(default: $MLFLOW_TRACKING_URI, else ./.gdnsq/mlflow.db)"
)
REF_HELP = "NAME@ALIAS, NAME/VERSION, NAME/latest or NAME (latest), optionally prefixed models:/"
EXAMPLES = """examples:
  gdnsq models list
  gdnsq models show gdnsq_smallcnn-w2a2@champion
  gdnsq models pull gdnsq_smallcnn-w2a2/latest --out out/model
  MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=... \\
    gdnsq models pull resnet18-w2a2@champion --out model --tracking-uri http://localhost:5000"""


def add_tracking_uri(p) -> None:
    p.add_argument("--tracking-uri", default=None, metavar="URI", help=URI_HELP)


def register(subparsers, formatter) -> None:
    m = subparsers.add_parser(
        "models",
        help="the MLflow model registry: list, show, pull",
        description="Registered quantized students. "
        + URI_HELP.replace("MLflow tracking URI", "The store: --tracking-uri,")
        + ".",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    msub = m.add_subparsers(dest="action", required=True)
    ml = msub.add_parser(
        "list",
        help="every registered model: top-1, FP top-1, bits, packed size, aliases",
        description="One row per registered model, with its champion's (else latest "
        "version's) top-1, FP top-1, average bits and packed size.",
        epilog="examples:\n  gdnsq models list\n  gdnsq models list --tracking-uri http://localhost:5000 --json",
        formatter_class=formatter,
    )
    ml.add_argument("--json", action="store_true", help="one JSON object per model instead of the table")
    ms = msub.add_parser(
        "show",
        help="one version: tags, card and per-layer manifest (JSON)",
        description="One version's identity, aliases, tags, model card and manifest "
        "(per-layer bits, sizes, BOPs) as JSON.",
        epilog="example:\n  gdnsq models show gdnsq_smallcnn-w2a2@champion",
        formatter_class=formatter,
    )
    ms.add_argument("ref", help=REF_HELP)
    mp = msub.add_parser(
        "pull",
        help="download weights, config and manifest into a folder (loads offline)",
        description="Writes the version's weights (safetensors), config.json, manifest.json, "
        "layers.csv and source.json into --out; gdnsq.load_model(OUT) and "
        "'gdnsq export OUT' then work offline. Prints the folder.",
        epilog="example:\n  gdnsq models pull gdnsq_smallcnn-w2a2@champion --out out/model",
        formatter_class=formatter,
    )
    mp.add_argument("ref", help=REF_HELP)
    mp.add_argument("--out", required=True, help="folder to write (created)")
    mp.add_argument("--mlflow-model", action="store_true", help="also the MLflow model (pt2 graph, MLmodel)")
    mp.add_argument(
        "--max-bytes",
        type=float,
        default=None,
        help="pull the most accurate converged version of NAME whose packed file is at most this size",
    )
    mp.add_argument(
        "--max-bops", type=float, default=None, help="... whose BOPs are at most this (with --max-bytes: both)"
    )
    for sp in (ml, ms, mp):
        add_tracking_uri(sp)
        sp.set_defaults(func=cmd_models)


def _num(v, fmt: str) -> str:
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return "-"


def format_models(rows: list[dict], uri: str) -> str:
    """The registry as a table (one row per model; the champion's figures, else the latest version's)."""
    if not rows:
        return f"no registered models in {uri}"
    head = ("NAME", "VER", "TOP-1", "FP TOP-1", "BITS W/A", "TARGET", "PACKED", "ALIASES")
    body = []
    for r in rows:
        t = r.get("headline") or {}
        bits = f"{_num(t.get('avg_bits_w'), '.2f')}/{_num(t.get('avg_bits_a'), '.2f')}"
        target = f"W{t['target_w']}A{t['target_a']}" if t.get("target_w") else "-"
        packed = _num(t.get("bytes_packed"), ",.0f") + (" B" if t.get("bytes_packed") else "")
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(r["aliases"].items())) or "-"
        body.append(
            (
                r["name"],
                t.get("version") or r["latest_version"] or "-",
                _num(t.get("top1"), ".2f"),
                _num(t.get("fp_top1"), ".2f"),
                bits,
                target,
                packed,
                aliases,
            )
        )
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    right = {2, 3, 6}
    lines = [
        "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(x, widths))
        ).rstrip()
        for x in [head, *body]
    ]
    return "\n".join(lines) + (
        f"\n({len(rows)} model{'s' if len(rows) != 1 else ''} in {uri}; PACKED is the file registered with the "
        "version: its payload plus a manifest naming its source, so an export from elsewhere differs a little)"
    )


def cmd_models(args, extra) -> int:
    from ..tracking import registry
    from ..tracking.names import scrub_value
    from ..tracking.store import resolve_read_uri
    from .args import writing_into

    uri = resolve_read_uri(args.tracking_uri)
    if args.action == "list":
        rows = registry.list_models(tracking_uri=uri)
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(format_models(rows, scrub_value(uri)))
    elif args.action == "show":
        print(json.dumps(registry.show_model(args.ref, tracking_uri=uri), indent=2, default=str))
    else:
        ref = args.ref
        if args.max_bytes is not None or args.max_bops is not None:  # the most accurate version within a budget
            chosen = registry.select_by_budget(ref, max_bytes=args.max_bytes, max_bops=args.max_bops, tracking_uri=uri)
            print(f"chose {chosen['ref']}: top-1 {chosen['top1']}, {chosen['bytes_packed']} B, {chosen['bops']} BOPs")
            ref = chosen["ref"]
        with writing_into(args.out):  # checked before the download; a failed pull leaves no new folder
            out = registry.pull_model(ref, args.out, tracking_uri=uri, include_mlflow_model=args.mlflow_model)
        print(f"pulled {out['name']} version {out['version']} ({ref}) into {out['dir']}")
        print(f"  load it: {shlex.quote(sys.executable)} -c \"import gdnsq; m = gdnsq.load_model('{out['dir']}')\"")
    return 0
