"""What the zoo's fixed-bit methods share: STE pieces, uniform grids, base modules, code statistics.

Every zoo quantizer derives from ``gdnsq.quant.quantizer.Quantizer`` (``forward``, ``bits``, ``true_bits``,
``grid``, ``calibrate_``, ``observing`` / ``enabled``) with ``learnable_bits = False``: its bit-width is the
layer's target, ceil'd to an integer, so the exterior-point penalty ignores it and ``bits()`` /
``true_bits()`` only report it.

Grids. In eval every zoo quantizer outputs ``x̂ = q·s + z`` with integer codes
``q = round((clamp(x, lo, hi) - z) / s)`` and ``(lo, hi, z, s) = grid(...)``, computed by
``functional.exact_quantize`` itself, so fake-quantized eval equals integer inference. The grid applies
to the quantizer's *input* (``grid_domain = "input"``: export can pack raw weights) except where a method
maps the weight non-affinely first (DoReFa's tanh, CoDeQ's dead zone; ``grid_domain = "output"``): there
the grid describes the eval output, and ``integer_codes(eval_forward(w), *grid(w))`` gives the codes.

The base's optional hooks (no-op by default) are what some zoo methods add: ``extra_loss()`` (a scalar added
to the training loss), ``set_progress(fraction)`` (training progress in [0, 1], for curricula and
annealing) and ``extra_stats(...)`` (a dict shown in the bits table).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...errors import ConfigError
from .. import functional as F
from ..quantizer import Quantizer, decide_signed

# ------------------------------------------------------------------------------------ STE pieces


class _RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class _GradScale(torch.autograd.Function):
    """Identity forward (bit-exact), gradient times ``scale`` backward: LSQ's gradient scaling."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.scale, None


def round_ste(x: Tensor) -> Tensor:
    return _RoundSTE.apply(x)


def grad_scale(x: Tensor, scale: float) -> Tensor:
    return _GradScale.apply(x, float(scale))


def fake_quant_ste(x: Tensor, lo: Tensor, hi: Tensor, z: Tensor, s: Tensor) -> Tensor:
    """x̂ = z + s·round_ste((clamp(x, lo, hi) - z) / s), differentiable in x, lo, hi, z and s.

    The forward values equal ``functional.exact_quantize(x, lo, hi, z, s)`` bit for bit. Backward:
    d x̂/dx = 1 inside [lo, hi], 0 outside; d x̂/ds = round(v) - v inside (v = (x - z)/s), the LSQ step
    gradient; clamped elements pass their gradient to lo / hi (and, through them, to the step).
    """
    xc = torch.minimum(torch.maximum(x, lo), hi)
    return round_ste((xc - z) / s) * s + z


def int_bits(target: float) -> int:
    """A fixed-bit method's bit-width for a (possibly fractional) layer target: ceil, at least 1."""
    return max(1, math.ceil(float(target) - 1e-9))


def range_grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uniform grid of 2**bits levels spanning [lo, hi] exactly: (lo, hi, z = lo, s = (hi - lo)/(2**bits - 1))."""
    return lo, hi, lo, (hi - lo) / (2**bits - 1)


def lsq_levels(bits: int, signed: bool) -> tuple[int, int, bool]:
    """LSQ's code range (Q_n, Q_p) and whether the grid is binary.

    Unsigned: [0, 2**b - 1]. Signed: [-2**(b-1), 2**(b-1) - 1] for b >= 2; for b = 1 that range would be
    {-1, 0}, so signed 1-bit uses the binary grid {-s, +s} instead (Q_n = Q_p = 1 in LSQ's formulas).
    """
    if not signed:
        return 0, 2**bits - 1, False
    if bits == 1:
        return 1, 1, True
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1, False


def lsq_grid(s: Tensor, qn: int, qp: int, binary: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lo, hi, z, step) of LSQ's grid with step s: {-Q_n..Q_p}·s, or {-s, +s} (z = -s, step 2s) if binary."""
    if binary:
        return -s, s, -s, 2 * s
    return -qn * s, qp * s, torch.zeros_like(s), s


def lsq_quantize(x: Tensor, s: Tensor, qn: int, qp: int, binary: bool, g: float) -> Tensor:
    """LSQ fake quantization (Esser et al. 2020) with the step's gradient scaled by g = 1/sqrt(N·Q_p).

    d x̂/dx: 1 inside the grid's range, 0 outside; d x̂/ds (before scaling by g): round(v) - v inside,
    -Q_n / +Q_p below / above (binary: sign(x) - x/s inside, ±1 outside).
    """
    return fake_quant_ste(x, *lsq_grid(grad_scale(s, g), qn, qp, binary))


# ------------------------------------------------------------------------------------ initialisation

# Calibration keeps at most this many values of each batch an activation quantizer observes: a strided
# subsample (no RNG draw, so a run's random stream does not depend on it) for the inits that need the values
# themselves, not only their range (the MSE clip below).
CALIB_SAMPLE = 1 << 16


@torch.no_grad()
def mse_clip(x: Tensor, grid_of, top: Tensor, candidates: int = 100) -> Tensor:
    """The clip c in {top·k/candidates, k = 1..candidates} whose grid ``grid_of(c)`` = (lo, hi, z, s) gives the
    least mean((Q(x) - x)²) on ``x``: the MSE initialisation of Brevitas's ``*MSE`` quantizers and LSQ+
    (Bhalgat et al. 2020), which start a learned range where it already fits the data rather than at a rule
    of thumb. The first of equal errors (the smallest clip) wins."""
    best, best_err = top, math.inf
    for k in range(1, candidates + 1):
        c = top * (k / candidates)
        err = float((F.exact_quantize(x, *grid_of(c)) - x).square().mean())
        if err < best_err:
            best, best_err = c, err
    return best


# ------------------------------------------------------------------------------------ statistics


@torch.no_grad()
def code_stats(codes: Tensor) -> dict[str, float]:
    """Sparsity (share of zero codes), entropy of the code histogram, and log2 of the levels used, in bits."""
    values, counts = torch.unique(codes.reshape(-1), return_counts=True)
    p = counts.double() / counts.sum()
    entropy = float(-(p * torch.log2(p)).sum())
    zero = counts[values == 0].sum() if (values == 0).any() else counts.new_zeros(())
    return {
        "sparsity": round(float(zero) / codes.numel(), 4),
        "entropy_bits": round(abs(entropy), 4),
        "used_bits": round(math.log2(max(1, values.numel())), 4),
    }


# ------------------------------------------------------------------------------------ base modules


class FixedBitQuantizer(Quantizer):
    """What every zoo quantizer adds to the base: its fixed bit-width (``learnable_bits`` stays False)."""

    def __init__(self, bits: int):
        super().__init__()
        self.n_bits = int(bits)

    def bits(self, w: Tensor | None = None) -> Tensor:
        """The fixed bit-width as a (scalar) tensor, for the bits table; not a penalty term."""
        return self.calibrated.new_tensor(float(self.n_bits), dtype=torch.float32)

    def true_bits(self, w: Tensor | None = None) -> int:
        return self.n_bits

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}"


