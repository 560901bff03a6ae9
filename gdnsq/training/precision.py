"""Precision and memory format of the forward passes: ``train.precision``, ``train.channels_last``, ``train.compile``.

Convolutions and matmuls run under ``torch.autocast(device_type, dtype)``; the quantizers always run in
float32 outside autocast (``gdnsq.quant.layers``), so integer grids stay exact: bf16 keeps 8 mantissa
bits, a 10-bit grid does not fit. The loss and the bit penalties are computed in float32 as well.
fp16 needs loss scaling (a ``GradScaler``), which is CUDA only here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """What a forward/backward pass needs to honour ``train.precision`` and ``train.channels_last``."""

    device_type: str
    dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, train: TrainConfig, device: torch.device) -> Precision:
        dtype = DTYPES[train.precision]
        if dtype is torch.float16 and device.type != "cuda":
            raise ConfigError(f"train.precision: fp16 needs CUDA (loss scaling), the device is {device.type}; use bf16")
        scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
        return cls(device.type, dtype, train.channels_last, scaler)

    def autocast(self):
        """The context of a forward pass: autocast to ``dtype``, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def prepare_module(self, module: nn.Module) -> nn.Module:
        """In place: 4-D parameters and buffers in channels_last (a no-op unless ``channels_last``)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

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


def maybe_compile(model: nn.Module, train: TrainConfig) -> nn.Module:
    """``torch.compile(model)`` when ``train.compile``; the wrapper shares the model's parameters."""
    return torch.compile(model) if train.compile else model
