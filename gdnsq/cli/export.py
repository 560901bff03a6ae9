"""``gdnsq export``: a trained student -> packed integer file (+ ONNX) and its size / BOPs report.

The source is a gdnsq checkpoint file (``runs/<name>/checkpoint.pt`` in-process, ``runs/<name>/checkpoint_<time>/
checkpoint.pt`` on Ray: the job config, the engine's student state and the best converged state), a run's folder
(its latest checkpoint), a folder written by ``gdnsq models pull``, or a registry
reference ``NAME@ALIAS`` / ``NAME/VERSION``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import IMG_SIZE_LIMIT
from ..errors import ConfigError

EXAMPLES = """examples:
  gdnsq export runs/gdnsq_smallcnn-w2a2-53cf9b80 --out out/export --onnx   # a run's folder: its latest checkpoint
  gdnsq export runs/gdnsq_smallcnn-w2a2-53cf9b80/checkpoint_2026-01-05_10-42-07.123456/checkpoint.pt --out out/x
  gdnsq export runs/gdnsq_smallcnn-w2a2-53cf9b80 --out out/deploy --onnx --onnx-target int8   # quant.integer_grid
  gdnsq export runs/resnet18-w2a2-1a2b3c4d --out out/fast --onnx --onnx-target int8 --onnx-requantize
  gdnsq export gdnsq_smallcnn-w2a2@champion --out out/export
  gdnsq export resnet18-w2a2/latest --out out/export --tracking-uri http://localhost:5000"""


def register(subparsers, formatter) -> None:
    from .models import add_tracking_uri

    p = subparsers.add_parser(
        "export",
        help="write a trained student as a packed integer file (and ONNX)",
        description="Packed file (model.gdnsq), optional ONNX with QDQ nodes (model.onnx) "
        "and report.json (size and BOPs per layer) in --out.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    p.add_argument(
        "source",
        metavar="CHECKPOINT_OR_REF",
        help="gdnsq checkpoint file, a run's folder (runs/NAME), a folder from 'gdnsq models pull', or a registry "
        "reference NAME@ALIAS / NAME/VERSION / NAME/latest",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (checked with onnxruntime)")
    p.add_argument(
        "--onnx-target",
        choices=("qdq", "int8", "tensorrt"),
        default="qdq",
        help="qdq: exact fake-quant QDQ (float offsets, float convs); int8: integer convs on onnxruntime / OpenVINO "
        "(needs a model trained with quant.integer_grid); tensorrt: int8 QDQ, zero point 0, DQ feeding every conv",
    )
    p.add_argument(
        "--onnx-requantize",
        action="store_true",
        help="int8 target: 8-bit grids, calibrated on 512 training images, for the tensors the model leaves in float "
        "(residual sums, convs that reach no quantizer, FP convs), so that onnxruntime runs every conv as QLinearConv; "
        "faster, no longer the fake-quant eval (bundled data only from the CLI)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="store FP tensors (FP layers, BN, biases) in float16: smaller, no longer bit-exact",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="square input side for BOPs and ONNX (default: 28 for bundled data, else data.img_size)",
    )
    p.add_argument("--batch", type=int, default=2, help="batch of the random example input (ONNX check)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (>= 21 for codes wider than 8 bits)")
    add_tracking_uri(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args, extra) -> int:
    import torch

    from ..export.sources import load_student
    from .args import writing_into

    for flag, value, top in (("--input-size", args.input_size, IMG_SIZE_LIMIT), ("--batch", args.batch, 1024)):
        if value is not None and not 1 <= value <= top:
            raise ConfigError(f"{flag}: must be in [1, {top}], got {value}")
    if args.onnx_requantize and not (args.onnx and args.onnx_target == "int8"):
        raise ConfigError("--onnx-requantize: an option of --onnx --onnx-target int8")
    model, recipe, cfg, meta = load_student(args.source, tracking_uri=args.tracking_uri)
    calibration = None
    if args.onnx_requantize:
        if cfg.data.kind != "bundled":
            raise ConfigError(
                "--onnx-requantize calibrates on the run's training images, which the CLI reads for bundled data only; "
                "call gdnsq.export.export_onnx(..., requantize=True, calibration=batches) with your own batches"
            )
        from ..data.bundled import load_bundled

        images = load_bundled().train.tensors[0][:512]
        calibration = list(images.split(128))
    size = args.input_size or (28 if cfg.data.kind == "bundled" else cfg.data.img_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, recipe["in_chans"], size, size, generator=gen)

    with writing_into(args.out) as out:  # checked before the first byte; a failed export leaves no new folder
        _write(args, out, model, recipe, meta, x, calibration)
    return 0


def _write(args, out: Path, model, recipe: dict, meta: dict, x, calibration) -> None:
    from ..export import export_onnx, export_packed, format_report

    packed = export_packed(
        model,
        out / "model.gdnsq",
        fp_dtype="float16" if args.fp16 else "float32",
        example_input=x,
        meta=meta,
        recipe=recipe,
    )
    print(format_report(packed))
    print(f"wrote {packed['path']}  sha256 {packed['sha256']}")
    report = {"packed": packed}
    if args.onnx:
        onnx = export_onnx(
            model, out / "model.onnx", x, opset=args.opset, target=args.onnx_target,
            requantize=args.onnx_requantize, calibration=calibration,
        )  # fmt: skip
        report["onnx"] = {k: v for k, v in onnx.items() if k != "layers"}
        ok = onnx["max_abs_diff"] <= 1e-4 and onnx["top1_agree"]
        if onnx.get("requantized"):
            print(
                f"requantized {len(onnx['requantized'])} float tensors to 8-bit grids (report.json: onnx.requantized): "
                "the file is no longer the fake-quant eval; measure its top-1 with gdnsq.export.runtime_accuracy"
            )
        print(
            f"wrote {onnx['path']}  ({onnx['bytes_file']:,} B, opset {args.opset}, target {args.onnx_target}); "
            "onnxruntime vs fake-quant "
            f"eval: max |diff| {onnx['max_abs_diff']:.3g}, top-1 {'agrees' if onnx['top1_agree'] else 'DIFFERS'}"
            + (
                ""
                if ok or onnx.get("requantized")
                else "  (codes at a rounding boundary flip under float noise; see gdnsq.export docs)"
            )
        )
    (out / "report.json").write_text(json.dumps(report, indent=1))
