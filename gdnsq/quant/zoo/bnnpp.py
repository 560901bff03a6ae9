"""BNN++ (Lu et al., NeurIPS 2023, ProxConnect++): binarisation with a forward proximal quantizer annealed
towards sign and its matching backward, for W1A1.

PC++ pairs a forward quantizer F_μ with a backward quantizer B_μ; BNN++ replaces BNN+'s sign forward by
the sign-Swish function, whose own derivative is the backward (a "matching" pair: the gradient is exact
for the forward actually computed). With β = 1/μ::

    SS_β(u) = 2·σ(βu)·(1 + βu·(1 - σ(βu))) - 1         SS_β'(0) = β,  SS_β -> sign as β -> ∞

Weights (α = mean|w| per output channel, or per tensor; differentiable)::

    ŵ = α · SS_β(w / α)                                 training
    ŵ = α · sign(w)   (codes round((clamp(w, -α, α) + α) / 2α), so w = 0 -> -α)     eval

Activations: two levels {c - h, c + h}: {0, a} for unsigned inputs (c = h = a/2), {-a, a} for signed ones
(c = 0, h = a), with a = 2**log_a learnable (init 2·mean|x| unsigned, mean|x| signed)::

    x̂ = c + h · SS_β((x - c) / h)   training;          x̂ = c + h·sign(x - c) on the grid   eval

Annealing (our schedule; the paper's exact one is not reproduced): β(p) = β0·(β1/β0)^min(1, p/ramp_end),
geometric from β0 = 1 (≈ identity near 0: training starts from the FP model) to β1 = 200 (≈ sign: within
1 % of it for |u| > 0.025) at half the budget, with p the training progress from ``set_progress``;
``quant.method_args``: beta_start, beta_end, ramp_end. The gap between the soft training forward and
the hard eval forward is what costs accuracy; the defaults were set in short runs on the bundled digits
(docs/results.md, "Decisions"). Without a driver β = β1. Only 1-bit targets: other targets
are a configuration error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ..methods import register_method
from .common import FixedBitActQuantizer, FixedBitWeightQuantizer, int_bits, method_args

DEFAULTS = {"beta_start": 1.0, "beta_end": 200.0, "ramp_end": 0.5}


def sign_swish(u: Tensor, beta: float) -> Tensor:
    """SS_β(u) = 2σ(βu)(1 + βu(1 - σ(βu))) - 1; autograd gives its exact derivative (the matching backward)."""
    bu = beta * u
    sig = torch.sigmoid(bu)
    return 2.0 * sig * (1.0 + bu * (1.0 - sig)) - 1.0


def annealed_beta(progress: float, beta_start: float, beta_end: float, ramp_end: float) -> float:
    p = min(1.0, max(0.0, progress) / ramp_end) if ramp_end > 0 else 1.0
    return beta_start * (beta_end / beta_start) ** p


def proximal_binarize(x: Tensor, a: Tensor, signed: bool, beta: float) -> Tensor:
    """x̂ = c + h·SS_β((x - c)/h): levels {0, a} (c = h = a/2) or, signed, {-a, a} (c = 0, h = a)."""
    c, h = (a * 0, a) if signed else (a / 2, a / 2)
    return c + h * sign_swish((x - c) / h, beta)


class _Annealed:
    def _init_anneal(self, beta_start: float, beta_end: float, ramp_end: float) -> None:
        self.beta_start, self.beta_end, self.ramp_end = float(beta_start), float(beta_end), float(ramp_end)
        self.beta = self.beta_end

    def set_progress(self, fraction: float) -> None:
        self.beta = annealed_beta(fraction, self.beta_start, self.beta_end, self.ramp_end)


class BNNppWeightQuantizer(_Annealed, FixedBitWeightQuantizer):
    def __init__(self, weight_shape: torch.Size, *, per_channel: bool = True, **anneal):
        super().__init__(weight_shape, 1, per_channel=per_channel)
        self._init_anneal(**anneal)

    def _alpha(self, w: Tensor) -> Tensor:
        return w.abs().mean(dim=self._dims, keepdim=True).clamp_min(1e-12)

    def _train(self, w: Tensor) -> Tensor:
        alpha = self._alpha(w)
        return alpha * sign_swish(w / alpha, self.beta)

    def grid(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alpha = self._alpha(w.detach())
        return -alpha, alpha, -alpha, 2 * alpha


class BNNppActQuantizer(_Annealed, FixedBitActQuantizer):
    def __init__(self, *, signed: str = "auto", **anneal):
        super().__init__(1, signed=signed)
        self._init_anneal(**anneal)
        self.log_a = nn.Parameter(torch.tensor(0.0))

    def _init_from_observers(self, signed: bool) -> None:
        m = self.obs_abs_mean.clamp_min(1e-6)
        self.log_a.copy_(torch.log2(m if signed else 2 * m))

    def _train(self, x: Tensor) -> Tensor:
        return proximal_binarize(x, torch.exp2(self.log_a), bool(self.is_signed), self.beta)

    @torch.no_grad()
    def grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        a = torch.exp2(self.log_a)
        if bool(self.is_signed):
            return -a, a, -a, 2 * a
        return a * 0, a, a * 0, a


@register_method("bnnpp")
def create_bnnpp(weight_shape, spec):
    args = method_args(spec, "bnnpp", DEFAULTS)
    if int_bits(spec.bound_w) != 1 or int_bits(spec.bound_a) != 1:
        raise ConfigError(
            f"quant.method: bnnpp binarises weights and activations (W1A1); got target "
            f"W{spec.bound_w:g}A{spec.bound_a:g}"
        )
    return (
        BNNppWeightQuantizer(weight_shape, per_channel=spec.per_channel, **args),
        BNNppActQuantizer(signed=spec.act_signed, **args),
    )
