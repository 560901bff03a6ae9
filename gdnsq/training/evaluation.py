"""Measuring the student and the teacher: top-1 / top-5 / loss over a loader, BatchNorm re-estimation before it,
an epoch's validation metrics and the run's final report. Imports neither Ray nor MLflow nor FFCV."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JobConfig
from ..data.loaders import Loaders
from .bits import average_bits, bits_table, size_figures
from .objective import ns_top1
from .runtime import Precision, all_reduce_sum, broadcast_module

if TYPE_CHECKING:
    from .engine import Engine


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, precision: Precision | None = None
) -> dict[str, float]:
    """Top-1 / top-5 (%) and cross-entropy over a loader whose batches are on ``device`` in the run's memory format
    (:meth:`Precision.prepare_loaders`), in eval mode (exact integer grid), under ``precision``'s autocast (fp32 when
    None)."""
    precision = precision or Precision(device)
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in loader:
        with precision.autocast():
            logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(-1).sum())
        total += y.numel()
    model.train(was_training)
    counts = torch.tensor([correct1, correct5, total, loss_sum], dtype=torch.float64, device=device)
    all_reduce_sum(counts)  # sharded val loaders: every rank must see the same metrics (early stopping)
    correct1, correct5, total, loss_sum = counts.tolist()
    if total == 0:
        raise ValueError("evaluation loader yielded no samples")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], precision: Precision | None = None) -> None:
    """Recompute every BatchNorm's running mean and variance as plain averages over ``batches`` (input tensors on
    the model's device, in the run's memory format; each is used once, as it comes), through the eval-mode (exact
    grid, no dither) forward. Under DDP rank 0's statistics go to every rank (as calibration does), so every rank
    evaluates and checkpoints the same model.

    Why: the running averages are an EMA over the last few hundred training steps, each with other rounded
    weights and with the training forward's dither; at 1-2 bits that mix can be several points of top-1 away
    from the network actually evaluated (Nagel et al. 2022, "Overcoming oscillations in QAT")."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("BatchNorm re-estimation got no batches")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    precision = precision or Precision(next(model.parameters()).device)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for x in itertools.chain([first], batches):
            with precision.autocast():
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    for m in norms:
        broadcast_module(m)


def epoch_metrics(engine: Engine, loaders: Loaders) -> tuple[dict, list[dict]]:
    """An epoch's validation metrics (after BatchNorm re-estimation, ``train.bn_reestimate_batches``) and bits table."""
    n = engine.cfg.train.bn_reestimate_batches
    if n:
        reestimate_batchnorm(engine.core, (x for x, _ in itertools.islice(loaders.calib, n)), engine.precision)
    val = evaluate(engine.model, loaders.val, engine.device, engine.precision)
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


def final_report(
    cfg: JobConfig, engine: Engine, teacher: nn.Module, loaders: Loaders, best: dict, fp_val: dict, decisions
) -> dict:
    """The run's summary: the student as the engine holds it and the teacher on the held-out test split (the
    validation split where there is none), sizes at the true bits, and the protocol."""
    eval_loader = loaders.test if loaders.test is not None else loaders.val
    split = "test" if loaders.test is not None else "val"
    fp = evaluate(teacher, eval_loader, engine.device, engine.precision)
    q = evaluate(engine.core, eval_loader, engine.device, engine.precision)
    conv = engine.is_converged()
    table = bits_table(engine.core)
    avg_w, avg_a = average_bits(table)
    x, _ = next(iter(eval_loader))
    sizes = size_figures(engine.core, x[:1])
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
            "optimizer": type(engine.optimizer).__name__.lower(),  # optim.name with auto resolved
            "per_channel": cfg.quant.per_channel,
            "estimator": cfg.quant.estimator,
            "batchnorm": cfg.quant.batchnorm,
            "fp_layers": [d.name for d in decisions if not d.quantized],
            "fp_checkpoint": cfg.model.checkpoint or ("timm-pretrained" if cfg.model.pretrained else "trained-in-run"),
        },
        "layers": table,
        "skipped_images": len(_all_ranks(loaders.bad_files())),  # images that did not decode (data.bad_images)
    }


def _all_ranks(files: set[str]) -> set[str]:
    """The union of ``files`` over the DDP ranks (each rank reads its own shard), or ``files`` alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return files
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(files))
    return set().union(*map(set, gathered))
