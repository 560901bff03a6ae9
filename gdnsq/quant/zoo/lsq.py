"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020), at the layer's fixed bit-width.

    v = clamp(x / s, -Q_n, Q_p),   x̂ = round(v)·s
    d x̂/dx = 1 inside, 0 outside;   d x̂/ds = round(v) - v inside, -Q_n / Q_p below / above
    the step's gradient is scaled by g = 1/sqrt(N·Q_p)  (N: elements sharing the step)
    init, weights: s = 2·mean|w| / sqrt(Q_p)  (the paper's)
    init, activations: the MSE step on the calibration batches (LSQ+, Bhalgat et al. 2020; Brevitas's
        ``*MSE`` quantizers), ``quant.method_args.act_mse_init: 1`` (the default); 0 = the paper's
        2·mean|x| / sqrt(Q_p)

Grids: unsigned [0, 2**b - 1] (activations after a ReLU); signed [-2**(b-1), 2**(b-1) - 1] (weights,
signed activations); signed 1-bit is the binary grid {-s, +s} (see ``common.lsq_levels``).
N is the elements per step: a channel's weights (per channel) or the tensor (per tensor); for activations
the features of one sample, as in the paper.

Choices of ours: the step is learned as ``log_s`` (s = 2**log_s), like GDNSQ's, so the shared quantizer
LR is a relative rate for every method and s stays positive; the gradient reaching s is LSQ's (times g),
the chain rule then multiplies it by s·ln 2. Activation steps start where they fit the calibration data,
as a user of a QAT library gets them: post-ReLU inputs are mostly zeros and small values with a long tail,
and the paper's rule (from mean|x|, derived for weights) puts the 2-bit clip at ~3.5·mean|x| whatever the
tail. The two inits measured side by side: docs/results.md, "Decisions".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..methods import register_method
from .common import (
    FixedBitActQuantizer,
    FixedBitWeightQuantizer,
    int_bits,
    lsq_grid,
    lsq_levels,
    lsq_quantize,
    method_args,
    mse_clip,
)


def lsq_init_step(abs_mean: Tensor, qp: int) -> Tensor:
    return (2.0 * abs_mean / math.sqrt(qp)).clamp_min(1e-8)


class LSQWeightQuantizer(FixedBitWeightQuantizer):
    """Signed LSQ grid on the weights; ``log_s`` of shape (C, 1, ...) per channel or (1, ...) per tensor."""

    def __init__(self, weight_shape: torch.Size, bits: int, *, per_channel: bool = True):
        super().__init__(weight_shape, bits, per_channel=per_channel)
        self.qn, self.qp, self.binary = lsq_levels(self.n_bits, signed=True)
        self.log_s = nn.Parameter(torch.full(self.param_shape, -8.0))

    @property
    def grad_scale(self) -> float:
        return 1.0 / math.sqrt(self.group_size * self.qp)

    @torch.no_grad()
    def calibrate_(self, w: Tensor, init_bits: float) -> None:
        s = lsq_init_step(w.abs().mean(dim=self._dims, keepdim=True), self.qp)
        self.log_s.copy_(torch.log2(s).reshape(self.param_shape))
        self.calibrated.fill_(True)

    def _train(self, w: Tensor) -> Tensor:
        return lsq_quantize(w, torch.exp2(self.log_s), self.qn, self.qp, self.binary, self.grad_scale)

    @torch.no_grad()
    def grid(self, w: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return lsq_grid(torch.exp2(self.log_s), self.qn, self.qp, self.binary)


def lsq_mse_step(x: Tensor, qn: int, qp: int, binary: bool) -> Tensor:
    """The step whose LSQ grid fits ``x`` best in mean squared error (``common.mse_clip``), searched from the
    step at which the grid's shorter side reaches max|x| down to 1 % of it."""
    top = x.abs().amax().clamp_min(1e-8) / min(q for q in (qn, qp) if q > 0)
    return mse_clip(x, lambda s: lsq_grid(s, qn, qp, binary), top)


class LSQActQuantizer(FixedBitActQuantizer):
    """Per-tensor LSQ on activations; unsigned or signed grid decided at calibration.

    ``mse_init``: the step starts at the MSE fit of the calibration values (else the paper's rule)."""

    def __init__(self, bits: int, *, signed: str = "auto", mse_init: bool = False):
        super().__init__(bits, signed=signed)
        self.mse_init = bool(mse_init)
        self.log_s = nn.Parameter(torch.tensor(-8.0))

    def levels(self) -> tuple[int, int, bool]:
        return lsq_levels(self.n_bits, signed=bool(self.is_signed))

    def _init_from_observers(self, signed: bool) -> None:
        qn, qp, binary = lsq_levels(self.n_bits, signed)
        if self.mse_init:
            s = lsq_mse_step(self.calib_sample(), qn, qp, binary)
        else:
            s = lsq_init_step(self.obs_abs_mean, qp)
        self.log_s.copy_(torch.log2(s))

    def _train(self, x: Tensor) -> Tensor:
        qn, qp, binary = self.levels()
        g = 1.0 / math.sqrt(max(1, x[0].numel()) * qp)
        return lsq_quantize(x, torch.exp2(self.log_s), qn, qp, binary, g)

    @torch.no_grad()
    def grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return lsq_grid(torch.exp2(self.log_s), *self.levels())

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}, mse_init={self.mse_init}"


@register_method("lsq")
def create_lsq(weight_shape, spec):
    args = method_args(spec, "lsq", {"act_mse_init": 1.0})
    return (
        LSQWeightQuantizer(weight_shape, int_bits(spec.bound_w), per_channel=spec.per_channel),
        LSQActQuantizer(int_bits(spec.bound_a), signed=spec.act_signed, mse_init=bool(args["act_mse_init"])),
    )
