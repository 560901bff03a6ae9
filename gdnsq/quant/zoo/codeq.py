"""CoDeQ (Wenshøj et al. 2025): a uniform weight quantizer with a learnable dead zone that prunes.

Symmetric mid-tread grid {-Q..Q}·s, Q = 2**(b-1) - 1 (b >= 2; b = 2 is ternary), step s = 2**log_s,
dead-zone half-width τ = |δ|·s with δ learnable (in steps, per channel or per tensor)::

    k = sign(w) · clamp(ceil((|w| - τ) / s), 0, Q)        ŵ = k·s
    |w| <= τ -> 0 (pruned); above τ the levels follow every s. δ = 1/2 is the plain rounding quantizer,
    so training starts from it and learns how far to widen the zero bin.

Backward (straight-through, LSQ-style; g = 1/sqrt(N·Q) scales the s and δ gradients):
    dŵ/dw = 1 except on saturated weights (|w| > τ + Q·s): 0. Pruned weights keep the identity gradient
            (our choice) so they can grow back out of the dead zone.
    dŵ/ds = k - w/s on live weights, sign(w)·Q on saturated ones, 0 on pruned ones.
    dŵ/dδ = -sign(w)·s on live weights, 0 elsewhere.
Sparsity pressure: ``extra_loss()`` = λ·mean|k| (an L1 rate proxy on the codes; λ =
``quant.method_args.sparsity_weight``, default 0.001); it shrinks live weights and widens the dead zone.
λ trades accuracy for sparsity (figures: docs/results.md, "Decisions").
Stats: ``extra_stats(w)`` gives the share of zero codes (sparsity), the entropy of the codes in bits (an
effective bit-width after entropy coding) and log2 of the levels used.
Activations: LSQ (``lsq.LSQActQuantizer``, its step MSE-initialised as ``lsq``'s); the dead zone is a
weight-pruning device. Grids: ``grid_domain = "output"`` (the dead zone is not an affine grid on the raw weight).
Init: s from LSQ's rule 2·mean|w|/sqrt(Q). A 1-bit target is a configuration error (no zero level).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ..functional import _sum_to
from ..methods import register_method
from .common import FixedBitWeightQuantizer, code_stats, int_bits, method_args
from .lsq import LSQActQuantizer, lsq_init_step

DEFAULTS = {"sparsity_weight": 0.001, "init_dead_zone": 0.5}


class _DeadZoneQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, delta: Tensor, qmax: int, g: float) -> Tensor:
        v = w.abs() / s - delta
        k = torch.ceil(v).clamp(0, qmax)
        ctx.save_for_backward(w, s, v, k)
        ctx.qmax, ctx.g = qmax, g
        return torch.sign(w) * k * s

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, s, v, k = ctx.saved_tensors
        sat = v > ctx.qmax
        live = (v > 0) & ~sat
        sign = torch.sign(w)
        grad_w = grad.masked_fill(sat, 0.0)
        ds = torch.where(live, sign * k - w / s, torch.where(sat, sign * ctx.qmax, torch.zeros_like(w)))
        grad_s = _sum_to(grad * ds, s.shape) * ctx.g
        grad_delta = _sum_to(grad * torch.where(live, -sign * s, torch.zeros_like(w)), s.shape) * ctx.g
        return grad_w, grad_s, grad_delta, None, None


def dead_zone_quantize(w: Tensor, s: Tensor, delta: Tensor, qmax: int, g: float = 1.0) -> Tensor:
    """ŵ = sign(w)·clamp(ceil(|w|/s - δ), 0, Q)·s with the straight-through backward of the module docstring."""
    return _DeadZoneQuantize.apply(w, s, delta, int(qmax), float(g))


class CoDeQWeightQuantizer(FixedBitWeightQuantizer):
    grid_domain = "output"

    def __init__(
        self,
        weight_shape: torch.Size,
        bits: int,
        *,
        per_channel: bool = True,
        sparsity_weight: float = 0.001,
        init_dead_zone: float = 0.5,
    ):
        super().__init__(weight_shape, bits, per_channel=per_channel)
        if self.n_bits < 2:
            raise ConfigError(
                "quant.target_w: codeq needs at least 2 bits (a 1-bit grid has no zero level to prune to)"
            )
        self.qmax = 2 ** (self.n_bits - 1) - 1
        self.sparsity_weight, self.init_dead_zone = float(sparsity_weight), float(init_dead_zone)
        self.log_s = nn.Parameter(torch.full(self.param_shape, -8.0))
        self.delta = nn.Parameter(torch.full(self.param_shape, self.init_dead_zone))
        self._rate: Tensor | None = None

    @torch.no_grad()
    def calibrate_(self, w: Tensor, init_bits: float) -> None:
        s = lsq_init_step(w.abs().mean(dim=self._dims, keepdim=True), self.qmax)
        self.log_s.copy_(torch.log2(s).reshape(self.param_shape))
        self.delta.fill_(self.init_dead_zone)
        self.calibrated.fill_(True)

    def _quantize(self, w: Tensor) -> Tensor:
        g = 1.0 / math.sqrt(self.group_size * self.qmax)
        return dead_zone_quantize(w, torch.exp2(self.log_s), self.delta.abs(), self.qmax, g)

    def _train(self, w: Tensor) -> Tensor:
        out = self._quantize(w)
        self._rate = (out.abs() / torch.exp2(self.log_s).detach()).mean()
        return out

    def _to_grid_domain(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            return self._quantize(w)

    @torch.no_grad()
    def grid(self, w: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = torch.exp2(self.log_s)
        return -self.qmax * s, self.qmax * s, torch.zeros_like(s), s

    def extra_loss(self) -> Tensor:
        """λ·mean|k| of the last training forward (0 if none); clears it."""
        rate, self._rate = self._rate, None
        return self.log_s.new_zeros(()) if rate is None else self.sparsity_weight * rate

    @torch.no_grad()
    def extra_stats(self, w: Tensor) -> dict[str, float]:
        stats = code_stats(self.codes(w))
        stats["dead_zone"] = round(float(self.delta.abs().mean()), 4)
        return stats


@register_method("codeq")
def create_codeq(weight_shape, spec):
    args = method_args(spec, "codeq", DEFAULTS)
    return (
        CoDeQWeightQuantizer(weight_shape, int_bits(spec.bound_w), per_channel=spec.per_channel, **args),
        LSQActQuantizer(int_bits(spec.bound_a), signed=spec.act_signed, mse_init=True),
    )
