"""``gdnsq.quantize``: a user's own ``nn.Module`` and DataLoaders to a quantized model, in one call.

The same core as a job file (``training.job.run_job``: teacher, surgery, calibration, the planned descent);
only the inputs differ: ``run_job`` builds the model and loaders from the config, this passes the user's. In this
process by default; on Ray Train (DDP) with ``ray_workers``, where each worker builds its loaders from the
``loaders`` factory it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import JobConfig, apply_overrides, config_from_dict, to_dict
from ..errors import ConfigError, DataError

log = logging.getLogger("gdnsq")

LoaderFactory = Callable[[int, int], tuple[Any, Any]]
"""(rank, world_size) -> (train, val): one worker's DataLoaders (or datasets), built on the worker."""


@dataclasses.dataclass
class Quantized:
    """What :func:`quantize` returns: the quantized student (its best converged state, eval mode) and the run's
    summary (top1, fp_top1, converged, avg_bits_w / avg_bits_a, bytes_payload, the per-layer bit table, ...)."""

    model: nn.Module
    summary: dict


def quantize(
    model: nn.Module,
    train: Any = None,
    val: Any = None,
    *,
    target: str = "W2A2",
    budget: dict | None = None,
    trained: bool = True,
    epochs: int | None = None,
    loaders: LoaderFactory | None = None,
    ray_workers: int = 0,
    settings: dict[str, Any] | None = None,
    seed: int = 0,
) -> Quantized:
    """Quantize ``model`` (an FP ``nn.Module``) with GDNSQ on the user's data; returns :class:`Quantized`.

    - ``train`` / ``val``: DataLoaders of ``(images, labels)`` batches (images float (N, C, H, W), labels integer
      (N,)) or Datasets of such pairs (batched at ``data.batch_size``); a wrong shape is a one-line DataError.
    - ``target``: ``"W<bits>A<bits>"``, every quantized layer's weight/input bits (e.g. W4A4, W2A2); or
      ``budget``: a model-wide budget, e.g. ``{"kind": "bytes", "value": 20000}`` (``quant.budget.*``).
    - ``trained``: the model's weights are trained FP weights, the teacher. False: an FP teacher is trained from
      them first, to a validation plateau.
    - ``epochs``: None plans the steps the descent needs from the loader's length.
    - ``ray_workers`` >= 1: run on Ray Train with that many DDP workers; ``loaders(rank, world_size)`` then builds
      each worker's (train, val) there (give a DistributedSampler its rank); ``train`` / ``val`` stay None.
    - ``settings``: any other job settings by dotted name, e.g. ``{"optim.lr": 1e-3, "train.device": "cpu"}``.

    A model without timm's ``pretrained_cfg`` keeps its first conv (or linear) layer and its last linear layer in
    floating point (``quant.keep_first_conv`` / ``quant.keep_classifier``), as timm models do.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if ray_workers and (loaders is None or train is not None or val is not None):
        raise ConfigError("loaders: ray_workers needs loaders=f(rank, world_size) -> (train, val), not train/val")
    if not ray_workers and loaders is not None:
        train, val = loaders(0, 1)
    if not ray_workers and (train is None or val is None):
        raise ConfigError("train, val: pass the training and validation DataLoaders (or loaders=...)")
    model = copy.deepcopy(model).cpu()  # the user's model stays as it was
    _mark_edges(model)
    make = loaders or (lambda rank, world: (train, val))
    cfg = _config(target, budget, ray_workers, settings, seed)
    probe = _probe(model, make, cfg)
    cfg = _with_epochs(cfg, epochs, probe["steps_per_epoch"])
    inputs = _Inputs(model, make, trained, probe["num_classes"])
    if ray_workers:
        summary = _on_ray(cfg, inputs)
    else:
        from ..training.job import run_job

        done: dict = {}
        summary = run_job(cfg, inputs=inputs, on_epoch=_log_epoch, on_done=lambda m: done.update(model=m))
        student = done["model"]
        return Quantized(student.eval(), summary)
    return Quantized(_student_from(summary, model, cfg).eval(), summary)


def _config(target: str, budget: dict | None, workers: int, settings: dict | None, seed: int) -> JobConfig:
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", str(target))
    if not m:
        raise ConfigError(f"target: expected W<bits>A<bits> such as W2A2, got {target!r}")
    over = {
        "name": f"quantize-{target.lower()}-{time.strftime('%Y%m%d-%H%M%S')}",
        "model.name": "user",
        "quant.target_w": int(m.group(1)),
        "quant.target_a": int(m.group(2)),
        "ray.enabled": bool(workers),
        "ray.num_workers": max(1, workers),
        "tracking.enabled": False,
        "train.seed": seed,
    }
    over |= {f"quant.budget.{k}": v for k, v in (budget or {}).items()}
    over |= dict(settings or {})
    return config_from_dict(apply_overrides(to_dict(JobConfig()), over))


def _mark_edges(model: nn.Module) -> None:
    """timm's pretrained_cfg for a model without one: the first conv/linear is the stem, the last linear the
    classifier (surgery reads it to keep both FP, as for timm models)."""
    if getattr(model, "pretrained_cfg", None):
        return
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    if layers:
        model.pretrained_cfg = {"first_conv": layers[0][0], "classifier": linears[-1] if linears else ""}


def _probe(model: nn.Module, make: LoaderFactory, cfg: JobConfig) -> dict:
    """On the caller's side, before anything trains: one batch through the model (class count from its output,
    shapes checked) and the steps per epoch of rank 0's loader."""
    from ..data.user import CheckedLoader, as_loader, first_batch

    train, _ = make(0, cfg.ray.num_workers if cfg.ray.enabled else 1)
    loader = CheckedLoader(as_loader(train, "train", batch_size=cfg.data.batch_size, train=True), "train")
    x, _ = first_batch(loader)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x[:2].float())
    except RuntimeError as e:
        raise DataError(
            f"train: the model cannot take a batch of images {tuple(x.shape)} ({str(e).splitlines()[0]})"
        ) from None
    finally:
        model.train(was_training)
    if out.dim() != 2:
        raise ConfigError(f"model: expected (N, classes) logits, got a tensor of shape {tuple(out.shape)}")
    return {"num_classes": int(out.shape[1]), "steps_per_epoch": len(loader)}


