"""DoReFa-Net quantizers (Zhou et al. 2016) with the straight-through estimator, at fixed bits k.

Weights, k >= 2 (n = 2**k - 1 steps)::

    t  = tanh(w) / max|tanh(w)|                  in [-1, 1] (max per channel, or per tensor)
    ŵ  = 2·round(n·(t + 1)/2)/n - 1             (the paper's 2·quantize_k(tanh(w)/(2·max|tanh|) + 1/2) - 1)

  backward: straight through the rounding, autograd through tanh and the max.
Weights, k = 1: ŵ = E·sign(w), E = mean|w| (per channel or tensor, a constant in backward); the
gradient passes straight through (identity), as in the paper.
Activations: clamp(x, 0, 1) on n uniform steps, straight-through inside [0, 1], zero outside. Inputs
that calibration finds signed (no ReLU before the layer) use [-1, 1]: our extension, the paper has none.

Grids: ``grid(w)`` of k-bit weights is {-1, -1 + 2/n, ..., 1} over t (``grid_domain = "output"``: the
codes are those of the eval output, or of t, not of the raw weight); 1-bit weights {-E, +E} on the raw
weight; activations [0, 1] or [-1, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods import register_method
from .common import (
    FixedBitActQuantizer,
    FixedBitWeightQuantizer,
    fake_quant_ste,
    int_bits,
    method_args,
    range_grid,
    round_ste,
)


class DoReFaWeightQuantizer(FixedBitWeightQuantizer):
    def __init__(self, weight_shape: torch.Size, bits: int, *, per_channel: bool = True):
        super().__init__(weight_shape, bits, per_channel=per_channel)
        self.grid_domain = "input" if self.n_bits == 1 else "output"

    def _to_grid_domain(self, w: Tensor) -> Tensor:
        if self.n_bits == 1:
            return w
        t = torch.tanh(w)
        return t / t.abs().amax(dim=self._dims, keepdim=True).clamp_min(1e-12)

    def _scale(self, w: Tensor) -> Tensor:
        return w.detach().abs().mean(dim=self._dims, keepdim=True).clamp_min(1e-12)

    def grid(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.n_bits == 1:
            e = self._scale(w)
            return -e, e, -e, 2 * e
        one = w.new_ones(self.param_shape)
        return range_grid(-one, one, self.n_bits)

    def _train(self, w: Tensor) -> Tensor:
        if self.n_bits == 1:
            lo, hi, z, s = self.grid(w)
            # identity gradient: clamp forward, straight through backward (values equal the eval clamp)
            wc = w + (torch.minimum(torch.maximum(w, lo), hi) - w).detach()
            return round_ste((wc - z) / s) * s + z
        return fake_quant_ste(self._to_grid_domain(w), *self.grid(w))


class DoReFaActQuantizer(FixedBitActQuantizer):
    def grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        hi = self.obs_min.new_ones(())
        lo = -hi if bool(self.is_signed) else hi * 0
        return range_grid(lo, hi, self.n_bits)

    def _train(self, x: Tensor) -> Tensor:
        return fake_quant_ste(x, *self.grid())


@register_method("dorefa")
def create_dorefa(weight_shape, spec):
    method_args(spec, "dorefa", {})
    return (
        DoReFaWeightQuantizer(weight_shape, int_bits(spec.bound_w), per_channel=spec.per_channel),
        DoReFaActQuantizer(int_bits(spec.bound_a), signed=spec.act_signed),
    )
