"""Size and BOPs per layer and in total.

MACs per sample of a Conv/Linear = output elements per sample x weight elements per output channel
(``weight[0].numel()``, so grouped convs count right), measured with forward hooks on one sample of
the example input. BOPs = MACs x b_w x b_a, with the true (storage) bits of a quantized layer's
weights and input, and 32 x 32 for FP layers and FP inputs. Matrix products that are not modules
(attention scores in a ViT) are not counted, as in the registry's manifest.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.layers import QUANT_LAYERS, iter_quantizers

FP_BITS = 32
_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def compute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv/Linear (quantized or FP) that owns a weight, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _COMPUTE) and isinstance(getattr(m, "weight", None), torch.Tensor)]


@torch.no_grad()
def measure_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """{layer name: MACs for one sample}, from forward hooks on ``example_input[:1]`` in eval mode."""
    macs: dict[str, int] = {}
    hooks = []
    # MACs depend on shapes only: skip the quantizers' arithmetic (restored below).
    switched = [q for q in iter_quantizers(model) if getattr(q, "enabled", False) is True]
    for name, m in compute_layers(model):
        def hook(mod, inp, out, name=name, per_out=m.weight[0].numel()):
            macs[name] = macs.get(name, 0) + (out.numel() // out.shape[0]) * per_out

        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        for q in switched:
            q.enabled = False
        model.eval()
        param = next(model.parameters(), None)
        model(example_input[:1].to(param.device if param is not None else "cpu"))
    finally:
        for q in switched:
            q.enabled = True
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def layer_rows(model: nn.Module, bits: dict[str, tuple[int, int]], example_input: torch.Tensor | None,
               export_bytes: dict[str, int]) -> list[dict]:
    """One row per Conv/Linear: params, bits, MACs, BOPs, FP32 bytes (weight + bias) and exported bytes.

    ``bits``: {quantized layer: (b_w, b_a)}; other layers count as FP (32, 32).
    ``export_bytes``: {layer: bytes its weight, bias and grid take in the exported file}.
    """
    macs = measure_macs(model, example_input) if example_input is not None else {}
    rows = []
    for name, m in compute_layers(model):
        bw, ba = bits.get(name, (FP_BITS, FP_BITS))
        n_params = m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
        n_macs = macs.get(name)
        rows.append({
            "name": name, "kind": "linear" if isinstance(m, nn.Linear) else "conv",
            "quantized": isinstance(m, QUANT_LAYERS) and name in bits, "params": int(n_params),
            "bits_w": int(bw), "bits_a": int(ba),
            "macs": n_macs, "bops": None if n_macs is None else n_macs * int(bw) * int(ba),
            "bytes_fp32": int(n_params) * 4, "bytes_export": export_bytes.get(name),
        })
    return rows


def totals(rows: list[dict], bytes_fp32: int, bytes_file: int) -> dict:
    have_macs = all(r["macs"] is not None for r in rows)
    macs = sum(r["macs"] for r in rows) if have_macs else None
    bops = sum(r["bops"] for r in rows) if have_macs else None
    return {
        "bytes_fp32": bytes_fp32, "bytes_file": bytes_file,
        "compression": round(bytes_fp32 / bytes_file, 3) if bytes_file else None,
        "macs": macs, "bops": bops, "bops_fp32": None if macs is None else macs * FP_BITS * FP_BITS,
        "bops_reduction": round(macs * FP_BITS * FP_BITS / bops, 3) if bops else None,
    }


def format_report(report: dict) -> str:
    """A fixed-width table of the per-layer rows and the totals."""
    lines = [f"{'layer':<30} {'W':>3} {'A':>3} {'params':>10} {'MACs':>12} {'GBOPs':>9} {'FP32 B':>11} "
             f"{'export B':>10}"]
    for r in report["layers"]:
        macs = "-" if r["macs"] is None else f"{r['macs']:,}"
        gbops = "-" if r["bops"] is None else f"{r['bops'] / 1e9:.4g}"
        exp = "-" if r["bytes_export"] is None else f"{r['bytes_export']:,}"
        lines.append(f"{r['name']:<30} {r['bits_w']:>3} {r['bits_a']:>3} {r['params']:>10,} {macs:>12} {gbops:>9} "
                     f"{r['bytes_fp32']:>11,} {exp:>10}")
    t = report
    lines.append(f"total: FP32 {t['bytes_fp32']:,} B -> file {t['bytes_file']:,} B (x{t['compression']})")
    if t.get("bops") is not None:
        lines.append(f"       BOPs {t['bops'] / 1e9:.4g} G (FP32 {t['bops_fp32'] / 1e9:.4g} G, "
                     f"x{t['bops_reduction']} fewer), MACs {t['macs']:,}")
    return "\n".join(lines)
