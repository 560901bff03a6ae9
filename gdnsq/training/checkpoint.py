"""The run checkpoint: one schema, written by the job, read by resume, export and registration.

A checkpoint is a plain dict of tensors and Python values (loadable with ``weights_only=True``)::

    config     the JobConfig as a dict (the run can be rebuilt from the file alone)
    teacher    the frozen FP teacher's state dict
    engine     Engine.state_dict(): student, optimizer, schedule, objective, epoch, RNG
    best       {"ns_top1", "val_top1", "epoch", "state"}: the best converged student (state None if none)
    fp_val     the teacher's validation metrics
    teacher_report  how the teacher was obtained: {"source", and for one trained in-run "epochs",
               "val_top1", "plateaued"}
    stale      epochs without a better ns_top1 (early stopping)
    io         (launchers) {"input_shape": [C, H, W], "num_classes": N}, when known
    mlflow_run_id, tracker   (Ray launcher) the MLflow run to reattach to

Everything that reads one goes through this module, so the schema has one owner.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..config import JobConfig, config_from_dict
from ..errors import ExportError

CHECKPOINT_FILE = "checkpoint.pt"


def make_checkpoint(cfg_dict: dict, teacher: nn.Module, engine_state: dict, best: dict, fp_val: dict,
                    stale: int, teacher_report: dict | None = None) -> dict:
    return {"config": cfg_dict, "teacher": teacher.state_dict(), "engine": engine_state, "best": best,
            "fp_val": fp_val, "stale": stale, "teacher_report": dict(teacher_report or {})}


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write through a temporary file and a rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict, without unpickling code (``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> dict:
    """:func:`load_checkpoint` for files from outside: anything unreadable or not ours is one ExportError line."""
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        raise ExportError(f"{path}: not a readable gdnsq checkpoint ({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)
            and isinstance(ckpt.get("engine"), dict) and isinstance(ckpt["engine"].get("model"), dict)):
        raise ExportError(f"{path}: not a gdnsq checkpoint (needs 'config' and 'engine' -> 'model')")
    return ckpt


def structure_config(data: dict) -> JobConfig:
    """The JobConfig of a stored run, for rebuilding its structure only.

    The stored weights replace every FP weight, so the FP checkpoint (maybe absent on this machine) and
    pretrained downloads are dropped.
    """
    data = copy.deepcopy(data)
    data.setdefault("model", {}).update(checkpoint=None, pretrained=False)
    return config_from_dict(data)


def best_or_last(ckpt: dict) -> tuple[dict, str]:
    """The best converged student state if the run had one, else the last one; and which it is."""
    best = ckpt.get("best") if isinstance(ckpt.get("best"), dict) else {}
    if best.get("state"):
        return best["state"], "best"
    return ckpt["engine"]["model"], "last"


def infer_classes_and_chans(cfg: JobConfig, state: dict) -> tuple[int, int]:
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


def student_from_checkpoint(ckpt: dict, *, source: str = "checkpoint") -> tuple[nn.Module, JobConfig, str]:
    """(student with its best-or-last state, in eval mode; the run's JobConfig; "best" or "last").

    The class count and input channels come from the launcher's ``io`` record, else from the weights.
    """
    from .surgery import build_student

    cfg = structure_config(ckpt["config"])
    state, which = best_or_last(ckpt)
    io = ckpt.get("io") or {}
    if io.get("num_classes") and io.get("input_shape"):
        num_classes, in_chans = int(io["num_classes"]), int(io["input_shape"][0])
    else:
        num_classes, in_chans = infer_classes_and_chans(cfg, state)
    model = build_student(cfg, num_classes, in_chans)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ExportError(f"{source}: student state does not fit {cfg.model.name} "
                          f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from None
    return model.eval(), cfg, which
