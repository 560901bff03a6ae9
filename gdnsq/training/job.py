"""One GDNSQ job from config to summary: data -> FP teacher -> surgery + calibration -> engine epochs.

The same function runs in-process (``gdnsq quickstart --no-ray``) and inside every Ray Train worker;
the caller injects what differs: rank/world size, device, an ``on_epoch`` hook (Ray report +
checkpoint, or a local checkpoint file) and the state to resume from.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..config import JobConfig, to_dict
from ..data.loaders import Loaders, create_loaders
from .bits import average_bits, bits_table, size_figures
from .checkpoint import make_checkpoint
from .engine import Engine, create_plan, planned_steps
from .evaluation import evaluate, reestimate_batchnorm
from .models import create_model, has_fp_weights
from .objective import ns_top1
from .precision import Precision, maybe_compile
from .runtime import broadcast_module, resolve_device, seed_everything
from .surgery import broadcast_quantizer_state, calibrate_model, quantize_model
from .teacher import train_fp

log = logging.getLogger("gdnsq")

# Below this validation top-1 (%) an in-run FP teacher is reported as weak (a warning naming the fix).
WEAK_TEACHER_TOP1 = 60.0


def _take(loader, n: int, device) -> list[torch.Tensor]:
    out = []
    for x, _ in loader:
        out.append(x.to(device).clone())  # FFCV reuses its batch buffers
        if len(out) >= n:
            break
    return out


def prepare_teacher(
    cfg: JobConfig, loaders: Loaders, device: torch.device, resume: dict | None, precision: Precision | None = None
) -> tuple[nn.Module, dict]:
    """The frozen FP teacher and a report of how it was obtained (trained in-run: epochs, val top-1)."""
    teacher = create_model(
        cfg.model, num_classes=loaders.num_classes, in_chans=loaders.in_chans, load_weights=resume is None
    ).to(device)
    report: dict = {
        "source": "checkpoint" if cfg.model.checkpoint else "pretrained" if cfg.model.pretrained else "trained-in-run"
    }
    if resume is not None:
        teacher.load_state_dict(resume["teacher"])
        report.update(resume.get("teacher_report", {}))
    elif not has_fp_weights(cfg.model):
        epochs = cfg.train.teacher_epochs
        log.info(
            "no FP weights given: training the FP teacher %s",
            f"for {epochs} epochs"
            if epochs
            else f"to a validation plateau (at most {cfg.train.teacher_max_epochs} epochs)",
        )
        seed_everything(cfg.train.seed)
        report.update(
            train_fp(
                teacher,
                loaders.calib,
                epochs,
                device=device,
                log=log.info,
                val_loader=loaders.val,
                max_epochs=cfg.train.teacher_max_epochs,
                precision=precision,
            )
        )
        broadcast_module(teacher)  # every rank distils from the same teacher
        if report["rule"] == "plateau" and not report["plateaued"]:
            log.warning(
                "the FP teacher was still improving when it hit train.teacher_max_epochs=%d: raise "
                "train.teacher_max_epochs or pass model.checkpoint / model.pretrained",
                cfg.train.teacher_max_epochs,
            )
    return teacher.eval().requires_grad_(False), report


def prepare_student(
    cfg: JobConfig, teacher: nn.Module, loaders: Loaders, device: torch.device, resume: dict | None
) -> tuple[nn.Module, list, dict]:
    """The quantized, calibrated student (or the resumed one), surgery's decisions, and the run's ``io``:
    {input_shape: [C, H, W], num_classes}, what registration and export need to rebuild the student without the
    data (read off the calibration batches, as the student sees its input in training)."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    decisions = quantize_model(student, cfg.quant)
    student.to(device)
    if resume is not None:
        student.load_state_dict(resume["engine"]["model"])
        # Every checkpoint since the executors recorded io has it; an older one gets it from one batch.
        io = resume.get("io") or _describe_io(_take(loaders.calib, 1, device), loaders.num_classes)
        return student.train(), decisions, dict(io)
    # A planned schedule may start a short budget below quant.init_bits (schedules.plan_descent).
    plan = create_plan(cfg, student, planned_steps(cfg, loaders.train, cfg.train.max_steps_per_epoch))
    batches = _take(loaders.calib, cfg.quant.calib_batches, device)
    calibrate_model(student, batches, plan.init_bits)
    broadcast_quantizer_state(student)  # calibration before DDP: rank 0's result everywhere
    return student.train(), decisions, _describe_io(batches, loaders.num_classes)


def _describe_io(batches: list[torch.Tensor], num_classes: int) -> dict:
    return {"input_shape": list(batches[0].shape[1:]), "num_classes": int(num_classes)}


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


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


def epoch_metrics(engine: Engine, loaders: Loaders, device) -> tuple[dict, list[dict]]:
    n = engine.cfg.train.bn_reestimate_batches
    if n:
        reestimate_batchnorm(engine.core, _take(loaders.calib, n, device), engine.precision)
    val = evaluate(engine.model, loaders.val, device, engine.precision)
    conv = engine.is_converged()
    table = bits_table(engine.core)
    avg_w, avg_a = average_bits(table)
    metrics = {
        "val/top1": val["top1"],
        "val/top5": val["top5"],
        "val/loss": val["loss"],
        "val/converged": float(conv),
        "val/ns_top1": ns_top1(val["top1"], conv),
        "bits/avg_w": avg_w,
        "bits/avg_a": avg_a,
    }
    return metrics, table