class FixedBitWeightQuantizer(FixedBitQuantizer):
    """Weights: per output channel (``per_channel``) or per tensor; subclasses give ``_train`` and ``grid``."""

    def __init__(self, weight_shape: torch.Size, bits: int, *, per_channel: bool = True):
        super().__init__(bits)
        self.per_channel = per_channel
        self.param_shape = (
            (weight_shape[0],) + (1,) * (len(weight_shape) - 1) if per_channel else (1,) * len(weight_shape)
        )
        self._dims = tuple(range(1, len(weight_shape))) if per_channel else tuple(range(len(weight_shape)))
        self.group_size = math.prod(weight_shape) // math.prod(self.param_shape)  # elements per step

    def calibrate_(self, w: Tensor, init_bits: float) -> None:
        """Fixed-bit methods start at their own bits; ``init_bits`` (GDNSQ's start) is ignored."""
        self.calibrated.fill_(True)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        if self.training:
            return self._train(w)
        return F.exact_quantize(self._to_grid_domain(w), *self.grid(w))

    def _to_grid_domain(self, w: Tensor) -> Tensor:
        return w

    @torch.no_grad()
    def codes(self, w: Tensor) -> Tensor:
        """Integer eval codes of ``w`` (float dtype, integral)."""
        return F.integer_codes(self._to_grid_domain(w), *self.grid(w))

    def _train(self, w: Tensor) -> Tensor:
        raise NotImplementedError


class FixedBitActQuantizer(FixedBitQuantizer):
    """Activations: per tensor; min / max / mean|x| observers for calibration; signedness like GDNSQ's.

    ``signed``: 'auto' (signed iff the calibration minimum is negative), 'signed' or 'unsigned'.
    """

    def __init__(self, bits: int, *, signed: str = "auto"):
        super().__init__(bits)
        self.signed_mode = signed
        self.register_buffer("is_signed", torch.tensor(signed == "signed"))
        self.register_buffer("obs_min", torch.tensor(math.inf))
        self.register_buffer("obs_max", torch.tensor(-math.inf))
        self.register_buffer("obs_abs_sum", torch.tensor(0.0))
        self.register_buffer("obs_count", torch.tensor(0.0))
        self._samples: list[Tensor] = []  # calibration values (not state: only calibrate_ reads them)

    def _observe(self, x: Tensor) -> None:
        x = x.detach()
        self.obs_min.copy_(torch.minimum(self.obs_min, x.min()))
        self.obs_max.copy_(torch.maximum(self.obs_max, x.max()))
        self.obs_abs_sum.add_(x.abs().sum())
        self.obs_count.add_(x.numel())
        self._samples.append(x.reshape(-1)[:: max(1, math.ceil(x.numel() / CALIB_SAMPLE))].float().clone())

    @property
    def obs_abs_mean(self) -> Tensor:
        return self.obs_abs_sum / self.obs_count.clamp_min(1)

    def calib_sample(self) -> Tensor:
        """The observed values kept for initialisation (a strided subsample of every calibration batch)."""
        if not self._samples:
            raise RuntimeError("activation quantizer saw no calibration data")
        return torch.cat(self._samples)

    @torch.no_grad()
    def calibrate_(self, init_bits: float) -> None:
        """Signedness from the observers, then the method's own range / step initialisation."""
        if not torch.isfinite(self.obs_min):
            raise RuntimeError("activation quantizer saw no calibration data")
        signed = decide_signed(self.signed_mode, self.obs_min)
        self.is_signed.fill_(signed)
        self._init_from_observers(signed)
        self.calibrated.fill_(True)
        self._samples = []

    def _init_from_observers(self, signed: bool) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        if self.training:
            return self._train(x)
        return F.exact_quantize(x, *self.grid())

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        return F.integer_codes(x, *self.grid())

    def _train(self, x: Tensor) -> Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ hyper-parameters


def method_args(spec, method: str, defaults: dict[str, float]) -> dict[str, float]:
    """``spec.method_args`` over ``defaults``; an unknown key is a one-line error naming the setting."""
    given = dict(getattr(spec, "method_args", None) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"quant.method_args.{unknown[0]}: not a setting of method {method!r} "
            f"(known: {', '.join(sorted(defaults)) or 'none'})"
        )
    return {k: float(given.get(k, v)) for k, v in defaults.items()}
