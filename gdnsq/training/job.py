"""One GDNSQ job from config to summary: data -> FP teacher -> surgery + calibration -> engine epochs.

The same function runs in-process (``gdnsq quickstart --no-ray``) and inside every Ray Train worker;
the caller injects what differs: rank/world size, device, an ``on_epoch`` hook (Ray report +
checkpoint, or a local checkpoint file) and the state to resume from.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import JobConfig, to_dict
from ..data.loaders import Loaders, create_loaders
from .checkpoint import make_checkpoint
from .engine import Engine
from .evaluation import epoch_metrics, evaluate, final_report
from .models import create_model, has_fp_weights
from .runtime import Precision, distribute, maybe_compile, resolve_device, seed_everything
from .schedules import planned_steps
from .surgery import prepare_student
from .teacher import prepare_teacher

log = logging.getLogger("gdnsq")

# Below this validation top-1 (%) an in-run FP teacher is reported as weak (a warning naming the fix).
WEAK_TEACHER_TOP1 = 60.0


@dataclass
class JobInputs:
    """What a job trains: the FP model (its weights are the teacher's when ``fp_weights``; otherwise an FP
    teacher is trained from them first) and one rank's loaders."""

    model: nn.Module
    loaders: Loaders
    fp_weights: bool


# (cfg, rank, world_size, device, start_epoch) -> JobInputs: one rank's model and loaders, built where it runs.
InputsFactory = Callable[[JobConfig, int, int, torch.device, int], JobInputs]


def config_inputs(cfg: JobConfig, rank: int, world_size: int, device: torch.device, epoch: int) -> JobInputs:
    """A job file's inputs: the loaders data.* names and the model model.* names (FP weights from
    model.checkpoint / model.pretrained; a resumed run's come from its checkpoint)."""
    loaders = create_loaders(cfg, rank=rank, world_size=world_size, device=device, epoch=epoch)
    model = create_model(cfg.model, num_classes=loaders.num_classes, in_chans=loaders.in_chans, load_weights=epoch == 0)
    return JobInputs(model, loaders, has_fp_weights(cfg.model))


# The metric keys every epoch reports (run_job's on_epoch metrics: validation, bits, the engine's and the
# objective's train/* means); a sweep's metric must be one of these or of the Ray launcher's additions.
# tests/launch/test_sweep_metrics.py checks this list against a real epoch's keys.
EPOCH_METRICS = (
    "epoch",
    "fp/val_top1",
    "val/top1",
    "val/top5",
    "val/loss",
    "val/converged",
    "val/ns_top1",
    "bits/avg_w",
    "bits/avg_a",
    "train/task",
    "train/penalty_w",
    "train/penalty_a",
    "train/active_w",
    "train/active_a",
    "train/loss_mean",
    "train/extra_loss",
    "train/loss",
    "train/temperature",
    "train/lr",
    "train/steps",
    "train/samples_per_s",
    "train/noise_ratio",
    "train/global_step",
    "train/lag_bits",
    "train/quant_grad_norm",
)


