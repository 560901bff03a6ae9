"""The eval grids of a quantized layer, read once and checked against the layer's own eval forward.

A quantized tensor is ``x̂ = q·s + z`` with integer codes ``q = round((clamp(x, lo, hi) - z) / s)``
(docs/method.md, "Quantizer"). Weights: per output channel (``s``, ``z``, ``lo``, ``hi`` of shape (C, 1, ...))
or per tensor (all of shape (1, ..., 1)); activations: per tensor, Python floats (exact float32 values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ExportError
from ..quant import functional as F
from ..quant.quantizer import Quantizer


@dataclass
class WeightGrid:
    codes: Tensor  # int32, the weight's shape; code_offset already subtracted (so codes >= 0)
    code_offset: int  # smallest code (0 for GDNSQ, whose z = min(w)); stored codes are q - code_offset
    lo: Tensor  # float32, shape of the step (C, 1, ...) or (1, ..., 1)
    hi: Tensor
    z: Tensor
    s: Tensor
    bits: int  # storage width: bits of the largest stored code, at least 1 (= max over channels)
    channel_bits: list[int]  # true bits per channel, ceil(log2(levels used))

    @property
    def per_channel(self) -> bool:
        return self.s.numel() > 1


@dataclass
class ActGrid:
    lo: float
    hi: float
    z: float
    s: float
    qmin: int  # code range of clamp(x, lo, hi): round((lo - z)/s) .. round((hi - z)/s)
    qmax: int
    bits: int  # true bits, ceil(log2(levels)), levels = qmax - qmin + 1
    signed: bool  # lo < 0


def _bits_for(levels: int) -> int:
    return max(1, math.ceil(math.log2(max(levels, 2))))


def _quantizer_grid(name: str, quantizer: nn.Module, *args) -> tuple[Tensor, ...]:
    if not isinstance(quantizer, Quantizer):
        raise ExportError(
            f"layer {name}: quantizer {type(quantizer).__name__} is not a gdnsq Quantizer (no grid()); cannot export it"
        )
    return tuple(t.detach().to(torch.float32) for t in quantizer.grid(*args))


def _eval_forward(quantizer: nn.Module, x: Tensor) -> Tensor:
    was = quantizer.training
    try:
        return quantizer.eval()(x)
    finally:
        quantizer.train(was)


@torch.no_grad()
def weight_grid(name: str, layer: nn.Module) -> WeightGrid | None:
    """The weight grid of a quantized layer, or None when its weight quantizer is disabled (FP weight)."""
    wq = layer.weight_quant
    if not wq.enabled:
        return None
    w = layer.weight.detach().to(torch.float32)
    lo, hi, z, s = _quantizer_grid(name, wq, w)
    q = F.integer_codes(w, lo, hi, z, s)
    if not torch.equal(q * s + z, _eval_forward(wq, w).to(torch.float32)):
        raise ExportError(f"layer {name}: the weight quantizer's eval output is not q·s + z on its grid()")
    dims = tuple(range(1, q.dim())) if s.numel() > 1 else tuple(range(q.dim()))
    q_min, q_max = q.amin(dim=dims), q.amax(dim=dims)  # per channel (or one value per tensor)
    offset = int(q_min.min())
    bits = max(1, int(q_max.max()) - offset).bit_length()  # storage width of the largest stored code
    if bits > 16:
        raise ExportError(f"layer {name}: weights need {bits} bits; the packed format stores at most 16")
    channel_bits = F.true_bits(q_max - q_min + 1).to(torch.int64).reshape(-1).tolist()
    codes = (q - offset).to(torch.int32)
    return WeightGrid(codes, offset, lo, hi, z, s, bits, channel_bits)


@torch.no_grad()
def act_grid(name: str, layer: nn.Module) -> ActGrid | None:
    """The input-activation grid of a quantized layer, or None when its input stays FP."""
    aq = layer.act_quant
    if aq is None or not aq.enabled or aq.observing:
        return None
    lo, hi, z, s = (t.reshape(()) for t in _quantizer_grid(name, aq))
    if not (torch.isfinite(torch.stack([lo, hi, z, s])).all() and s > 0 and hi >= lo):
        raise ExportError(f"layer {name}: activation grid is not finite or empty (lo={lo}, hi={hi}, s={s})")
    # The module's eval forward must be this grid: probe it across and beyond [lo, hi].
    span = float(hi - lo) + float(s)
    probe = torch.linspace(float(lo) - span, float(hi) + span, 4099, device=lo.device)
    if not torch.equal(F.exact_quantize(probe, lo, hi, z, s), _eval_forward(aq, probe)):
        raise ExportError(f"layer {name}: the activation quantizer's eval output is not its grid()")
    qmin = int(torch.round((lo - z) / s))
    qmax = int(torch.round((hi - z) / s))
    return ActGrid(float(lo), float(hi), float(z), float(s), qmin, qmax, _bits_for(qmax - qmin + 1), bool(lo < 0))


def container_dtype(qmin: int, qmax: int) -> str:
    """Smallest ONNX integer type holding [qmin, qmax]: uint8, int8, uint16 or int16."""
    for name, lo, hi in (("uint8", 0, 255), ("int8", -128, 127), ("uint16", 0, 65535), ("int16", -32768, 32767)):
        if lo <= qmin and qmax <= hi:
            return name
    raise ExportError(f"integer codes [{qmin}, {qmax}] do not fit 16 bits")
