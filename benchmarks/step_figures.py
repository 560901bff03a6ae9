"""Figures of a QAT step that are counts, not times: kernels per quantized conv, bytes saved for backward, graph
breaks; and the CSV every speed benchmark appends its rows to (``results/speed.csv``).

Counts are made on the CPU through the ops CUDA would run: a TorchDispatchMode sees each op below autograd; views
(no kernel) are left out; each of gdnsq's registered ops is one CUDA kernel (``gdnsq/quant/ops.py``).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gdnsq.quant.layers import QConv2d, set_fused
from gdnsq.quant.spec import QuantSpec

SPEED_CSV = os.path.join(os.path.dirname(__file__), "..", "results", "speed.csv")
COLUMNS = ["commit", "command", "date", "device", "threads", "figure", "value", "unit", "setting"]


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
        layer = QConv2d.from_float(conv, QuantSpec(target_w=2, target_a=2, estimator=estimator))
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


def commit() -> str:
    root = os.path.dirname(os.path.abspath(__import__("gdnsq").__file__))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}"


def append_rows(rows: list[dict], device: torch.device, path: str = SPEED_CSV, commit_id: str | None = None) -> None:
    """Append ``rows`` (figure, value, unit, setting) with the run's commit (``commit_id``, else the imported
    gdnsq's checkout), command, date, device, threads."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    common = {
        "commit": commit_id or commit(),
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
    }
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**common, **row})
