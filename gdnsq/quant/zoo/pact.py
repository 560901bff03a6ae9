"""PACT: Parameterized Clipping Activation (Choi et al. 2018), weights DoReFa-style, at fixed bits k.

Activations (n = 2**k - 1 steps; α learnable, per tensor)::

    y = clamp(x, 0, α),   ŷ = round(y·n/α)·α/n
    dŷ/dx = 1 for 0 <= x <= α (straight through), 0 outside;   dŷ/dα = 1 for x >= α, else 0

(the paper's gradient: the step α/n is treated as a constant in backward). Signed inputs (no ReLU before
the layer; our extension) clip to [-α, α] and dŷ/dα = +1 above α, -1 below -α.
Optional L2 on α (PACT's regulariser), ``quant.method_args.alpha_l2`` = λ_α (default 0): the term
λ_α·α² is returned by ``extra_loss()`` and added to the training loss by the objective.
Init: α = the MSE clip of the calibration values (``common.mse_clip``, the init Brevitas and LSQ+ use for a
learned range). The paper starts at α = 10 and lets the L2 term pull it down, which assumes ImageNet-scale
activations and a long run; starting at the calibration max (this module before) put a 2-bit grid's levels
where the long post-ReLU tail is, not where the values are.
Weights: ``dorefa.DoReFaWeightQuantizer``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..methods import register_method
from .common import (
    FixedBitActQuantizer,
    fake_quant_ste,
    int_bits,
    method_args,
    mse_clip,
    range_grid,
)
from .dorefa import DoReFaWeightQuantizer

DEFAULTS = {"alpha_l2": 0.0}


class PACTActQuantizer(FixedBitActQuantizer):
    def __init__(self, bits: int, *, signed: str = "auto", alpha_l2: float = 0.0):
        super().__init__(bits, signed=signed)
        self.alpha = nn.Parameter(torch.tensor(10.0))
        self.alpha_l2 = float(alpha_l2)

    def _init_from_observers(self, signed: bool) -> None:
        top = (torch.maximum(self.obs_max, -self.obs_min) if signed else self.obs_max).clamp_min(1e-3)
        self.alpha.copy_(mse_clip(self.calib_sample(), self._grid, top))

    def _grid(self, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lo = -alpha if bool(self.is_signed) else alpha.detach() * 0
        return range_grid(lo, alpha, self.n_bits)

    @torch.no_grad()
    def grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._grid(self.alpha)

    def _train(self, x: Tensor) -> Tensor:
        lo, hi, z, s = self._grid(self.alpha)
        return fake_quant_ste(x, lo, hi, z, s.detach())

    def extra_loss(self) -> Tensor:
        return self.alpha_l2 * self.alpha.square()

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}, alpha_l2={self.alpha_l2:g}"


@register_method("pact")
def create_pact(weight_shape, spec):
    args = method_args(spec, "pact", DEFAULTS)
    return (
        DoReFaWeightQuantizer(weight_shape, int_bits(spec.bound_w), per_channel=spec.per_channel),
        PACTActQuantizer(int_bits(spec.bound_a), signed=spec.act_signed, alpha_l2=args["alpha_l2"]),
    )