def _with_epochs(cfg: JobConfig, epochs: int | None, per_epoch: int) -> JobConfig:
    """``epochs`` (None: as many as the descent needs), under train.short_run as a job's pre-flight has it."""
    from ..training.schedules import steps_needed
    from .preflight import plan_epochs

    if epochs is None:
        epochs = max(1, math.ceil(steps_needed(cfg.schedule) / max(1, per_epoch)))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=int(epochs)))
    return plan_epochs(cfg, per_epoch, f"the train loader's {per_epoch} batches")


class _Inputs:
    """run_job's inputs factory over the user's model and loaders (picklable: Ray sends it to each worker)."""

    def __init__(self, model: nn.Module, make: LoaderFactory, trained: bool, num_classes: int):
        self.model, self.make, self.trained, self.num_classes = model, make, trained, num_classes

    def __call__(self, cfg: JobConfig, rank: int, world_size: int, device, epoch: int):
        from ..data.user import user_loaders
        from ..training.job import JobInputs

        train, val = self.make(rank, world_size)
        loaders = user_loaders(train, val, num_classes=self.num_classes, batch_size=cfg.data.batch_size)
        return JobInputs(copy.deepcopy(self.model), loaders, self.trained)


def _log_epoch(metrics: dict, table: list[dict], get_checkpoint) -> None:
    log.info(
        "epoch %d: val top-1 %.2f, W%.2f A%.2f, converged %s",
        metrics["epoch"],
        metrics["val/top1"],
        metrics["bits/avg_w"],
        metrics["bits/avg_a"],
        bool(metrics["val/converged"]),
    )


def _on_ray(cfg: JobConfig, inputs: _Inputs) -> dict:
    from .ray_train import fit

    return fit(cfg, inputs=inputs)


def _student_from(summary: dict, model: nn.Module, cfg: JobConfig) -> nn.Module:
    """The Ray run's student, rebuilt on this side: the user's model, the same surgery, the best state."""
    from ..training.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from ..training.surgery import quantize_model

    ckpt = load_checkpoint(Path(summary["checkpoint"]) / CHECKPOINT_FILE)
    student = copy.deepcopy(model)
    quantize_model(student, cfg.quant)
    state = ckpt["best"]["state"] if ckpt["best"].get("state") is not None else ckpt["engine"]["model"]
    student.load_state_dict(state)
    return student
