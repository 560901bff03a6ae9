"""Process-level set-up shared by the job and the engine: seeds, the device, DDP helpers."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda requested but no GPU is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's (``_orig_mod``) and DDP's (``module``) wrappers, either order."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def wrap_ddp(student: nn.Module, device: torch.device, sync_batchnorm: bool = True) -> nn.Module:
    """The student in DistributedDataParallel over the initialised process group (the frozen teacher is never
    wrapped: only the student's gradients are averaged).

    ``gradient_as_bucket_view``: the gradients are views into DDP's all-reduce buckets (no copy in or out of them
    each step, one gradient-sized buffer less). ``static_graph``: a training step uses the same parameters every
    step (the quantizers, the penalty and the methods' extra losses run each step; quantizers are switched off
    only under no_grad: calibration, fp_eval), so DDP can plan its buckets once."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm and device.type == "cuda":
        # Batch statistics over the global batch, as the reference trainer does (torch's SyncBatchNorm runs on
        # GPUs only; CPU ranks keep per-rank statistics).
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    return DistributedDataParallel(
        student,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        static_graph=True,
    )


def all_reduce_sum(t: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)


def broadcast_module(module: nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)