def run_job(
    cfg: JobConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resume: dict | None = None,
    on_epoch: Callable[[dict, list[dict], Callable[[], dict]], None] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_epoch_start: Callable[[int, int | None], None] | None = None,
    inputs: InputsFactory | None = None,
    on_done: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Run (or resume) a job; returns the summary. ``on_epoch(metrics, bits_table, get_checkpoint)``;
    ``on_step(global_step, loss_parts)`` after every optimizer step (progress, fault injection);
    ``on_epoch_start(epoch, steps)`` before each epoch (``steps``: the loader's length, None if unknown).
    ``inputs`` builds the model and loaders (default :func:`config_inputs`: from the config; the Python API
    passes the user's); ``on_done(student)`` gets the final student (its best converged state). With
    ``world_size`` > 1 the student trains in DistributedDataParallel over the process group the caller set up."""
    device = device or resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed + rank)
    precision = Precision.create(cfg.train, device)
    start_epoch = 0 if resume is None else resume["engine"]["epoch"]
    job = (inputs or config_inputs)(cfg, rank, world_size, device, start_epoch)
    loaders = precision.prepare_loaders(job.loaders)
    teacher, teacher_report = prepare_teacher(
        cfg, loaders, device, resume, precision, model=job.model, fp_weights=job.fp_weights
    )
    fp_val = resume["fp_val"] if resume else evaluate(teacher, loaders.val, device, precision)
    teacher_report["val_top1"] = round(fp_val["top1"], 2)
    if teacher_report["source"] == "trained-in-run" and fp_val["top1"] < WEAK_TEACHER_TOP1:
        log.warning(
            "weak FP teacher: %.2f %% validation top-1 (trained in-run for %s epochs); quantized accuracy "
            "is bounded by it: pass model.checkpoint or model.pretrained, or raise "
            "train.teacher_max_epochs",
            fp_val["top1"],
            teacher_report.get("epochs"),
        )
    steps = planned_steps(cfg, loaders.train, cfg.train.max_steps_per_epoch)
    student, decisions, io = prepare_student(cfg, teacher, loaders, device, resume, steps)
    precision.prepare_module(student)  # before DDP, whose gradient buckets follow the parameters' strides
    model = maybe_compile(distribute(student, world_size, device, cfg.train.sync_batchnorm), cfg.train)
    engine = Engine(cfg, model, teacher, device, precision, planned_steps=steps)
    best = {"ns_top1": -1.0, "val_top1": -1.0, "epoch": -1, "state": None}
    if resume is not None:
        engine.load_state_dict(resume["engine"])
        best = resume["best"]
    stale = 0 if resume is None else resume.get("stale", 0)

    def checkpoint() -> dict:
        return make_checkpoint(to_dict(cfg), teacher, engine.state_dict(), best, fp_val, stale, teacher_report, io=io)

    try:
        steps_per_epoch = len(loaders.train)  # what the progress bar counts down
    except TypeError:  # a loader over an iterable-style dataset has no length
        steps_per_epoch = None
    for epoch in range(start_epoch, cfg.train.epochs):
        loaders.set_epoch(epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch, steps_per_epoch)
        train_m = engine.train_epoch(loaders.train, max_steps=cfg.train.max_steps_per_epoch, on_step=on_step)
        metrics, table = epoch_metrics(engine, loaders)
        metrics.update(train_m)
        metrics.update({"epoch": epoch + 1, "fp/val_top1": fp_val["top1"]})
        improved = metrics["val/ns_top1"] > best["ns_top1"] or (
            best["ns_top1"] <= 0 and metrics["val/ns_top1"] <= 0 and epoch == cfg.train.epochs - 1
        )
        if improved:
            best = {
                "ns_top1": metrics["val/ns_top1"],
                "val_top1": metrics["val/top1"],
                "epoch": epoch + 1,
                "state": copy.deepcopy(engine.core.state_dict()),
            }
            stale = 0
        elif metrics["val/converged"]:
            stale += 1
        log.debug(
            "epoch %d/%d  val top1 %.2f  bits W%.2f A%.2f  converged %s  t %.3f",
            epoch + 1,
            cfg.train.epochs,
            metrics["val/top1"],
            metrics["bits/avg_w"],
            metrics["bits/avg_a"],
            bool(metrics["val/converged"]),
            metrics["train/temperature"],
        )
        if on_epoch is not None:
            on_epoch(metrics, table, checkpoint)
        if cfg.train.patience and stale >= cfg.train.patience:
            log.info("early stop: no better ns_top1 for %d converged epochs", stale)
            break

    if best["state"] is not None:
        engine.core.load_state_dict(best["state"])  # the best converged state, selected on validation
    summary = final_report(cfg, engine, teacher, loaders, best, fp_val, decisions)
    summary["teacher"] = teacher_report
    if on_done is not None:
        on_done(engine.core)
    return summary
