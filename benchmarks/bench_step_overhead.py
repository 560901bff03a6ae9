"""Training-step time of a GDNSQ-quantized timm ResNet-18 over the FP ResNet-18 (goal <= 1.1x), eager and
compiled, with PyTorch's own learnable fake-quant (torch.ao ``_LearnableFakeQuantize``) as a reference; and the
step's counts: kernels per quantized conv, bytes saved for backward (QAT/FP), torch.compile graph breaks.

Same layers quantized in both (every conv/linear except the stem conv and the classifier), batch 32,
64x64 inputs, RAdam as the engine builds it (``engine.create_optimizer``: multi-tensor), cross-entropy (+ the bit
penalty for GDNSQ). The variants are stepped in turn, round after round, and the median per-step time of each is
reported, so that load from other processes on the machine hits all alike; beside the wall time, the process's CPU
time per step (``time.process_time``: what the step computed, less sensitive to other processes' load than the wall
clock, though a preempted OpenMP thread's spin-wait still counts). ``compiled``: a channels-last copy of the model
under ``torch.compile`` (inductor), loss, penalty and optimizer eager; its compile time (the first step's) is
reported apart. ``... before``: the code path before issue 30's CPU work, in the same process: the SSE4.1 build of
the quantizer kernels (``fused.kernels("DEFAULT")``) and torch's per-parameter optimizer loop; their ratios are the
before/after. The saved bytes are measured on one training forward at --saved-batch x --saved-size (the issue's
64 x 224). Every figure is appended to results/speed.csv.

    python benchmarks/bench_step_overhead.py [--steps 15] [--batch 32] [--size 64] [--device auto] [--no-compile]
        [--variants fp,gdnsq,...] [--threads N]
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

from gdnsq.config import ObjectiveConfig, OptimConfig, QuantConfig
from gdnsq.quant import cpu_ops
from gdnsq.quant import fused as kernel_builds
from gdnsq.quant.layers import quantizer_parameters, set_fused
from gdnsq.training.engine import create_optimizer
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


# the variants stepped by ``timing``; "... before": the path before issue 30's CPU work (see the docstring)
EAGER = ("fp", "gdnsq", "fp before", "gdnsq before", "unfused", "torch.ao")
COMPILED = ("fp compiled", "gdnsq compiled")


def optimizer(model: nn.Module, before: bool) -> torch.optim.Optimizer:
    """RAdam at LR 1e-4 in the engine's two groups; ``before``: torch's default (per-parameter loop on the CPU)."""
    quant = quantizer_parameters(model)
    return create_optimizer(model, OptimConfig(name="radam", lr=1e-4), quant, foreach=not before)


def timing(device, models, x, y, args) -> list[dict]:
    """Median step times (wall and process CPU), eager and compiled, stepped in turn round after round."""
    wanted = args.variants.split(",") if args.variants else list(EAGER) + ([] if args.no_compile else list(COMPILED))
    # name -> (what is called, the model it steps, its input); compiled variants run channels-last, as inductor's
    # CPU convolutions do (a contiguous model makes it copy the layout around every opaque op)
    runs = {}
    for name in wanted:
        base = name.split()[0]
        if name.endswith("compiled"):
            m = copy.deepcopy(models[base]).to(memory_format=torch.channels_last)
            runs[name] = (torch.compile(m), m, x.contiguous(memory_format=torch.channels_last))
        elif name.endswith("before"):
            m = copy.deepcopy(models[base])
            runs[name] = (m, m, x)
        else:
            runs[name] = (models[name], models[name], x)
    opts = {k: optimizer(m, k.endswith("before")) for k, (_, m, _) in runs.items()}
    obj = ObjectiveConfig()
    portable = kernel_builds.kernels("DEFAULT") if device.type == "cpu" else None  # the SSE4.1 build
    widest = cpu_ops.kernels

    def step(name):
        call, m, inp = runs[name]
        if portable is not None and name.endswith("before"):
            cpu_ops.kernels = lambda: portable
        try:
            loss = F.cross_entropy(call(inp), y)
            if name.split()[0] in ("gdnsq", "unfused"):
                t = bit_penalties(m, obj.eps, obj.p)
                loss = loss + 1e-3 * (t.p_w + t.p_a)
            opt = opts[name]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            cpu_ops.kernels = widest
        if device.type == "cuda":
            torch.cuda.synchronize()

    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    first = {}
    for i in range(args.steps + 3):
        for name in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i == 0:
                first[name] = dt
            if i >= 3:  # warm-up rounds excluded (compilation happens there)
                wall[name].append(dt)
                cpu[name].append(dc)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end of the timed steps")
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.steps} steps (median)")  # fmt: skip
    for k in runs:
        print(f"  {k:<15} {med[k] * 1000:8.1f} ms/step wall {med_cpu[k] * 1000:8.1f} ms/step CPU")
    pairs = {
        "GDNSQ/FP eager": ("gdnsq", "fp"),
        "GDNSQ/FP eager before": ("gdnsq before", "fp before"),
        "GDNSQ after/before eager": ("gdnsq", "gdnsq before"),
        "FP after/before eager": ("fp", "fp before"),
        "torch path/FP eager": ("unfused", "fp"),
        "torch.ao/FP eager": ("torch.ao", "fp"),
        "GDNSQ/FP compiled": ("gdnsq compiled", "fp compiled"),
        "FP compiled/FP eager": ("fp compiled", "fp"),
        "GDNSQ compiled/GDNSQ eager": ("gdnsq compiled", "gdnsq"),
    }
    threads = torch.get_num_threads()
    notes = f"timm ResNet-18, batch {args.batch}, {args.size} px, {args.steps} steps (median), {threads} threads"
    rows = []
    for k, (a, b) in pairs.items():
        if a in runs and b in runs:
            print(f"step ratio {k:<27} wall {med[a] / med[b]:.2f}x  CPU {med_cpu[a] / med_cpu[b]:.2f}x")
            rows.append(row(k, "ratio", f"{med[a] / med[b]:.3f}", "x", notes))
            rows.append(row(k, "ratio_cpu_time", f"{med_cpu[a] / med_cpu[b]:.3f}", "x", notes))
    for k in runs:
        rows.append(row(k, "ms_per_step", f"{med[k] * 1000:.1f}", "ms", notes))
        rows.append(row(k, "cpu_ms_per_step", f"{med_cpu[k] * 1000:.1f}", "ms", notes))
        if k.endswith("compiled"):
            print(f"  {k}: first step (compilation) {first[k]:.1f} s")
            rows.append(row(k, "first_step_s", f"{first[k]:.1f}", "s", notes + "; the compile, not in the medians"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    ap.add_argument("--variants", help=f"timed variants, comma-separated (default all: {','.join(EAGER + COMPILED)})")
    ap.add_argument("--threads", type=int, help="torch threads (default torch's)")
    ap.add_argument("--saved-batch", type=int, default=64)
    ap.add_argument("--saved-size", type=int, default=224)
    ap.add_argument("--parts", default="counts,timing,saved", help="which figures, comma-separated")
    ap.add_argument("--record", metavar="CSV", help="where the rows go (default results/speed.csv)")
    ap.add_argument("--commit", help="the commit measured, where the gdnsq imported is not a git checkout")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
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