def run_job(
    cfg: JobConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resume: dict | None = None,
    wrap_ddp: Callable[[nn.Module], nn.Module] | None = None,
    on_epoch: Callable[[dict, list[dict], Callable[[], dict]], None] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_epoch_start: Callable[[int, int | None], None] | None = None,
) -> dict:
    """Run (or resume) a job; returns the summary. ``on_epoch(metrics, bits_table, get_checkpoint)``;
    ``on_step(global_step, loss_parts)`` after every optimizer step (progress, fault injection);
    ``on_epoch_start(epoch, steps)`` before each epoch (``steps``: the loader's length, None if unknown)."""
    device = device or resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed + rank)
    start_epoch = 0 if resume is None else resume["engine"]["epoch"]
    loaders = create_loaders(cfg, rank=rank, world_size=world_size, device=device, epoch=start_epoch)
    precision = Precision.create(cfg.train, device)
    teacher, teacher_report = prepare_teacher(cfg, loaders, device, resume, precision)
    precision.prepare_module(teacher)
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
    student, decisions, io = prepare_student(cfg, teacher, loaders, device, resume)
    precision.prepare_module(student)  # before DDP, whose gradient buckets follow the parameters' strides
    model = maybe_compile(wrap_ddp(student) if wrap_ddp else student, cfg.train)
    engine = Engine(cfg, model, teacher, device, precision)
    best = {"ns_top1": -1.0, "val_top1": -1.0, "epoch": -1, "state": None}
    if resume is not None:
        engine.load_state_dict(resume["engine"])
        best = resume["best"]
    stale = 0 if resume is None else resume.get("stale", 0)

    def checkpoint() -> dict:
        return make_checkpoint(to_dict(cfg), teacher, engine.state_dict(), best, fp_val, stale, teacher_report, io=io)

    for epoch in range(start_epoch, cfg.train.epochs):
        loaders.set_epoch(epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch, _length(loaders.train))
        train_m = engine.train_epoch(loaders.train, max_steps=cfg.train.max_steps_per_epoch, on_step=on_step)
        metrics, table = epoch_metrics(engine, loaders, device)
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

    summary = finalize(cfg, engine, teacher, loaders, device, best, fp_val, decisions)
    summary["teacher"] = teacher_report
    summary["skipped_images"] = len(_all_ranks(loaders.bad_files()))
    return summary


def _all_ranks(files: set[str]) -> set[str]:
    """The union of ``files`` over the DDP ranks (each rank reads its own shard), or ``files`` alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return files
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(files))
    return set().union(*map(set, gathered))


def finalize(
    cfg: JobConfig, engine: Engine, teacher: nn.Module, loaders: Loaders, device, best: dict, fp_val: dict, decisions
) -> dict:
    """Restore the best converged state (selected on validation) and report on the held-out test split."""
    if best["state"] is not None:
        engine.core.load_state_dict(best["state"])
    eval_loader = loaders.test if loaders.test is not None else loaders.val
    split = "test" if loaders.test is not None else "val"
    fp = evaluate(teacher, eval_loader, device, engine.precision)
    q = evaluate(engine.core, eval_loader, device, engine.precision)
    conv = engine.is_converged()
    table = bits_table(engine.core)
    avg_w, avg_a = average_bits(table)
    sizes = size_figures(engine.core, _take(eval_loader, 1, device)[0][:1])
    return {
        "model": cfg.model.name,
        "split": split,
        "fp_top1": round(fp["top1"], 2),
        "top1": round(q["top1"], 2),
        "top5": round(q["top5"], 2),
        "fp_val_top1": round(fp_val["top1"], 2),
        "val_top1": round(best["val_top1"], 2),
        "target_w": cfg.quant.target_w,
        "target_a": cfg.quant.target_a,
        "avg_bits_w": round(avg_w, 3),
        "avg_bits_a": round(avg_a, 3),
        "converged": bool(conv),
        "ns_top1": round(ns_top1(q["top1"], conv), 2),
        **sizes,  # bytes_payload, macs, bops: a sweep's front reads them
        "best_epoch": best["epoch"],
        "epochs_run": engine.epoch,
        "steps": engine.sched.step,
        "descent_end_step": engine.sched.converged_step,  # first step whose true-bit check passed
        "protocol": {
            "method": cfg.quant.method,
            "per_channel": cfg.quant.per_channel,
            "estimator": cfg.quant.estimator,
            "batchnorm": cfg.quant.batchnorm,
            "fp_layers": [d.name for d in decisions if not d.quantized],
            "fp_checkpoint": cfg.model.checkpoint or ("timm-pretrained" if cfg.model.pretrained else "trained-in-run"),
        },
        "layers": table,
    }
