"""``gdnsq export``: a trained student -> packed integer file (+ ONNX) and its size / BOPs report.

The source is a gdnsq checkpoint file (``runs/<name>/checkpoint.pt``: the job config, the engine's
student state and the best converged state), a folder written by ``gdnsq models pull``, or a registry
reference ``NAME@ALIAS`` / ``NAME/VERSION``.
"""
from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import torch
from torch import nn


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a trained student as a packed integer file (and ONNX)",
                              description="Packed file (model.gdnsq), optional ONNX with QDQ nodes (model.onnx) "
                                          "and report.json (size and BOPs per layer) in --out.")
    p.add_argument("source", metavar="CHECKPOINT_OR_REF",
                   help="gdnsq checkpoint file, a folder from 'gdnsq models pull', or NAME@ALIAS / NAME/VERSION")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (checked with onnxruntime)")
    p.add_argument("--fp16", action="store_true",
                   help="store FP tensors (FP layers, BN, biases) in float16: smaller, no longer bit-exact")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input side for BOPs and ONNX (default: 28 for bundled data, else data.img_size)")
    p.add_argument("--batch", type=int, default=2, help="batch of the random example input (ONNX check)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (>= 21 for codes wider than 8 bits)")
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------- sources


def _load_checkpoint(path: Path) -> dict:
    from .export import ExportError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        raise ExportError(f"{path}: not a readable gdnsq checkpoint ({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)
            and isinstance(ckpt.get("engine"), dict) and isinstance(ckpt["engine"].get("model"), dict)):
        raise ExportError(f"{path}: not a gdnsq checkpoint (needs 'config' and 'engine' -> 'model')")
    return ckpt


def _config(data: dict):
    from .config import config_from_dict

    data = copy.deepcopy(data)
    # The FP checkpoint / pretrained weights are not needed: the student's state has every weight.
    data.setdefault("model", {}).update(checkpoint=None, pretrained=False)
    return config_from_dict(data)


def infer_classes_and_chans(cfg, state: dict) -> tuple[int, int]:
    """num_classes / in_chans from the config, else from the classifier / first conv weights in ``state``."""
    from .models import create_model

    num_classes, in_chans = cfg.model.num_classes, cfg.model.in_chans
    if num_classes and in_chans:
        return num_classes, in_chans
    with torch.device("meta"):  # only for timm's pretrained_cfg: where the edge layers are
        probe = create_model(cfg.model, num_classes=num_classes or 10, in_chans=in_chans or 3, load_weights=False)
    pcfg = getattr(probe, "pretrained_cfg", None) or {}

    def weight_of(name):
        names = [name] if isinstance(name, str) else list(name or [])
        for n in names:
            for key in (f"{n}.weight", f"{n}.fc.weight"):
                if key in state and state[key].dim() >= 2:
                    return state[key]
        return None

    weights = [v for k, v in state.items() if k.endswith(".weight") and v.dim() >= 2]
    if not num_classes:
        w = weight_of(pcfg.get("classifier"))
        num_classes = int((w if w is not None else [v for v in weights if v.dim() == 2][-1]).shape[0])
    if not in_chans:
        w = weight_of(pcfg.get("first_conv"))
        in_chans = int((w if w is not None else [v for v in weights if v.dim() == 4][0]).shape[1])
    return num_classes, in_chans


