"""Where a student to export comes from: a gdnsq checkpoint file, a folder written by ``gdnsq models pull``,
or a registry reference ``NAME@ALIAS`` / ``NAME/VERSION``; each gives (student, recipe, config, meta)."""
from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from .recipe import plan_of, recipe_from_config


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        raise ExportError(f"{path}: not a readable gdnsq checkpoint ({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)
            and isinstance(ckpt.get("engine"), dict) and isinstance(ckpt["engine"].get("model"), dict)):
        raise ExportError(f"{path}: not a gdnsq checkpoint (needs 'config' and 'engine' -> 'model')")
    return ckpt


def _config(data: dict):
    from ..config import config_from_dict

    data = copy.deepcopy(data)
    # The FP checkpoint / pretrained weights are not needed: the student's state has every weight.
    data.setdefault("model", {}).update(checkpoint=None, pretrained=False)
    return config_from_dict(data)


def infer_classes_and_chans(cfg, state: dict) -> tuple[int, int]:
    """num_classes / in_chans from the config, else from the classifier / first conv weights in ``state``."""
    from ..training.models import create_model

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
    from ..training.surgery import build_student

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
    """The same from a pulled registry folder or a registry reference (needs gdnsq.tracking.registry)."""
    
    try:
        from ..tracking import registry
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


_REF = re.compile(r"(models:/)?[A-Za-z0-9._\-]+(@[A-Za-z0-9._\-]+|/\d+)?")


def load_student(source: str) -> tuple[nn.Module, dict, object, dict]:
    """Checkpoint file, pulled registry folder, or registry reference -> (student, recipe, config, meta)."""
    path = Path(source)
    if path.is_file():
        return load_checkpoint_student(path)
    if path.is_dir() or (_REF.fullmatch(source) and path.suffix not in (".pt", ".pth", ".ckpt")):
        return load_registry_student(source)
    raise ExportError(f"{source}: no such checkpoint file")
