"""Training-step time of a GDNSQ-quantized timm ResNet-18 over the FP ResNet-18 (goal <= 1.1x), eager and
compiled, with PyTorch's own learnable fake-quant (torch.ao ``_LearnableFakeQuantize``) as a reference; and the
step's counts: kernels per quantized conv, bytes saved for backward (QAT/FP), torch.compile graph breaks.

Same layers quantized in both (every conv/linear except the stem conv and the classifier), batch 32,
64x64 inputs, RAdam, cross-entropy (+ the bit penalty for GDNSQ). The variants are stepped in turn, round after
round, and the median per-step time of each is reported, so that load from other processes on the machine hits
all alike. ``compiled``: a channels-last copy of the model under ``torch.compile`` (inductor), loss, penalty and
optimizer eager. The
saved bytes are measured on one training forward at --saved-batch x --saved-size (the issue's 64 x 224).
Every figure is appended to results/speed.csv.

    python benchmarks/bench_step_overhead.py [--steps 15] [--batch 32] [--size 64] [--device auto] [--no-compile]
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
from step_figures import append_rows, graph_breaks, kernels_per_conv, saved_bytes  # noqa: E402


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


def saved_ratios(device, batch, size) -> list[dict]:
    """QAT/FP bytes saved for backward by a training forward: fp32 and bf16 autocast, ste and aewgs; the registered
    ops' path and the torch path (quant.fused off: what CUDA ran before the ops)."""
    torch.manual_seed(0)
    fp = timm.create_model("resnet18", num_classes=100).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    rows = []
    for dtype in (None, torch.bfloat16):
        fp_all, fp_act = saved_bytes(fp, x, dtype)
        for estimator in ("ste", "aewgs"):
            qat = copy.deepcopy(fp)
            quantize_model(qat, QuantConfig(target_w=2, target_a=2, estimator=estimator))
            calibrate_model(qat, [x[:8]], init_bits=10)
            qat.train()
            for fused in (True, False):
                set_fused(qat, fused)
                q_all, q_act = saved_bytes(qat, x, dtype)
                variant = f"{'bf16' if dtype else 'fp32'} {estimator} {'ops' if fused else 'torch path'}"
                notes = f"timm ResNet-18, batch {batch}, {size} px, one training forward"
                for metric, ratio in (("saved_bytes_qat_over_fp", q_all / fp_all),
                                      ("saved_activation_bytes_qat_over_fp", q_act / fp_act)):  # fmt: skip
                    rows.append(row(variant, metric, f"{ratio:.3f}", "x", notes))
            del qat
    return rows


def row(variant, metric, value, unit, notes) -> dict:
    return {"variant": variant, "metric": metric, "value": value, "unit": unit, "notes": notes}


def counts(device, models, x) -> list[dict]:
    """Ops per quantized conv (forward, backward; the conv included) and graph breaks of the GDNSQ model."""
    kernels = {k: kernels_per_conv(f) for k, f in (("fp", None), ("gdnsq", True), ("unfused", False))}
    kernels["gdnsq aewgs"] = kernels_per_conv(True, "aewgs")
    breaks, graphs = graph_breaks(models["gdnsq"].train(), x)
    rows = []
    for k, (f_ops, b_ops) in kernels.items():
        print(f"ops per quantized conv ({k}): {f_ops} forward, {b_ops} backward (the conv included)")
        rows.append(row(k, "ops_per_quantized_conv_forward", f_ops, "ops", "64->64 3x3, conv included"))
        rows.append(row(k, "ops_per_quantized_conv_backward", b_ops, "ops", "64->64 3x3, conv included"))
    print(f"graph breaks tracing the GDNSQ model (training): {breaks} ({graphs} graphs)")
    return rows + [row("gdnsq", "graph_breaks_train", breaks, "breaks", f"timm ResNet-18, {graphs} graphs")]


def timing(device, models, x, y, args) -> list[dict]:
    """Median step times, eager and compiled, stepped in turn round after round."""
    # name -> (what is called, the model it steps, its input); compiled variants run channels-last, as inductor's
    # CPU convolutions do (a contiguous model makes it copy the layout around every opaque op)
    runs = {k: (m, m, x) for k, m in models.items()}
    if not args.no_compile:
        x_cl = x.contiguous(memory_format=torch.channels_last)
        for k in ("fp", "gdnsq"):
            m = copy.deepcopy(models[k]).to(memory_format=torch.channels_last)
            runs[f"{k} compiled"] = (torch.compile(m), m, x_cl)
    opts = {k: torch.optim.RAdam(m.parameters(), lr=1e-4) for k, (_, m, _) in runs.items()}
    obj = ObjectiveConfig()

    def step(name):
        call, m, inp = runs[name]
        loss = F.cross_entropy(call(inp), y)
        if name.split()[0] in ("gdnsq", "unfused"):
            t = bit_penalties(m, obj.eps, obj.p)
            loss = loss + 1e-3 * (t.p_w + t.p_a)
        opt = opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {k: [] for k in runs}
    for i in range(args.steps + 3):
        for name in runs:
            t0 = time.perf_counter()
            step(name)
            if i >= 3:  # warm-up rounds excluded (compilation happens there)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end of the timed steps")
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.steps} steps (median)")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<15} {v * 1000:8.1f} ms/step")
    ratios = {
        "GDNSQ/FP eager": med["gdnsq"] / med["fp"],
        "torch path/FP eager": med["unfused"] / med["fp"],
        "torch.ao/FP eager": med["torch.ao"] / med["fp"],
    }
    if not args.no_compile:
        ratios["GDNSQ/FP compiled"] = med["gdnsq compiled"] / med["fp compiled"]
        ratios["FP compiled/FP eager"] = med["fp compiled"] / med["fp"]
    for k, v in ratios.items():
        print(f"step ratio {k:<22} {v:.2f}x")
    notes = f"timm ResNet-18, batch {args.batch}, {args.size} px, {args.steps} steps (median)"
    rows = [row(k, "ms_per_step", f"{v * 1000:.1f}", "ms", notes) for k, v in med.items()]
    return rows + [row(k, "ratio", f"{v:.3f}", "x", notes) for k, v in ratios.items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    ap.add_argument("--saved-batch", type=int, default=64)
    ap.add_argument("--saved-size", type=int, default=224)
    ap.add_argument("--parts", default="counts,timing,saved", help="which figures, comma-separated")
    ap.add_argument("--record", metavar="CSV", help="where the rows go (default results/speed.csv)")
    ap.add_argument("--commit", help="the commit measured, where the gdnsq imported is not a git checkout")
    args = ap.parse_args()
    device = resolve_device(args.device)
    models, x, y = make_models(device, args.batch, args.size)
    parts = args.parts.split(",")
    # each part's rows are written as soon as they exist: a long run that dies keeps what it measured
    if "counts" in parts:
        append_rows(counts(device, models, x), device, args.record, args.commit)
    if "timing" in parts:
        append_rows(timing(device, models, x, y, args), device, args.record, args.commit)
    if "saved" in parts:
        saved = saved_ratios(device, args.saved_batch, args.saved_size)
        for r in saved:
            print(f"{r['metric']:<36} {r['value']}x  {r['variant']}")
        append_rows(saved, device, args.record, args.commit)


if __name__ == "__main__":
    main()
