"""Figures of a QAT step that are counts, not times: kernels per quantized conv, bytes saved for backward, graph
breaks; and appending a speed benchmark's rows to ``results/speed.csv`` (benchmarks/provenance.py's schema).

Counts are made on the CPU through the ops CUDA would run: a TorchDispatchMode sees each op below autograd; views
(no kernel) are left out; each of gdnsq's registered ops is one CUDA kernel (``gdnsq/quant/ops.py``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import provenance
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gdnsq.quant.layers import QConv2d, set_fused
from gdnsq.quant.spec import QuantSpec


def spec(bits: int, **kwargs) -> QuantSpec:
    """A QuantSpec at ``bits`` under either field name (bound_w since the targets strategy, target_w before), so
    the same script measures this branch and an archive of its base side by side."""
    names = ("bound_w", "bound_a") if "bound_w" in inspect.signature(QuantSpec).parameters else ("target_w", "target_a")
    return QuantSpec(**dict.fromkeys(names, bits), **kwargs)


class KernelOps(TorchDispatchMode):
    """Ops dispatched below autograd that launch work (views excluded)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def kernels_per_conv(fused: bool | None, estimator: str = "ste") -> tuple[int, int]:
    """(forward, backward) ops of one 64->64 3x3 conv of a ResNet-18 stage with its input quantized, in training
    mode, fresh gradients; ``fused`` None: the plain FP conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(8, 64, 16, 16).relu()
    layer = conv
    if fused is not None:
        layer = QConv2d.from_float(conv, spec(2, estimator=estimator))
        layer.act_quant.observing = True
        layer(x)
        layer.act_quant.observing = False
        layer.act_quant.calibrate_(8)
        layer.weight_quant.calibrate_(layer.weight, 8)
        set_fused(layer, fused)
    layer.train()
    x = x.requires_grad_(True)
    with KernelOps() as fwd:
        y = layer(x)
    g = torch.randn_like(y)
    with KernelOps() as bwd:
        y.backward(g)
    return len(fwd.ops), len(bwd.ops)


def saved_bytes(model: nn.Module, x: torch.Tensor, autocast_dtype=None) -> tuple[int, int]:
    """(all, activations): bytes of the distinct storages autograd saves in one training forward; ``activations``
    leaves out the model's parameters (alive anyway; a cast copy of one counts)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            model(x)
    return sum(seen.values()), sum(n for p, n in seen.items() if p not in params)


def graph_breaks(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(graph breaks, graphs) of torch.compile's trace of ``model(x)``."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    return explained.graph_break_count, explained.graph_count


def machine(device: torch.device) -> str:
    where = f"{device.type}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    return f"{torch.cuda.get_device_name(device)}, {where}" if device.type == "cuda" else where


def append_rows(rows: list[dict], device: torch.device, path: str | None = None, commit_id: str | None = None) -> None:
    """Append ``rows`` (variant, metric, value, unit, notes) to results/speed.csv (or ``path``) with the run's
    commit (``commit_id`` where the gdnsq measured is not this checkout, e.g. a git archive of an older commit),
    command, date, machine and load average."""
    stamp = {
        "date": provenance.today(),
        "commit": commit_id or provenance.commit(),
        "source": "measured",
        "command": provenance.command(),
        "benchmark": "step_overhead",
        "machine": machine(device),
        "load": f"{os.getloadavg()[0]:.1f}",
        "seed": 0,
    }
    provenance.record("speed.csv", [{**stamp, **r} for r in rows], Path(path) if path else None)
