"""Where a student to export comes from: a gdnsq checkpoint file, a run's folder (its latest checkpoint), a folder
written by ``gdnsq models pull``, or a registry reference ``NAME@ALIAS`` / ``NAME/VERSION``; each gives (student,
recipe, config, meta)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from torch import nn

from ..errors import ExportError
from ..training.checkpoint import (
    infer_classes_and_chans,
    read_checkpoint,
    structure_config,
    student_from_checkpoint,
)
from .recipe import plan_of, recipe_from_config


def load_checkpoint_student(path: str | Path) -> tuple[nn.Module, dict, object, dict]:
    """(student in eval mode, recipe, JobConfig, meta) from a gdnsq checkpoint; the best state if any."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    model, cfg, which = student_from_checkpoint(ckpt, source=str(path))
    best = ckpt.get("best") or {}
    meta = {
        "source": str(path),
        "state": which,
        **({k: best[k] for k in ("ns_top1", "val_top1", "epoch") if k in best} if which == "best" else {}),
    }
    num_classes, in_chans = infer_classes_and_chans(cfg, model.state_dict())
    return model, recipe_from_config(ckpt["config"], num_classes, in_chans, plan_of(model)), cfg, meta


def load_registry_student(ref: str, tracking_uri: str | None = None) -> tuple[nn.Module, dict, object, dict]:
    """The same from a pulled registry folder or a registry reference."""
    from ..tracking import registry

    def from_folder(folder: Path):
        manifest = json.loads((folder / "manifest.json").read_text())
        data = json.loads((folder / "config.json").read_text())
        model = registry.load_model(str(folder))
        recipe = recipe_from_config(data, manifest["num_classes"], manifest["in_chans"], plan_of(model))
        return model.eval(), recipe, structure_config(data), {"source": ref}

    try:
        if Path(ref).is_dir():
            return from_folder(Path(ref))
        with tempfile.TemporaryDirectory(prefix="gdnsq-export-") as tmp:
            registry.pull_model(ref, tmp, tracking_uri=tracking_uri)
            return from_folder(Path(tmp))
    except (LookupError, OSError, KeyError) as e:  # RegistryError is a LookupError: one line, exit 2
        raise ExportError(f"{ref}: {e}") from None


_REF = re.compile(r"(models:/)?[A-Za-z0-9._\-]+(@[A-Za-z0-9._\-]+|/\d+|/latest)?")


def load_student(source: str, tracking_uri: str | None = None) -> tuple[nn.Module, dict, object, dict]:
    """Checkpoint file, pulled registry folder, or registry reference (in ``tracking_uri``, default
    ``$MLFLOW_TRACKING_URI`` / ./.gdnsq) -> (student, recipe, config, meta)."""
    path = Path(source)
    if path.is_file():
        return load_checkpoint_student(path)
    latest = run_checkpoint(path)
    if latest is not None:  # a run's folder: in-process runs/NAME/checkpoint.pt, Ray runs/NAME/checkpoint_N/...
        return load_checkpoint_student(latest)
    if path.is_dir() or (_REF.fullmatch(source) and path.suffix not in (".pt", ".pth", ".ckpt")):
        return load_registry_student(source, tracking_uri)
    raise ExportError(f"{source}: no such checkpoint file")


def run_checkpoint(folder: Path) -> Path | None:
    """The latest checkpoint file of a run's folder, or None where ``folder`` is no run's folder."""
    if not folder.is_dir() or (folder / "manifest.json").exists():  # a pulled registry folder
        return None
    if (folder / "checkpoint.pt").is_file():
        return folder / "checkpoint.pt"
    found = sorted(folder.glob("checkpoint_*/checkpoint.pt"))
    return found[-1] if found else None
