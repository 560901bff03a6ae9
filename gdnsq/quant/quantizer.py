"""Quantizer modules: the one interface every quantizer speaks, and GDNSQ's learnable-bit quantizers.

``Quantizer`` declares what quantized layers, surgery, the objective, the engine and export rely on;
GDNSQ's ``WeightQuantizer`` / ``ActivationQuantizer`` (learnable log-step, clamps) and every zoo
quantizer (``zoo.common``) derive from it.
GDNSQ's quantizers also report ``min_levels(...)`` (the fewest levels of any channel; < 2 is a dead,
constant grid, whose ``true_bits`` reads 0) and apply the level guard ``keep_levels_(min_bits, ...)``
(a projection of log_s so that b >= min_bits). Their training forward is the registered ops of ``ops.py`` (one
kernel each way; ``quant.fused: false``: the reference torch graph), with the random draws keyed by the
``rng_key`` buffer; eval is the exact grid in plain torch ops (exportable).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as F
from .autograd import QuantizeActivation, QuantizeWeight
from .dither import new_state, next_key_
from .methods import register_method

# Floor of log2 of a grid step or clip width kept by the level guard: below float32's resolution at unit
# scale a grid is numerically meaningless (2**-149 underflows, and the level count turns into NaN).
LOG2_FLOOR = -24.0


class Quantizer(nn.Module):
    """What every quantizer provides. Weight quantizers take the weight ``w`` as the first argument of
    ``bits`` / ``true_bits`` / ``grid`` / ``calibrate_`` / ``extra_stats``; activation quantizers take none.

    * ``forward(x)``: fake-quantized x (training forward in train mode, the exact grid in eval);
    * ``bits(...)``: the bit-width as a tensor (per channel or scalar); differentiable iff ``learnable_bits``;
    * ``true_bits(...)``: the storage bit-width, an int;
    * ``grid(...)``: (lo, hi, z, s) of the eval grid, for export and integer inference;
    * ``observing`` (activation quantizers record min/max while set) then ``calibrate_(..., init_bits)``;
    * ``enabled`` (False: identity), ``noise_ratio`` (set by the engine; GDNSQ's noisy channel only);
    * optional hooks with no-op defaults: ``extra_loss()``, ``set_progress(fraction)``, ``extra_stats(...)``;
    * ``uses_ops``: True when its training forward is GDNSQ's registered ops (``ops.py``), so a quantized layer may
      run it inside one autograd node with the convolution (``autograd.QuantizedLayer``).
    """

    uses_ops: bool = False

    learnable_bits: bool = False
    """True when ``bits()`` is learned, so the objective's exterior-point penalty constrains it (GDNSQ)."""
    grid_domain: str = "input"
    """``input``: ``grid()`` applies to the raw input; ``output``: to the eval output (a non-affine map first)."""

    def __init__(self):
        super().__init__()
        self.noise_ratio = 0.0
        self.observing = False
        self.enabled = True
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def bits(self, *w: Tensor) -> Tensor:
        raise NotImplementedError

    def true_bits(self, *w: Tensor) -> int:
        raise NotImplementedError

    def grid(self, *w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def calibrate_(self, *args) -> None:
        raise NotImplementedError

    def extra_loss(self) -> Tensor | None:
        """A scalar added to the training loss (e.g. PACT's L2 on α), or None for no term."""
        return None

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1], for curricula and annealing (PEGE, BNN++)."""

    def extra_stats(self, *w: Tensor) -> dict[str, float]:
        """Method-specific figures for the bits table (e.g. CoDeQ's sparsity)."""
        return {}


def op_dtype(t: Tensor) -> torch.dtype:
    """The dtype a quantizer hands to its layer: autocast's where autocast is on (the op rounds to it once, in the
    same kernel), else the input's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _GDNSQQuantizer(Quantizer):
    """GDNSQ's learnable-bit quantizers: the noisy channel's estimator and delta, and the key state of its random
    draws (``rng_key``, int64 buffer: see ``dither.py``; saved in checkpoints, advanced by every training forward)."""

    learnable_bits = True
    fused: bool = True
    """Training forward by the registered ops (one kernel each way); False: the reference torch graph of
    ``functional.noisy_quantize`` (same draws, same values). ``quant.fused``."""

    def __init__(self, *, estimator: str = "ste", delta: float = 1e-2, integer_grid: bool = False):
        super().__init__()
        self.estimator = estimator
        self.delta = delta
        self.integer_grid = integer_grid
        self.register_buffer("rng_key", new_state())

    @property
    def uses_ops(self) -> bool:
        return self.fused and self.enabled and self.training and not self.observing

    def extra_repr(self) -> str:
        return f"estimator={self.estimator}" + (", integer_grid=True" if self.integer_grid else "")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the key state existed: keep this quantizer's own (freshly drawn) key.
        state_dict.setdefault(prefix + "rng_key", self.rng_key.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WeightQuantizer(_GDNSQQuantizer):
    """Weights: range from the weights themselves, z = min(w), learnable step per channel or tensor.

    ``integer_grid``: z = s·round(min(w)/s) instead, so every grid point is an integer × s (int8 codes, zero point
    0), with the top clamped so the level count stays round(range/s) + 1 (``functional.integer_weight_grid``).

    ``log_s`` has shape (C_out, 1, ..., 1) per channel or (1,) * w.dim() per tensor.
    """

    def __init__(self, weight_shape: torch.Size, *, per_channel: bool = True, **kw):
        super().__init__(**kw)
        self.per_channel = per_channel
        shape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1) if per_channel else (1,) * len(weight_shape)
        self.log_s = nn.Parameter(torch.full(shape, -8.0))
        self._cache: tuple | None = None

    def _range(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel (or per-tensor) min and max of w, shaped like log_s (``functional.channel_range``).

        Cached for the penalty of the same step, keyed on the weight's version counter so an optimizer
        step invalidates it.
        """
        if self._cached(w):
            return self._cache[1]
        lo, hi = F.channel_range(w, self.log_s.shape[0], sparse_grad=self.fused)
        rng = (lo.reshape(self.log_s.shape), hi.reshape(self.log_s.shape))
        self._cache = (self._key(w), rng)
        return rng

    @staticmethod
    def _key(w: Tensor) -> tuple:
        return id(w), w._version, torch.is_grad_enabled()

    def _cached(self, w: Tensor) -> bool:
        return self._cache is not None and self._cache[0] == self._key(w)

    def __getstate__(self):
        # The cache holds autograd graph nodes, which neither deepcopy nor pickle accept.
        return {**self.__dict__, "_cache": None}

    @torch.no_grad()
    def calibrate_(self, w: Tensor, init_bits: float) -> None:
        lo, hi = self._range(w)
        span = (hi - lo).clamp_min(1e-8)
        # b_w = log2(span + s) - log2(s) == init_bits  <=>  s = span / (2**init_bits - 1)
        self.log_s.copy_(torch.log2(span / (2.0**init_bits - 1.0)).reshape(self.log_s.shape))
        self.calibrated.fill_(True)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        if self.uses_ops:
            # One kernel for range and rounding; the range is cached for the penalty of the same step.
            out, lo, hi = QuantizeWeight.apply(
                w, self.log_s, self.rng_key, self.estimator, self.delta, self.noise_ratio, op_dtype(w),
                self.integer_grid,
            )  # fmt: skip
            self._cache = (self._key(w), (lo.reshape(self.log_s.shape), hi.reshape(self.log_s.shape)))
            return out
        lo, hi = self._range(w)
        clamp_lo, clamp_hi, z = self._clamp(lo, hi)
        if self.training:
            return F.noisy_quantize(
                w,
                clamp_lo,
                clamp_hi,
                z,
                torch.exp2(self.log_s),
                estimator=self.estimator,
                delta=self.delta,
                noise_ratio=self.noise_ratio,
                key=next_key_(self.rng_key),
            )
        return F.exact_quantize(w, clamp_lo, clamp_hi, z, torch.exp2(self.log_s))

    def _clamp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(clamp lo, clamp hi, z): the float grid skips the clamp, a no-op for weights (range = [min, max])."""
        if not self.integer_grid:
            return None, None, lo.detach()
        z, top = F.integer_weight_grid(lo, hi, torch.exp2(self.log_s))
        return lo.detach(), top, z

    def bits(self, w: Tensor) -> Tensor:
        lo, hi = self._range(w)
        return F.weight_bits(hi - lo, self.log_s)

    @torch.no_grad()
    def levels(self, w: Tensor) -> Tensor:
        lo, hi = self._range(w)
        return F.grid_levels(hi - lo, torch.exp2(self.log_s))

    @torch.no_grad()
    def true_bits(self, w: Tensor) -> int:
        return int(F.true_bits(self.levels(w)).max().item())

    @torch.no_grad()
    def min_levels(self, w: Tensor) -> int:
        return int(self.levels(w).min().item())

    @torch.no_grad()
    def keep_levels_(self, min_bits: float, w: Tensor) -> None:
        """Project log_s so every channel keeps b_w >= min_bits: s <= range / (2**min_bits - 1)."""
        lo, hi = self._range(w)
        cap = torch.log2((hi - lo).clamp_min(1e-12)) - math.log2(2.0**min_bits - 1.0)
        self.log_s.copy_(torch.minimum(self.log_s, cap).clamp_min(LOG2_FLOOR))

    @torch.no_grad()
    def cap_levels_(self, max_bits: float, w: Tensor) -> None:
        """Project log_s so no channel has b_w > max_bits: s >= range / (2**max_bits - 1)."""
        lo, hi = self._range(w)
        floor = torch.log2((hi - lo).clamp_min(1e-12)) - math.log2(2.0**max_bits - 1.0)
        self.log_s.copy_(torch.maximum(self.log_s, floor))

    @torch.no_grad()
    def grid(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lo, hi = self._range(w)
        clamp_lo, clamp_hi, z = self._clamp(lo, hi)
        return (lo, hi, lo, torch.exp2(self.log_s)) if clamp_lo is None else (clamp_lo, clamp_hi, z, self.log_s.exp2())


def decide_signed(signed_mode: str, observed_min: Tensor) -> bool:
    """``signed``/``unsigned`` as configured; ``auto`` = signed iff calibration saw a negative input."""
    return {"signed": True, "unsigned": False}.get(signed_mode, bool(observed_min < 0))


class ActivationQuantizer(_GDNSQQuantizer):
    """Activations: per-tensor step s, clamp [lo, lo + 2**log_q - s], z = lo.

    ``lo`` is learnable for signed inputs and fixed at 0 for non-negative ones (after a ReLU);
    ``signed='auto'`` decides from the calibration minimum. ``integer_grid``: the grid's lo (= z) is the learned lo
    moved to a whole number of steps, straight-through (``functional.snap_to_step``; 0 after a ReLU stays 0).
    """

    def __init__(self, *, signed: str = "auto", **kw):
        super().__init__(**kw)
        self.signed_mode = signed
        self.log_s = nn.Parameter(torch.tensor(-8.0))
        self.log_q = nn.Parameter(torch.tensor(0.0))
        self.lo = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("signed", torch.tensor(signed == "signed"))
        self.register_buffer("obs_min", torch.tensor(math.inf))
        self.register_buffer("obs_max", torch.tensor(-math.inf))

    def _bounds(self) -> tuple[Tensor, Tensor, Tensor]:
        # Unsigned inputs keep lo frozen at its calibrated 0 (requires_grad off), so no data-dependent
        # branch is needed here, which keeps the eval graph exportable.
        return F.activation_grid(self.log_s, self.log_q, self.grid_lo())

    def grid_lo(self) -> Tensor:
        """The grid's lower bound and offset: ``lo``, or under ``integer_grid`` lo snapped to a multiple of s."""
        return F.snap_to_step(self.lo, torch.exp2(self.log_s)) if self.integer_grid else self.lo

    @torch.no_grad()
    def calibrate_(self, init_bits: float) -> None:
        if not torch.isfinite(self.obs_min):
            raise RuntimeError("activation quantizer saw no calibration data")
        signed = decide_signed(self.signed_mode, self.obs_min)
        self.signed.fill_(signed)
        lo = self.obs_min if signed else torch.zeros_like(self.obs_min)
        span = (self.obs_max - lo).clamp_min(1e-6)
        s = span / (2.0**init_bits - 1.0)
        self.lo.copy_(lo)
        self.log_s.copy_(torch.log2(s))
        self.log_q.copy_(torch.log2(span + s))  # b_a = log_q - log_s == init_bits
        self.lo.requires_grad_(signed)
        self.calibrated.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.obs_min.copy_(torch.minimum(self.obs_min, x.detach().min()))
            self.obs_max.copy_(torch.maximum(self.obs_max, x.detach().max()))
            return x
        if not self.enabled:
            return x
        if self.uses_ops:
            return QuantizeActivation.apply(
                x,
                self.log_s,
                self.log_q,
                self.grid_lo(),
                self.rng_key,
                self.estimator,
                self.delta,
                self.noise_ratio,
                op_dtype(x),
            )
        lo, hi, s = self._bounds()
        if self.training:
            return F.noisy_quantize(
                x,
                lo,
                hi,
                lo,
                s,
                estimator=self.estimator,
                delta=self.delta,
                noise_ratio=self.noise_ratio,
                key=next_key_(self.rng_key),
            )
        return F.exact_quantize(x, lo, hi, lo, s)

    def bits(self) -> Tensor:
        return F.activation_bits(self.log_q, self.log_s)

    @torch.no_grad()
    def levels(self) -> Tensor:
        lo, hi, s = self._bounds()
        return F.grid_levels(hi - lo, s)

    @torch.no_grad()
    def true_bits(self) -> int:
        return int(F.true_bits(self.levels()).item())

    @torch.no_grad()
    def min_levels(self) -> int:
        return int(self.levels().item())

    @torch.no_grad()
    def keep_levels_(self, min_bits: float) -> None:
        """Project log_s so that b_a = log_q - log_s >= min_bits (hence also hi > lo)."""
        self.log_q.clamp_(min=LOG2_FLOOR + min_bits)
        self.log_s.copy_(torch.minimum(self.log_s, self.log_q - min_bits).clamp_min(LOG2_FLOOR))

    @torch.no_grad()
    def cap_levels_(self, max_bits: float) -> None:
        """Project log_s so that b_a = log_q - log_s <= max_bits."""
        self.log_s.copy_(torch.maximum(self.log_s, self.log_q - max_bits))

    @torch.no_grad()
    def grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lo, hi, s = self._bounds()
        return lo, hi, lo, s

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The lower bound only trains for signed inputs; restore that after loading a checkpoint.
        self.lo.requires_grad_(bool(self.signed))


def resolve_estimator(estimator: str, target: float) -> str:
    """``auto``: adaptive EWGS on a 1-bit grid (the reference's W1A1 setting, ahead of ste there), the
    straight-through estimator elsewhere (the fused kernels' path; no worse than aewgs at 2 bits and up). The
    measurements: docs/results.md, "Decisions". Any other name is kept."""
    if estimator != "auto":
        return estimator
    return "aewgs" if target <= 1 else "ste"


@register_method("gdnsq")
def create_gdnsq(weight_shape: torch.Size, spec) -> tuple[WeightQuantizer, ActivationQuantizer]:
    integer = getattr(spec, "integer_grid", False)  # specs pickled before the option existed
    return (
        WeightQuantizer(
            weight_shape,
            per_channel=spec.per_channel,
            delta=spec.delta,
            estimator=resolve_estimator(spec.estimator, spec.bound_w),
            integer_grid=integer,
        ),
        ActivationQuantizer(
            signed=spec.act_signed,
            delta=spec.delta,
            estimator=resolve_estimator(spec.estimator, spec.bound_a),
            integer_grid=integer,
        ),
    )
