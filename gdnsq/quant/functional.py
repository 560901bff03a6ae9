"""GDNSQ quantizer maths: a noisy channel with a learnable step, as pure torch functions.

A tensor x is mapped to an integer grid and back (METHOD.md section 1)::

    xc = clamp(x, lo, hi)
    v  = (xc - z) / s                      s = 2**log_s  (shape broadcastable to x)
    q  = v + n,   n = round(v) - v         forward: q == round(v), an exact integer
    x̂  = q * s + z  ==  xc + s * n

The rounding error n is modelled as *noise*: autograd sees every factor of x̂ = (v + n)·s + z, and only
n gets a custom backward, d n / d v = 0 and d n / d s = r / sqrt(3) with r = ±1/2 drawn per element
(a dither of variance 1/12, the variance of uniform rounding noise). By the product rule:

* d x̂ / d xc = 1 (straight-through), optionally rescaled element-wise (EWGS, adaptive EWGS);
* d x̂ / d s  = n + s·r/sqrt(3) (``ste``, ``ewgs``, ``aewgs``): the rounding residual n = round(v) - v
  on the clamped v, which makes a coarser step cost accuracy, plus an s-scaled zero-mean dither.
  ``lsq`` keeps the residual alone, d x̂ / d s = n (an ablation, not the method);
* d x̂ / d z = 0 (z cancels in xc + s·n).

Gradients to the clamp bounds: d x̂ / d lo = 1 for x < lo, d x̂ / d hi = 1 for x > hi.

This module is the reference, in torch ops (``noisy_quantize``, the path of ``quant.fused: false``), and the
exact eval maths. Training quantizers run the registered ops of ``ops.py`` (one kernel each way: Triton on CUDA,
C++ on the CPU), which are tested against it. The dither and the optional extra noise are counter-based draws
(``dither.py``), recomputed wherever they are needed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dither import dither_signs, new_state, uniform_noise

_INV_SQRT3 = 1.0 / math.sqrt(3.0)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dimensions where ``shape`` broadcasts (size 1 or missing)."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape)


def _mean_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Mean of ``t`` over the dimensions where ``shape`` broadcasts."""
    return _sum_to(t, shape) * (math.prod(shape) / t.numel())


def activation_grid(log_s: Tensor, log_q: Tensor, lo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lo, hi, s) of an activation quantizer from its raw parameters: s = 2^log_s, hi = lo + 2^log_q - s."""
    s = torch.exp2(log_s)
    return lo, lo + torch.exp2(log_q) - s, s


def snap_to_step(lo: Tensor, s: Tensor) -> Tensor:
    """lo moved to the nearest whole number of steps, s·round(lo/s), with a straight-through gradient to lo (and
    none to s): the offset of an *integer grid* (``quant.integer_grid``), whose points are all integers × s, so
    that integer kernels (int8 / uint8 with an integer zero point) run it exactly. 0 stays 0."""
    z = torch.round(lo.detach() / s.detach()) * s.detach()
    return z + (lo - lo.detach())  # exactly z in value (not lo + (z - lo), which rounds), d/d lo = 1


def integer_weight_grid(lo: Tensor, hi: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(z, top) of a weight's integer grid over its range [lo, hi] (per row): z = s·round(lo/s) and the clamp's top
    z + s·round((hi - lo)/s), so the grid keeps the float grid's round(range/s) + 1 levels (``grid_levels``) where
    the snapped offset alone could make one more; weights above ``top`` (less than a step above) are clamped.
    Nothing here carries a gradient: the clamp bounds of a weight are data, as the float grid's z = min(w) is."""
    lo, hi, s = lo.detach(), hi.detach(), s.detach()
    z = torch.round(lo / s) * s
    return z, z + torch.round((hi - lo) / s) * s


