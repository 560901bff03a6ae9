"""Run a job where the config says: through Ray Train (default) or in-process (``ray.enabled: false``).

:func:`preflight` runs first on both paths (and on a sweep's base job): bad input fails in one line
before any data is loaded, Ray starts or the FP teacher trains.
"""
from __future__ import annotations

from pathlib import Path

from ..config import JobConfig
from .storage import storage_root


def run_local(cfg: JobConfig) -> dict:
    """In-process run, no Ray: checkpoints to runs/<name>/checkpoint.pt, resumed if present."""
    from ..training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
    from ..training.job import run_job
    from ..training.runtime import resolve_device
    from . import console

    ckpt_path = Path(storage_root(cfg)) / cfg.name / CHECKPOINT_FILE
    console.header(cfg, devices=f"in-process (no Ray), {resolve_device(cfg.train.device)}")
    resume = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    progress = console.Progress(cfg)

    def on_epoch(metrics, table, get_checkpoint):
        progress.epoch_end(metrics)
        save_checkpoint(get_checkpoint(), ckpt_path)

    summary = run_job(cfg, resume=resume, on_epoch=on_epoch, on_step=progress.step,
                      on_epoch_start=progress.epoch_start)
    return {**summary, "checkpoint": str(ckpt_path)}


def check_structure(cfg: JobConfig) -> None:
    """Build the quantized structure on the meta device (no memory, no weights: well under a second for
    a ResNet). That runs model creation, the surgery rules and every layer's quantizer factory, so an
    unknown ``model.name`` or ``quant.method``, a zoo method's bit constraints (bnnpp is W1A1 only, codeq
    needs >= 2 weight bits), unknown ``quant.method_args`` keys and rules that match no layer fail here,
    with the one-line message they would give once training starts. Class count and input channels do
    not change which layers are quantized or how, so the dataset's are not needed.
    """
    import torch

    from ..training.surgery import build_student

    with torch.device("meta"):
        build_student(cfg, num_classes=10, in_chans=3)


def preflight(cfg: JobConfig) -> None:
    """Checks that need no data loading or Ray, so bad input fails in one line before anything starts."""
    from ..errors import ConfigError

    check_structure(cfg)
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
