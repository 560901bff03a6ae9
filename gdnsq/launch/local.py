"""Run a job where the config says: through Ray Train (default) or in-process (``ray.enabled: false``)."""
from __future__ import annotations

from pathlib import Path

from ..config import JobConfig
from .storage import storage_root


def run_local(cfg: JobConfig) -> dict:
    """In-process run, no Ray: checkpoints to runs/<name>/checkpoint.pt, resumed if present."""
    from ..training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
    from ..training.job import run_job

    ckpt_path = Path(storage_root(cfg)) / cfg.name / CHECKPOINT_FILE
    resume = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None

    def on_epoch(metrics, table, get_checkpoint):
        save_checkpoint(get_checkpoint(), ckpt_path)

    return run_job(cfg, resume=resume, on_epoch=on_epoch)


def preflight(cfg: JobConfig) -> None:
    """Checks that need no data loading or Ray, so bad input fails in one line before anything starts."""
    import timm

    from ..errors import ConfigError
    from ..training import models  # noqa: F401 - registers gdnsq's own timm models

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
        from .ray_train import fit

        return fit(cfg)
    return run_local(cfg)