def _grid_bounds(lo: Tensor, hi: Tensor, z: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The clamp bounds in grid units, (lo - z)/s and (hi - z)/s."""
    return (lo - z) / s, (hi - z) / s


def rounding_error(x: Tensor, lo, hi, z: Tensor, s: Tensor, key, noise_ratio: float) -> tuple[Tensor, Tensor]:
    """(v, e): the clamped grid value v = clamp((x - z)/s, ...) and its rounding error e = round(v) - v in grid
    units; with ``noise_ratio`` > 0, part of it replaced by uniform noise from ``key`` (``dither.uniform_noise``):
    e = n + ratio·((u - 1/2) - n)."""
    v = torch.sub(x, z).div_(s)
    if lo is not None:
        v = v.clamp_(*_grid_bounds(lo, hi, z, s))
    e = torch.round(v).sub_(v)
    if noise_ratio > 0:
        e = e + noise_ratio * ((uniform_noise(x, key).to(v.dtype) - 0.5) - e)
    return v, e


def reference_forward(
    x: Tensor, lo, hi, z: Tensor, s: Tensor, key: Tensor, estimator: str, noise_ratio: float
) -> tuple[Tensor, Tensor | None]:
    """(x̂, e) of the module docstring in torch ops; e (``rounding_error``) is None where nothing needs it
    (``ste`` without extra noise: x̂ = round(v)·s + z)."""
    if noise_ratio <= 0 and estimator == "ste":
        v = torch.sub(x, z).div_(s)
        if lo is not None:
            v = v.clamp_(*_grid_bounds(lo, hi, z, s))
        return v.round_().mul_(s).add_(z), None
    v, e = rounding_error(x, lo, hi, z, s, key, noise_ratio)
    return v.add_(e).mul_(s).add_(z), e


def aewgs_scale(g: Tensor, e: Tensor, shape: torch.Size) -> Tensor:
    """Adaptive EWGS's factor on the input gradient, 1 - min(δ·sign(g)·e, 0.99), with δ = mean(sign(g)·e) /
    max(Var(e), 1e-3) per step group (``shape``: the step's). The statistics are this rank's own: over the
    millions of elements of a batch δ is estimated to well under a percent, and the parameters stay identical
    across DDP ranks anyway (their gradients are averaged after backward), so no collective is needed."""
    sg_e = torch.sign(g) * e
    num, e2, me = _mean_to(sg_e, shape), _mean_to(e * e, shape), _mean_to(e, shape)
    d = num / (e2 - me * me).clamp_min(1e-3)
    return 1.0 - (d * sg_e).clamp_max(0.99)


def reference_backward(needs, g: Tensor, x: Tensor, lo, hi, z: Tensor, s: Tensor, key, e, est, delta, ratio):
    """Gradients (x, lo, hi, z, s) of ``reference_forward`` under the noise model (module docstring), each None
    where ``needs`` (5 flags) says it is not wanted; e: the forward's, or None to recompute it."""
    grad_x = grad_lo = grad_hi = grad_z = grad_s = None
    outside = below = above = None
    if lo is not None:
        below, above = x < lo, x > hi
        outside = below | above
    if e is None and (est not in ("ste", "lsq") or needs[4]):  # ste keeps nothing input-sized: recompute n
        e = rounding_error(x, lo, hi, z, s, key, ratio)[1]

    if needs[0]:
        if est == "ewgs":  # EWGS: g_x = g·(1 + δ·sign(g)·(v - q)) = g - δ·|g|·e
            grad_x = g - delta * g.abs() * e
        elif est == "aewgs":  # the scale is capped so the gradient never flips sign
            grad_x = g * aewgs_scale(g, e, s.shape)
        else:  # ste, lsq: straight through
            grad_x = g
        if outside is not None:
            grad_x = grad_x.masked_fill(outside, 0.0)
    if lo is not None and needs[1]:
        grad_lo = _sum_to(g * below, lo.shape)
    if lo is not None and needs[2]:
        grad_hi = _sum_to(g * above, hi.shape)
    if needs[4]:
        # Residual: what a coarser step costs. lsq stops there; the method adds s·r/sqrt(3),
        # r = ±1/2 with equal probability (variance 1/12 per element, mean 0).
        grad_s = _sum_to(g * e, s.shape)
        if est != "lsq":
            grad_s = grad_s + s * _sum_to(g * dither_signs(x, key).to(g.dtype), s.shape) * _INV_SQRT3
    if needs[3]:
        grad_z = torch.zeros_like(z)
    return grad_x, grad_lo, grad_hi, grad_z, grad_s


class _NoisyRound(torch.autograd.Function):
    """x̂ = z + s·round((clamp(x, lo, hi) - z)/s) with the noise-model backward of the module docstring, in torch
    ops: the reference the kernels (``ops.py``) are tested against, and the path of ``quant.fused: false``. It
    saves nothing input-sized beyond x itself and e (the rounding error, only where an estimator needs it)."""

    @staticmethod
    def forward(ctx, x, lo, hi, z, s, estimator: str, delta: float, noise_ratio: float, key: Tensor):
        ctx.estimator, ctx.delta, ctx.noise_ratio = estimator, delta, noise_ratio
        out, e = reference_forward(x, lo, hi, z, s, key, estimator, noise_ratio)
        ctx.save_for_backward(x, s, z, lo, hi, e, key)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, s, z, lo, hi, e, key = ctx.saved_tensors
        grads = reference_backward(
            ctx.needs_input_grad, g, x, lo, hi, z, s, key, e, ctx.estimator, ctx.delta, ctx.noise_ratio
        )
        return (*grads, None, None, None, None)


def noisy_quantize(
    x: Tensor,
    lo: Tensor | None,
    hi: Tensor | None,
    z: Tensor,
    s: Tensor,
    *,
    estimator: str = "ste",
    delta: float = 1e-2,
    noise_ratio: float = 0.0,
    key: Tensor | None = None,
) -> Tensor:
    """Training-time fake quantization: clamp to [lo, hi] (skipped when None), then noisy rounding (torch ops).

    Shapes: x (N, ...), lo/hi/z/s broadcastable to x (scalars or per-channel (C, 1, ...)).
    Gradients: x (straight-through inside [lo, hi], 0 outside), lo/hi (clamped elements), s (noise model).
    ``key``: the int64 key of the dither and noise draws (``dither``); None draws one from torch's global RNG.
    """
    key = new_state() if key is None else key
    if z is lo:  # an alias: torch.compile cannot trace an autograd.Function given one tensor twice
        z = lo.view_as(lo)
    return _NoisyRound.apply(x, lo, hi, z, s, estimator, delta, noise_ratio, key)


class _ChannelRange(torch.autograd.Function):
    """Per-channel (min, max) of w. The gradient reaches two elements per channel (the first arg-extremes, as
    torch.min / torch.max along a dim choose), so backward returns it as a sparse tensor, which autograd adds
    into w's dense gradient: autograd's own min/max backward builds two zero-filled weight-sized tensors and
    adds both, a weight-sized write it does not need."""

    @staticmethod
    def forward(ctx, w: Tensor, channels: int):
        flat = w.reshape(channels, -1)
        (lo, ilo), (hi, ihi) = flat.min(dim=1), flat.max(dim=1)
        ctx.save_for_backward(ilo, ihi)
        ctx.shape = w.shape
        return lo, hi

    @staticmethod
    def backward(ctx, g_lo: Tensor, g_hi: Tensor):
        ilo, ihi = ctx.saved_tensors
        row = torch.arange(len(ilo), device=ilo.device) * (math.prod(ctx.shape) // len(ilo))
        where = torch.stack(torch.unravel_index(torch.cat([row + ilo, row + ihi]), ctx.shape))
        grad = torch.sparse_coo_tensor(where, torch.cat([g_lo, g_hi]), ctx.shape, check_invariants=False)
        return grad, None


def channel_range(w: Tensor, channels: int, sparse_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(min, max) of each of ``channels`` equal slices of w along dim 0 (1: the whole tensor), differentiable:
    the gradient goes to the first arg-extreme of each (``sparse_grad``: as a sparse gradient)."""
    flat = w.reshape(channels, -1)
    if not (torch.is_grad_enabled() and w.requires_grad):
        # No gradient wanted (the level guard after each step, convergence checks, eval): amin/amax skip the
        # indices that min/max along a dim compute.
        return flat.amin(dim=1), flat.amax(dim=1)
    if sparse_grad and w.device.type == "cpu" and not torch.compiler.is_compiling():
        return _ChannelRange.apply(w, channels)
    # min/max along a dim back-propagate by a scatter to the arg-extremes (amin/amax's backward costs more)
    return flat.min(dim=1).values, flat.max(dim=1).values


def integer_codes(x: Tensor, lo: Tensor | None, hi: Tensor | None, z: Tensor, s: Tensor) -> Tensor:
    """Eval-time integer codes q = round((clamp(x, lo, hi) - z) / s) (float dtype, integral values)."""
    xc = x if lo is None else torch.clamp(x, lo, hi)
    return torch.round((xc - z) / s)


def exact_quantize(x: Tensor, lo: Tensor | None, hi: Tensor | None, z: Tensor, s: Tensor) -> Tensor:
    """Eval-time fake quantization, plain torch ops only (exportable): x̂ = q·s + z."""
    return integer_codes(x, lo, hi, z, s) * s + z


# ------------------------------------------------------------------------------------ bit-widths


def activation_bits(log_q: Tensor, log_s: Tensor) -> Tensor:
    """Continuous activation bit-width b_a = log_q - log_s (levels 2**b_a over the clamp range)."""
    return log_q - log_s


def weight_bits(w_range: Tensor, log_s: Tensor) -> Tensor:
    """Continuous weight bit-width b_w = log2(range + s) - log_s, range = max(w) - min(w).

    One step of headroom (+s) makes (range/s + 1) levels, so the top value never overflows.
    """
    return torch.log2(w_range + torch.exp2(log_s)) - log_s


def grid_levels(span: Tensor, s: Tensor) -> Tensor:
    """Integer levels a uniform grid of step s needs to cover ``span``: round(span / s) + 1."""
    return torch.round(span / s) + 1


def true_bits(levels: Tensor) -> Tensor:
    """True (storage) bit-width ceil(log2(levels)): 0 for a single level (a constant, i.e. a dead grid).

    A grid with fewer than 2 levels carries no information and is never converged (see ``min_bits``).
    """
    return torch.ceil(torch.log2(levels.clamp_min(1)))


def min_bits(target: float, margin: float = 0.0) -> float:
    """Smallest continuous bit-width whose grid keeps all 2**target levels, ``margin`` levels inside.

    levels = round(2**b - 1) + 1 >= 2**T  <=>  2**b - 1 >= 2**T - 3/2, i.e. b >= log2(2**T - 1/2); the
    margin (in levels, > 0 because round-half-to-even sits on that boundary) keeps the guard clear of it:
    b_min = log2(2**T - 1/2 + margin). It is capped at T - 2e-3 so it stays below the penalty's aim T - ε
    (ε = 1e-3): from T = 9 on a level is too thin for both, and there the cap, not the levels, decides.
    """
    return min(math.log2(2.0**target - 0.5 + margin), target - 2e-3)


def max_bits(target: float, margin: float = 0.0) -> float:
    """Largest continuous bit-width whose grid has at most 2**target levels, ``margin`` levels inside.

    levels = round(2**b - 1) + 1 <= 2**T  <=>  2**b - 1 < 2**T - 1/2 (the half rounds to even, which is up
    here), so b_max = log2(2**T + 1/2 - margin); with min_bits it brackets the band of b where the grid has
    exactly 2**T levels.
    """
    return math.log2(2.0**target + 0.5 - margin)
