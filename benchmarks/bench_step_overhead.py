"""Training-step time of a GDNSQ-quantized timm ResNet-18 over the FP ResNet-18 (goal <= 1.3x), and the
same ratio for PyTorch's own learnable fake-quant (torch.ao ``_LearnableFakeQuantize``) as a reference.

Same layers quantized in both (every conv/linear except the stem conv and the classifier), batch 32,
64x64 inputs, RAdam, cross-entropy (+ the bit penalty for GDNSQ). The three variants are stepped in
turn, round after round, and the median per-step time of each is reported, so that load from other
processes on the machine hits all three alike.

    python benchmarks/bench_step_overhead.py [--steps 15] [--batch 32] [--size 64] [--device auto]

Appends one row per variant to ``results/speed.csv`` (ms/step of FP; the others' ratio to FP), with the load
average, device and threads (``--record CSV``, ``--no-record``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

from gdnsq.config import ObjectiveConfig, QuantConfig
from gdnsq.quant.layers import set_fused
from gdnsq.training.objective import bit_penalties
from gdnsq.training.runtime import resolve_device
from gdnsq.training.surgery import _set_submodule, calibrate_model, plan, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402


class AOFakeQuantLayer(nn.Module):
    """A conv/linear whose weight (per channel) and input (per tensor) pass torch.ao learnable fake-quant."""

    def __init__(self, layer: nn.Module, bits: int = 2):
        super().__init__()
        self.layer = layer
        self.fq_w = _LearnableFakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-(2 ** (bits - 1)),
            quant_max=2 ** (bits - 1) - 1,
            dtype=torch.qint8,
            ch_axis=0,
            qscheme=torch.per_channel_symmetric,
            channel_len=layer.weight.shape[0],
            use_grad_scaling=True,
        )
        self.fq_a = _LearnableFakeQuantize(
            observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2**bits - 1, use_grad_scaling=True
        )

    def forward(self, x):
        w = self.fq_w(self.layer.weight)
        x = self.fq_a(x)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


def make_models(device, batch, size):
    torch.manual_seed(0)
    fp = timm.create_model("resnet18", num_classes=100).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    gdnsq = copy.deepcopy(fp)
    qcfg = QuantConfig(target_w=2, target_a=2)
    quantize_model(gdnsq, qcfg)
    calibrate_model(gdnsq, [x], init_bits=10)
    unfused = copy.deepcopy(gdnsq)  # quant.fused off: the rounding error is recomputed in backward
    set_fused(unfused, False)

    ao = copy.deepcopy(fp)
    for d in plan(ao, qcfg):
        if d.quantized:
            _set_submodule(ao, d.name, AOFakeQuantLayer(ao.get_submodule(d.name)))
    with torch.no_grad():  # let the observers see data once, then train scale/zero-point
        ao.train()(x)
    for m in ao.modules():
        if isinstance(m, _LearnableFakeQuantize):
            m.toggle_observer_update(False)
    return {"fp": fp, "gdnsq": gdnsq, "unfused": unfused, "torch.ao": ao}, x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--record", default=str(provenance.RESULTS / "speed.csv"), metavar="CSV")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    stamp = {"date": provenance.today(), "commit": provenance.commit(), "source": "measured"}
    stamp["command"] = provenance.command()
    device = resolve_device(args.device)
    models, x, y = make_models(device, args.batch, args.size)
    opts = {k: torch.optim.RAdam(m.parameters(), lr=1e-4) for k, m in models.items()}
    obj = ObjectiveConfig()

    def step(name):
        m, opt = models[name], opts[name]
        loss = F.cross_entropy(m(x), y)
        if name in ("gdnsq", "unfused"):
            t = bit_penalties(m, obj.eps, obj.p)
            loss = loss + 1e-3 * (t.p_w + t.p_a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {k: [] for k in models}
    for i in range(args.steps + 3):
        for name in models:
            t0 = time.perf_counter()
            step(name)
            if i >= 3:  # warm-up rounds excluded
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    print(
        f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.steps} steps (median)"
    )
    for k, v in med.items():
        print(f"  {k:<9} {v * 1000:8.1f} ms/step")
    print(f"GDNSQ / FP step time:    {med['gdnsq'] / med['fp']:.2f}x   (goal <= 1.3x)")
    print(f"unfused / FP step time:  {med['unfused'] / med['fp']:.2f}x   (quant.fused off)")
    print(f"torch.ao / FP step time: {med['torch.ao'] / med['fp']:.2f}x   (reference)")
    if args.no_record:
        return
    machine = f"{device.type}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, {machine}"
    setup = f"timm ResNet-18, batch {args.batch}, {args.size} px, {args.steps} steps (median)"
    names = {"fp": "fp", "gdnsq": "gdnsq_fused", "unfused": "gdnsq_torch", "torch.ao": "torch_ao"}
    rows = [
        {
            **stamp,
            "benchmark": "step_overhead",
            "machine": machine,
            "load": f"{os.getloadavg()[0]:.1f}",
            "variant": names[k],
            "metric": "ms_per_step" if k == "fp" else "ratio_to_fp",
            "value": round(v * 1000, 1) if k == "fp" else round(v / med["fp"], 3),
            "unit": "ms" if k == "fp" else "x",
            "seed": 0,
            "notes": setup,
        }
        for k, v in med.items()
    ]
    print(f"written: {provenance.record('speed.csv', rows, Path(args.record))}")


if __name__ == "__main__":
    main()