def load_checkpoint_student(path: str | Path) -> tuple[nn.Module, dict, object, dict]:
    """(student in eval mode, recipe, JobConfig, meta) from a gdnsq checkpoint; the best state if any."""
    from .export import ExportError, recipe_from_config
    from .export.recipe import plan_of
    from .surgery import build_student

    path = Path(path)
    ckpt = _load_checkpoint(path)
    cfg = _config(ckpt["config"])
    best = ckpt.get("best") if isinstance(ckpt.get("best"), dict) else {}
    state = best.get("state") or ckpt["engine"]["model"]
    num_classes, in_chans = infer_classes_and_chans(cfg, state)
    model = build_student(cfg, num_classes, in_chans)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ExportError(f"{path}: student state does not fit {cfg.model.name} "
                          f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from None
    meta = {"source": str(path), "state": "best" if best.get("state") else "last",
            **{k: best[k] for k in ("ns_top1", "val_top1", "epoch") if k in best and best.get("state")}}
    recipe = recipe_from_config(ckpt["config"], num_classes, in_chans, plan_of(model))
    recipe["config"]["model"].update(checkpoint=None, pretrained=False)
    return model.eval(), recipe, cfg, meta


def load_registry_student(ref: str) -> tuple[nn.Module, dict, object, dict]:
    """The same from a pulled registry folder or a registry reference (needs gdnsq.registry)."""
    from .export import ExportError, recipe_from_config
    from .export.recipe import plan_of

    try:
        from . import registry
    except ImportError as e:
        raise ExportError(f"{ref}: no such file, and the model registry is unavailable ({e})") from None

    def from_folder(folder: Path):
        manifest = json.loads((folder / "manifest.json").read_text())
        data = json.loads((folder / "config.json").read_text())
        model = registry.load_model(str(folder))
        recipe = recipe_from_config(data, manifest["num_classes"], manifest["in_chans"], plan_of(model))
        recipe["config"].setdefault("model", {}).update(checkpoint=None, pretrained=False)
        return model.eval(), recipe, _config(data), {"source": ref}

    try:
        if Path(ref).is_dir():
            return from_folder(Path(ref))
        with tempfile.TemporaryDirectory(prefix="gdnsq-export-") as tmp:
            registry.pull_model(ref, tmp)
            return from_folder(Path(tmp))
    except (LookupError, OSError, KeyError) as e:  # RegistryError is a LookupError: one line, exit 2
        raise ExportError(f"{ref}: {e}") from None


# ----------------------------------------------------------------------------------- command


_REF = re.compile(r"(models:/)?[A-Za-z0-9._\-]+(@[A-Za-z0-9._\-]+|/\d+)?")


def load_student(source: str) -> tuple[nn.Module, dict, object, dict]:
    """Checkpoint file, pulled registry folder, or registry reference -> (student, recipe, config, meta)."""
    from .export import ExportError

    path = Path(source)
    if path.is_file():
        return load_checkpoint_student(path)
    if path.is_dir() or (_REF.fullmatch(source) and path.suffix not in (".pt", ".pth", ".ckpt")):
        return load_registry_student(source)
    raise ExportError(f"{source}: no such checkpoint file")


def cmd_export(args, extra) -> int:
    from .export import export_onnx, export_packed, format_report

    model, recipe, cfg, meta = load_student(args.source)
    size = args.input_size or (28 if cfg.data.kind == "bundled" else cfg.data.img_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, recipe["in_chans"], size, size, generator=gen)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    packed = export_packed(model, out / "model.gdnsq", fp_dtype="float16" if args.fp16 else "float32",
                           example_input=x, meta=meta, recipe=recipe)
    print(format_report(packed))
    print(f"wrote {packed['path']}  sha256 {packed['sha256']}")
    report = {"packed": packed}
    if args.onnx:
        onnx = export_onnx(model, out / "model.onnx", x, opset=args.opset)
        report["onnx"] = {k: v for k, v in onnx.items() if k != "layers"}
        ok = onnx["max_abs_diff"] <= 1e-4 and onnx["top1_agree"]
        print(f"wrote {onnx['path']}  ({onnx['bytes_file']:,} B, opset {args.opset}); onnxruntime vs fake-quant "
              f"eval: max |diff| {onnx['max_abs_diff']:.3g}, top-1 {'agrees' if onnx['top1_agree'] else 'DIFFERS'}"
              + ("" if ok else "  (codes at a rounding boundary flip under float noise; see gdnsq.export docs)"))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0
