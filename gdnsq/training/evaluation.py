"""A model's top-1 / top-5 / loss over a loader, and BatchNorm re-estimation before it.
Imports neither Ray nor MLflow nor FFCV."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .precision import Precision
from .runtime import all_reduce_sum, broadcast_module


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, precision: Precision | None = None
) -> dict[str, float]:
    """Top-1 / top-5 (%) and cross-entropy over a loader, in eval mode (exact integer grid),
    under ``precision``'s autocast and memory format (fp32 when None)."""
    precision = precision or Precision(device.type)
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = precision.prepare_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
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
def reestimate_batchnorm(model: nn.Module, batches: list[torch.Tensor], precision: Precision | None = None) -> None:
    """Recompute every BatchNorm's running mean and variance as plain averages over ``batches``, through the
    eval-mode (exact grid, no dither) forward. Under DDP rank 0's statistics go to every rank (as calibration
    does), so every rank evaluates and checkpoints the same model.

    Why: the running averages are an EMA over the last few hundred training steps, each with other rounded
    weights and with the training forward's dither; at 1-2 bits that mix can be several points of top-1 away
    from the network actually evaluated (Nagel et al. 2022, "Overcoming oscillations in QAT")."""
    if not batches:
        raise ValueError("BatchNorm re-estimation got no batches")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    precision = precision or Precision(next(model.parameters()).device.type)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for x in batches:
            with precision.autocast():
                model(precision.prepare_input(x))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    for m in norms:
        broadcast_module(m)
