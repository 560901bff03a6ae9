"""Per-layer bit-width reports of a quantized model."""
from __future__ import annotations

from torch import nn

from ..quant.layers import iter_quantized


def bits_table(model: nn.Module) -> list[dict]:
    """One row per quantized layer: continuous (max over channels) and true bits, targets, size."""
    rows = []
    for name, layer in iter_quantized(model):
        bw = layer.weight_bits().detach()
        ba = layer.act_bits()
        rows.append({
            "name": name,
            "kind": "conv" if layer.weight.dim() == 4 else "linear",
            "bits_w": round(float(bw.max()), 4),
            "bits_w_mean": round(float(bw.mean()), 4),
            "bits_a": None if ba is None else round(float(ba.detach()), 4),
            "true_bits_w": layer.true_weight_bits(),
            "true_bits_a": layer.true_act_bits(),
            "target_w": float(layer.target_w),
            "target_a": float(layer.target_a),
            "params": layer.weight.numel(),
        })
        rows[-1].update(extra_stats(layer))
    return rows


def extra_stats(layer) -> dict:
    """Method-specific figures of a layer's quantizers (``extra_stats()``, e.g. CoDeQ's sparsity), keys w_/a_."""
    out = {}
    if hasattr(layer.weight_quant, "extra_stats"):
        out.update({f"w_{k}": v for k, v in layer.weight_quant.extra_stats(layer.weight).items()})
    if layer.act_quant is not None and hasattr(layer.act_quant, "extra_stats"):
        out.update({f"a_{k}": v for k, v in layer.act_quant.extra_stats().items()})
    return out


def average_bits(table: list[dict]) -> tuple[float, float]:
    """Unweighted mean of the true weight and activation bits over quantized layers (targets are per layer)."""
    w = [r["true_bits_w"] for r in table]
    a = [r["true_bits_a"] for r in table if r["true_bits_a"] is not None]
    return (sum(w) / len(w) if w else 0.0, sum(a) / len(a) if a else 0.0)


def format_table(table: list[dict]) -> str:
    lines = [f"{'layer':<28} {'W bits':>7} {'A bits':>7} {'target':>8} {'b_w':>7} {'b_a':>7}"]
    for r in table:
        ta = "-" if r["true_bits_a"] is None else str(r["true_bits_a"])
        ba = "-" if r["bits_a"] is None else f"{r['bits_a']:.2f}"
        lines.append(f"{r['name']:<28} {r['true_bits_w']:>7} {ta:>7} "
                     f"{'W%gA%g' % (r['target_w'], r['target_a']):>8} {r['bits_w']:>7.2f} {ba:>7}")
    return "\n".join(lines)
