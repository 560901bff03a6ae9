"""PEGE: Progressive Element-wise Gradient Estimation (Zhao, arXiv 2509.00097), as far as its abstract goes.

The abstract states two things; each is implemented here, every detail beyond it is our assumption:

1. "progressively replaces full-precision weights and activations with their quantized counterparts via a
   logarithmic curriculum-driven mixed-precision replacement strategy". Ours: an element is replaced by
   its quantized value with ratio r(p) (p = training progress in [0, 1], given by the engine through
   ``set_progress``)::

       r(p) = log10(1 + 9·min(1, p / ramp_end))    r(0) = 0, r(ramp_end) = 1 (log-shaped: fast, then slow)
       out  = where(m, Q(x), x)                     m: per-element replacement mask

   Weights: m = (u < r) with a fixed per-element priority u ~ U(0, 1) (a buffer), so replacement is
   progressive: once quantized, an element stays quantized. Activations: m ~ Bernoulli(r) per element
   and forward pass (no element identity across batches). FP elements get the exact gradient (identity),
   quantized ones Q's straight-through gradient. Without a curriculum driver r = 1 (plain Q); eval is
   always the full quantizer Q on its integer grid. ``ramp_end`` = ``quant.method_args.ramp_end`` (0.8):
   the last 20 % of the budget trains fully quantized.
2. "formulates QAT as a co-optimization problem that simultaneously minimizes the task loss ... and the
   discretization error". Ours: every PEGE quantizer adds, through ``extra_loss()``::

       λ · mean((x - x̄)²) / sg(mean(x²)),   x̄ = z + s·sg(q),   q = round((clamp(x, lo, hi) - z) / s)

   the whole discretization error (rounding and clipping) relative to the tensor's power, over all
   elements (not only the replaced ones; sg = stop-gradient): it pulls x towards its level and fits the
   step s to x (an MSE-optimal step). Relative, so one λ fits every layer and bit-width; clipping is
   included because without it shrinking s until everything clips is a zero-error optimum (a rounding-only
   version did exactly that; docs/results.md, "Decisions"). Applied to weights and
   activations alike; λ = ``quant.method_args.error_weight`` (0.1).

The forward quantizer Q: the abstract says PEGE works with any forward method; we use LSQ's
(``lsq.py``: learned step, gradient scale, same grids, the same MSE init of the activation steps), so
``pege`` vs ``lsq`` isolates PEGE's part.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..methods import register_method
from .common import int_bits, lsq_grid, method_args
from .lsq import LSQActQuantizer, LSQWeightQuantizer

DEFAULTS = {"error_weight": 0.1, "ramp_end": 0.8}


def replacement_ratio(progress: float, ramp_end: float) -> float:
    """r(p) = log10(1 + 9·min(1, p/ramp_end)): 0 at the start, 1 from ``ramp_end`` on."""
    p = min(1.0, max(0.0, progress) / ramp_end) if ramp_end > 0 else 1.0
    return math.log10(1.0 + 9.0 * p)


def discretization_error(x: Tensor, lo: Tensor, hi: Tensor, z: Tensor, s: Tensor) -> Tensor:
    """mean((x - x̄)²) / sg(mean(x²)),  x̄ = z + s·sg(q),  q = round((clamp(x, lo, hi) - z)/s).

    The whole discretization error (rounding and clipping) relative to the tensor's power; differentiable
    in x, z and s (the codes q and the normaliser are held).
    """
    with torch.no_grad():
        q = torch.round((torch.minimum(torch.maximum(x, lo), hi) - z) / s)
        power = x.square().mean().clamp_min(1e-12)
    return (x - (z + s * q)).square().mean() / power


class _PEGEMixin:
    """Curriculum state and the discretization-error term, shared by the weight and activation quantizers."""

    def _init_pege(self, error_weight: float, ramp_end: float) -> None:
        self.error_weight, self.ramp_end = float(error_weight), float(ramp_end)
        self.ratio = 1.0
        self._error: Tensor | None = None

    def set_progress(self, fraction: float) -> None:
        self.ratio = replacement_ratio(fraction, self.ramp_end)

    def _pege(self, x: Tensor, q: Tensor, grid: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        self._error = discretization_error(x, *grid) if self.error_weight > 0 else None
        return torch.where(mask, q, x)

    def extra_loss(self) -> Tensor:
        """λ · the discretization error of the last training forward (0 when there was none); clears it."""
        err, self._error = self._error, None
        return self.log_s.new_zeros(()) if err is None else self.error_weight * err


class PEGEWeightQuantizer(_PEGEMixin, LSQWeightQuantizer):
    def __init__(
        self,
        weight_shape: torch.Size,
        bits: int,
        *,
        per_channel: bool = True,
        error_weight: float = 0.1,
        ramp_end: float = 0.8,
    ):
        super().__init__(weight_shape, bits, per_channel=per_channel)
        self._init_pege(error_weight, ramp_end)
        self.register_buffer("priority", torch.rand(weight_shape))

    def _train(self, w: Tensor) -> Tensor:
        q = super()._train(w)
        s = torch.exp2(self.log_s)
        return self._pege(w, q, lsq_grid(s, self.qn, self.qp, self.binary), self.priority < self.ratio)


class PEGEActQuantizer(_PEGEMixin, LSQActQuantizer):
    def __init__(
        self,
        bits: int,
        *,
        signed: str = "auto",
        error_weight: float = 0.1,
        ramp_end: float = 0.8,
        mse_init: bool = False,
    ):
        super().__init__(bits, signed=signed, mse_init=mse_init)
        self._init_pege(error_weight, ramp_end)

    def _train(self, x: Tensor) -> Tensor:
        q = super()._train(x)
        s = torch.exp2(self.log_s)
        mask = torch.rand_like(x) < self.ratio
        return self._pege(x, q, lsq_grid(s, *self.levels()), mask)


@register_method("pege")
def create_pege(weight_shape, spec):
    args = method_args(spec, "pege", DEFAULTS)
    return (
        PEGEWeightQuantizer(weight_shape, int_bits(spec.bound_w), per_channel=spec.per_channel, **args),
        PEGEActQuantizer(int_bits(spec.bound_a), signed=spec.act_signed, mse_init=True, **args),
    )
