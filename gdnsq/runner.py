"""Run a job where the config says: through Ray Train (default) or in-process (``ray.enabled: false``)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .config import JobConfig


def run_local(cfg: JobConfig) -> dict:
    """In-process run, no Ray: checkpoints to runs/<name>/checkpoint.pt, resumed if present."""
    import torch

    from .pipeline import run_job

    run_dir = Path(cfg.ray.storage_path or "runs") / cfg.name
    ckpt_path = run_dir / "checkpoint.pt"
    resume = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.is_file() else None

    def on_epoch(metrics, table, get_checkpoint):
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(get_checkpoint(), tmp)
        os.replace(tmp, ckpt_path)  # never leave a half-written checkpoint

    return run_job(cfg, resume=resume, on_epoch=on_epoch)


def preflight(cfg: JobConfig) -> None:
    """Checks that need no data loading or Ray, so bad input fails in one line before anything starts."""
    import timm

    from . import models  # noqa: F401 - registers gdnsq's own timm models
    from .config import ConfigError

    if not timm.is_model(cfg.model.name):
        raise ConfigError(f"model.name: unknown timm model {cfg.model.name!r}")
    if cfg.data.kind != "bundled":
        for key in ("train_path", "val_path"):
            path = getattr(cfg.data, key)
            if "://" not in path and not Path(path).exists():
                raise ConfigError(f"data.{key}: no such file or directory {path!r}")


def run(cfg: JobConfig) -> dict:
    preflight(cfg)
    if cfg.ray.enabled:
        from .train import fit

        return fit(cfg)
    return run_local(cfg)


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
