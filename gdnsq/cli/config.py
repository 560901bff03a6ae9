"""``gdnsq config show|keys``: every setting with its value, type, default and one-line doc.

The docs are the dataclass field docstrings of :mod:`gdnsq.config`, so this listing cannot drift from
the code. ``show`` prints YAML: the output is itself a valid job file.
"""

from __future__ import annotations

import dataclasses
import json

EXAMPLES = """examples:
  gdnsq config show                                   # the defaults
  gdnsq config show jobs/imagenet_resnet18_w2a2.yaml --optim.lr 1e-3
  gdnsq config show --changed -c jobs/cpu_smallcnn_w2a2.yaml
  gdnsq config keys                                   # one dotted key a line (shell completion)"""


def register(subparsers, formatter) -> None:
    c = subparsers.add_parser(
        "config",
        help="list every setting: value, type, default and doc",
        description="The job's settings, one dotted name each (the same in YAML, on "
        "the CLI, in sweeps and in MLflow params).",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    csub = c.add_subparsers(dest="action", required=True, metavar="{show,keys}")
    s = csub.add_parser(
        "show",
        help="the resolved config of a job file plus overrides, as commented YAML",
        description="Resolves JOB (or the defaults) with any --section.key value overrides and "
        "prints every setting as YAML with its type, default and doc; the output "
        "is a valid job file.",
        usage="gdnsq config show [JOB.yaml | -c JOB.yaml] [--changed] [--json] [--section.key value ...]",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    s.add_argument("-c", "--config", default=None, metavar="JOB.yaml", help="job file (or give it as the first word)")
    s.add_argument("--changed", action="store_true", help="only settings that differ from their default")
    s.add_argument("--json", action="store_true", help="one JSON object per setting instead of YAML")
    s.set_defaults(func=cmd_config, takes_overrides=True)
    k = csub.add_parser(
        "keys",
        help="every dotted setting name, one a line",
        description="Every dotted setting name, one a line, for shell completion and grep.",
        epilog="example:\n  gdnsq config keys | grep lr",
        formatter_class=formatter,
    )
    k.set_defaults(func=cmd_config)


def _plain(value):
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


def _scalar(value) -> str:
    import yaml

    if value is dataclasses.MISSING:
        return "(required)"
    value = _plain(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def format_settings(settings, *, changed_only: bool = False) -> str:
    """Settings as YAML grouped by section (nested sections indented); each line ``key: value  # type,
    default D. doc``. The listing is itself a valid job file."""
    rows, open_path = [], []
    width = max(len(s.key.rsplit(".", 1)[-1]) + len(_scalar(s.value)) for s in settings) + 6
    for s in settings:
        changed = s.value != s.default
        if changed_only and not changed:
            continue
        *parents, leaf = s.key.split(".")
        common = 0
        while common < min(len(parents), len(open_path)) and parents[common] == open_path[common]:
            common += 1
        for depth in range(common, len(parents)):  # open the sections this key is in
            rows.append(f"{'  ' * depth}{parents[depth]}:")
        open_path = parents
        text = f"{'  ' * len(parents)}{leaf}: {_scalar(s.value)}"
        default = f"default {_scalar(s.default)}" + (" (changed)" if changed else "")
        rows.append(f"{text:<{min(width, 44)}} # {s.type}, {default}. {s.doc}")
    return "\n".join(rows)


def cmd_config(args, extra) -> int:
    from ..config import describe

    if args.action == "keys":
        print("\n".join(s.key for s in describe()))
        return 0
    from .args import job_config

    cfg = job_config(args.config, extra)
    settings = describe(cfg)
    if args.json:
        for s in settings:
            if not args.changed or s.value != s.default:
                print(
                    json.dumps(
                        {
                            "key": s.key,
                            "value": _plain(s.value),
                            "type": s.type,
                            "doc": s.doc,
                            "default": None if s.default is dataclasses.MISSING else _plain(s.default),
                        }
                    )
                )
        return 0
    print(format_settings(settings, changed_only=args.changed))
    return 0
