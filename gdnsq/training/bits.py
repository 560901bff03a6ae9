"""Per-layer bit tables of a quantized model, and the one MAC/BOP counter (used by export and the registry).

MACs per sample of a Conv/Linear = output elements per sample x weight elements per output channel
(``weight[0].numel()``, so grouped convs count right), measured with forward hooks on one sample of
the example input. BOPs = MACs x b_w x b_a, with the true (storage) bits of a quantized layer's
weights and input, and 32 x 32 for FP layers and FP inputs. Matrix products that are not modules
(attention scores in a ViT) are not counted.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.layers import QUANT_LAYERS, fp_eval, iter_quantized

FP_BITS = 32
_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def bits_table(model: nn.Module) -> list[dict]:
    """One row per quantized layer: continuous (max over channels) and true bits, targets, size."""
    rows = []
    for name, layer in iter_quantized(model):
        bw = layer.weight_bits().detach()
        ba = layer.act_bits()
        rows.append(
            {
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
            }
        )
        rows[-1].update(extra_stats(layer))
    return rows


def extra_stats(layer) -> dict:
    """Method-specific figures of a layer's quantizers (``extra_stats()``, e.g. CoDeQ's sparsity), keys w_/a_."""
    out = {f"w_{k}": v for k, v in layer.weight_quant.extra_stats(layer.weight).items()}
    if layer.act_quant is not None:
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
        target = f"W{r['target_w']:g}A{r['target_a']:g}"
        lines.append(f"{r['name']:<28} {r['true_bits_w']:>7} {ta:>7} {target:>8} {r['bits_w']:>7.2f} {ba:>7}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ MACs and BOPs


def compute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv/Linear (quantized or FP) that owns a weight, in module order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, _COMPUTE) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]


@torch.no_grad()
def measure_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, int]]:
    """{layer name: (MACs, input elements) for one sample}, from forward hooks on ``example_input[:1]`` in eval mode."""
    shapes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in compute_layers(model):
        # Defaults bind this iteration's layer (a closure would see the last one).
        def hook(mod, inp, out, name=name, per_out=m.weight[0].numel()):  # noqa: B008
            macs, elems = shapes.get(name, (0, 0))
            shapes[name] = (macs + (out.numel() // out.shape[0]) * per_out, elems + inp[0].numel() // inp[0].shape[0])

        hooks.append(m.register_forward_hook(hook))
    try:
        with fp_eval(model):  # shapes only: skip the quantizers' arithmetic
            param = next(model.parameters(), None)
            model(example_input[:1].to(param.device if param is not None else "cpu"))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def measure_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """{layer name: MACs for one sample} (:func:`measure_shapes`)."""
    return {name: macs for name, (macs, _) in measure_shapes(model, example_input).items()}


def layer_rows(
    model: nn.Module, bits: dict[str, tuple[int, int]], example_input: torch.Tensor | None, export_bytes: dict[str, int]
) -> list[dict]:
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
        rows.append(
            {
                "name": name,
                "kind": "linear" if isinstance(m, nn.Linear) else "conv",
                "quantized": isinstance(m, QUANT_LAYERS) and name in bits,
                "params": int(n_params),
                "bits_w": int(bw),
                "bits_a": int(ba),
                "macs": n_macs,
                "bops": None if n_macs is None else n_macs * int(bw) * int(ba),
                "bytes_fp32": int(n_params) * 4,
                "bytes_export": export_bytes.get(name),
            }
        )
    return rows


def totals(rows: list[dict], bytes_fp32: int, bytes_file: int) -> dict:
    """Model totals of ``rows``: bytes and their ratio, MACs, BOPs (None when a layer's MACs are unknown)."""
    have_macs = all(r["macs"] is not None for r in rows)
    macs = sum(r["macs"] for r in rows) if have_macs else None
    bops = sum(r["bops"] for r in rows) if have_macs else None
    return {
        "bytes_fp32": bytes_fp32,
        "bytes_file": bytes_file,
        "compression": round(bytes_fp32 / bytes_file, 3) if bytes_file else None,
        "macs": macs,
        "bops": bops,
        "bops_fp32": None if macs is None else macs * FP_BITS * FP_BITS,
        "bops_reduction": round(macs * FP_BITS * FP_BITS / bops, 3) if bops else None,
    }


# ------------------------------------------------------------------------------ packed size


def _grid_rows(layer) -> int:
    """Rows of a weight grid in the packed file: lo, hi, s (+ z when z != lo; GDNSQ has z = min(w) = lo)."""
    lo, _, z, _ = layer.weight_quant.grid(layer.weight.detach().to(torch.float32))
    return 3 if torch.equal(z.to(torch.float32), lo.to(torch.float32)) else 4


def code_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes bit-packed at ``bits`` each (export.container.pack_bits): ceil(count·bits/8)."""
    return (int(count) * int(bits) + 7) // 8


def packed_size_parts(model: nn.Module, fp_bytes: int = 4) -> tuple[int, dict[str, tuple[int, int]]]:
    """The packed file's payload split into a fixed part and the per-layer code counts.

    Returns (fixed bytes, {layer: (weight elements, channels)}): fixed = every state tensor stored raw
    (FP layers, BN, biases at ``fp_bytes`` per float, quantizer state and targets in float32, integer buffers
    as they are) plus each packed layer's grid (rows x channels float32) and per-channel bits (uint8).
    The payload at weight widths b_l is fixed + Σ_l ceil(n_l·b_l/8) (:func:`packed_bytes`).
    """
    layers = {name: layer for name, layer in iter_quantized(model) if layer.weight_quant.enabled}
    quant_keys = set()
    for name, layer in iter_quantized(model):
        for k in layer.state_dict().keys():
            if k.startswith(("weight_quant.", "act_quant.")) or k in ("target_w", "target_a"):
                quant_keys.add(f"{name}.{k}")
    packed = {f"{name}.weight" for name in layers}
    fixed = 0
    for key, t in model.state_dict().items():
        if key in packed:
            continue
        if t.is_floating_point():
            fixed += t.numel() * (4 if key in quant_keys else fp_bytes)
        else:
            fixed += t.numel() * t.element_size()
    counts = {}
    for name, layer in layers.items():
        channels = int(layer.weight_quant.grid(layer.weight.detach())[3].numel())
        fixed += _grid_rows(layer) * channels * 4 + channels
        counts[name] = (layer.weight.numel(), channels)
    return fixed, counts


def packed_bytes(model: nn.Module, weight_bits: dict[str, int], fp_bytes: int = 4) -> int:
    """Payload bytes of the packed file (every blob; the file adds a JSON manifest and a 56-byte header)
    with each packed layer's weight codes at ``weight_bits[layer]``: the one size rule shared by the exporter
    (which checks its blobs against it), the budget's true check and the registry card."""
    fixed, counts = packed_size_parts(model, fp_bytes)
    missing = set(counts) - set(weight_bits)
    if missing:
        raise KeyError(f"no weight bits for {sorted(missing)}")
    return fixed + sum(code_bytes(n, weight_bits[name]) for name, (n, _) in counts.items())


def size_figures(model: nn.Module, example_input: torch.Tensor) -> dict:
    """A quantized model's size at its true bits, as the exporter and the budget count it: ``bytes_payload``
    (:func:`packed_bytes`, the budget's true bytes), ``macs`` and ``bops`` per sample (:func:`layer_rows`,
    :func:`totals`; FP layers at 32 x 32 bits). For the run summary, from which a sweep draws its front."""
    layers = list(iter_quantized(model))
    payload = packed_bytes(model, {n: max(1, q.true_weight_bits()) for n, q in layers if q.weight_quant.enabled})
    bits = {}
    for n, q in layers:
        ba = q.true_act_bits() if q.act_quant is not None and q.act_quant.enabled else None
        bits[n] = (max(1, q.true_weight_bits()) if q.weight_quant.enabled else FP_BITS, FP_BITS if ba is None else ba)
    t = totals(layer_rows(model, bits, example_input, {}), 0, payload)
    return {"bytes_payload": payload, "macs": t["macs"], "bops": t["bops"]}
