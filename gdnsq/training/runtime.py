"""Where and how a job computes: the device, the seeds, the precision and memory format of the forward passes
(``train.precision``, ``train.channels_last``, ``train.compile``), batches put on the device once where they are
produced, and the DDP helpers (wrap, broadcast, all-reduce).

Convolutions and matmuls run under ``torch.autocast(device_type, dtype)``; the quantizers always run in
float32 outside autocast (``gdnsq.quant.layers``), so integer grids stay exact: bf16 keeps 8 mantissa
bits, a 10-bit grid does not fit. The loss and the bit penalties are computed in float32 as well.
fp16 needs loss scaling (a ``GradScaler``), which is CUDA only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data.loaders import Loaders
from ..errors import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


@dataclass
class Precision:
    """What a forward/backward pass needs to honour ``train.precision`` and ``train.channels_last`` on ``device``."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, train: TrainConfig, device: torch.device) -> Precision:
        dtype = DTYPES[train.precision]
        if dtype is torch.float16 and device.type != "cuda":
            raise ConfigError(f"train.precision: fp16 needs CUDA (loss scaling), the device is {device.type}; use bf16")
        scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
        return cls(device, dtype, train.channels_last, scaler)

    def autocast(self):
        """The context of a forward pass: autocast to ``dtype``, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare_module(self, module: nn.Module) -> nn.Module:
        """In place: 4-D parameters and buffers in channels_last (a no-op unless ``channels_last``)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_loaders(self, loaders: Loaders) -> Loaders:
        """Every loader of ``loaders`` yielding its batches on the device, inputs in the run's memory format."""
        on_device = {
            name: None if loader is None else OnDevice(loader, self)
            for name, loader in (("train", loaders.train), ("val", loaders.val), ("test", loaders.test))
        }
        return dataclasses.replace(loaders, calib=OnDevice(loaders.calib, self), **on_device)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients in place before clipping (fp16); a no-op otherwise."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        self.scaler.update()

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """backward + optimizer step, through the GradScaler for fp16."""
        self.backward(loss)
        self.step(optimizer)

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class OnDevice:
    """A loader whose ``(x, y)`` batches arrive on the precision's device, ``x`` in its memory format: prepared once
    where they are produced, so teacher training, evaluation and the engine's step take them as they come."""

    def __init__(self, loader: Iterable, precision: Precision):
        self.loader, self.precision = loader, precision

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.precision.device
        for x, y in self.loader:
            yield self.precision.prepare_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.loader)


def take(loader: Iterable, n: int) -> list[torch.Tensor]:
    """The inputs of the first ``n`` batches, copied: FFCV reuses its batch buffers."""
    out = []
    for x, _ in loader:
        out.append(x.clone())
        if len(out) >= n:
            break
    return out


def distribute(model: nn.Module, world_size: int, device: torch.device, sync_batchnorm: bool = True) -> nn.Module:
    """The student in DistributedDataParallel over the worker group (the frozen teacher is never wrapped: only the
    student's gradients are averaged); the model itself for a single worker."""
    if world_size == 1:
        return model
    return wrap_ddp(model, device, sync_batchnorm)


def maybe_compile(model: nn.Module, train: TrainConfig) -> nn.Module:
    """``torch.compile(model)`` when ``train.compile``; the wrapper shares the model's parameters."""
    return torch.compile(model) if train.compile else model


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
