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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import fused as _fused

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


def _all_reduce_mean(*tensors: Tensor) -> None:
    """Average statistics across DDP ranks so every replica uses the same EWGS delta."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


_SIGN_TABLES: dict[tuple, Tensor] = {}
_SIGN_TABLE_SIZE = 1 << 22  # fixed, so the signs drawn never depend on what ran before in the process
_SIGN_WINDOW = _SIGN_TABLE_SIZE // 2


def _sign_table(device, dtype) -> Tensor:
    key = (device, dtype)
    if key not in _SIGN_TABLES:
        gen = torch.Generator(device="cpu").manual_seed(0x5EED)
        table = torch.randint(0, 2, (_SIGN_TABLE_SIZE,), generator=gen).to(dtype) - 0.5
        _SIGN_TABLES[key] = table.to(device)
    return _SIGN_TABLES[key]


def _dither_offsets(n: int) -> list[int]:
    """Random window offsets into the sign table for ``n`` elements: one per window of ``_SIGN_WINDOW``."""
    offsets = []
    for start in range(0, n, _SIGN_WINDOW):
        size = min(_SIGN_WINDOW, n - start)
        offsets.append(int(torch.randint(0, _SIGN_TABLE_SIZE - size + 1, (1,))))
    return offsets


def dither_signs(like: Tensor) -> Tensor:
    """Random ±1/2 per element of ``like``, read from a table of fair coin flips at random offsets.

    Per-element RNG (bernoulli_) is slow (docs/results.md, "Figures formerly in docstrings"). A window at a uniformly
    random offset into an i.i.d. ±1/2 table gives each element a fair sign (mean 0, variance 1/4)
    independent of the gradient, for the price of a view; tensors larger than one window are
    covered by several windows at independent offsets. Offsets come from torch's global RNG, so
    runs are reproducible under a seed and checkpoints restore the sequence.
    """
    n = like.numel()
    table = _sign_table(like.device, like.dtype)
    chunks = [table[o : o + min(_SIGN_WINDOW, n - i * _SIGN_WINDOW)] for i, o in enumerate(_dither_offsets(n))]
    flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return flat.view(like.shape)


class _NoisyRound(torch.autograd.Function):
    """x̂ = z + s·round((clamp(x, lo, hi) - z)/s) with the noise-model backward of the module docstring.

    Cost matters (weights of a ResNet are touched every step, activations twice). With ``fused`` on the CPU
    (``ste``/``lsq``, no extra noise) one compiled pass does the forward and one the backward (``fused.py``);
    otherwise the torch ops below run, in place on one buffer, saving nothing input-sized beyond x itself
    (the rounding error and the clamp masks are recomputed in backward).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        lo,
        hi,
        z: Tensor,
        s: Tensor,
        estimator: str,
        delta: float,
        noise_ratio: float,
        fused: bool = False,
    ):
        ctx.estimator, ctx.delta = estimator, delta
        ctx.groups = _kernel_groups(x, lo, hi, z, s, estimator, noise_ratio) if fused else None
        if ctx.groups is not None:
            ctx.save_for_backward(x, s, z, lo, hi, None)
            vlo, vhi = _grid_bounds(lo, hi, z, s) if lo is not None else (None, None)
            return _fused.kernels().forward(
                x, *_per_group(ctx.groups, z, s, vlo, vhi), lo is not None, estimator != "ste"
            )
        v = torch.sub(x, z).div_(s)
        if lo is not None:
            v = v.clamp_(*_grid_bounds(lo, hi, z, s))
        e = None
        if noise_ratio > 0 or estimator != "ste":
            e = torch.round(v).sub_(v)  # rounding error n in grid units
            if noise_ratio > 0:
                # Extra uniform noise in place of part of the rounding error, decayed to 0 by the schedule.
                e = e + noise_ratio * ((torch.rand_like(v) - 0.5) - e)
            out = v.add_(e)
        else:
            out = v.round_()
        ctx.save_for_backward(x, s, z, lo, hi, e)
        return out.mul_(s).add_(z)

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.groups is not None:
            return _fused_backward(ctx, g)
        x, s, z, lo, hi, e = ctx.saved_tensors
        est = ctx.estimator
        grad_x = grad_lo = grad_hi = grad_z = grad_s = None
        outside = below = above = None
        if lo is not None:
            below, above = x < lo, x > hi
            outside = below | above

        if ctx.needs_input_grad[0]:
            if est == "ewgs":
                # EWGS: g_x = g·(1 + δ·sign(g)·(v - q)) = g - δ·|g|·e
                grad_x = g - ctx.delta * g.abs() * e
            elif est == "aewgs":
                # Adaptive EWGS: δ from batch statistics of sign(g)·e and Var(e), per step-shape group,
                # averaged across DDP ranks; the scale is capped so the gradient never flips sign.
                sg_e = torch.sign(g) * e
                num, e2, me = _mean_to(sg_e, s.shape), _mean_to(e * e, s.shape), _mean_to(e, s.shape)
                _all_reduce_mean(num, e2, me)
                d = num / (e2 - me * me).clamp_min(1e-3)
                grad_x = g * (1.0 - (d * sg_e).clamp_max(0.99))
            else:  # ste, lsq: straight through
                grad_x = g
            if outside is not None:
                grad_x = grad_x.masked_fill(outside, 0.0)

        if lo is not None and ctx.needs_input_grad[1]:
            grad_lo = _sum_to(g * below, lo.shape)
        if lo is not None and ctx.needs_input_grad[2]:
            grad_hi = _sum_to(g * above, hi.shape)

        if ctx.needs_input_grad[4]:
            if e is None:  # ste keeps nothing input-sized: recompute n on the clamped v
                v = torch.sub(x, z).div_(s)
                if lo is not None:
                    v = v.clamp_(*_grid_bounds(lo, hi, z, s))
                e = torch.round(v).sub_(v)
            # Residual: what a coarser step costs. lsq stops there; the method adds s·r/sqrt(3),
            # r = ±1/2 with equal probability (variance 1/12 per element, mean 0).
            grad_s = _sum_to(g * e, s.shape)
            if est != "lsq":
                grad_s = grad_s + s * _sum_to(g * dither_signs(g), s.shape) * _INV_SQRT3

        if ctx.needs_input_grad[3]:
            grad_z = torch.zeros_like(z)
        return grad_x, grad_lo, grad_hi, grad_z, grad_s, None, None, None, None


def _grid_bounds(lo: Tensor, hi: Tensor, z: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The clamp bounds in grid units, (lo - z)/s and (hi - z)/s."""
    return (lo - z) / s, (hi - z) / s


def _kernel_groups(x, lo, hi, z, s, estimator: str, noise_ratio: float) -> int | None:
    """Step groups for the fused kernels, or None where they do not apply (torch path)."""
    if estimator not in ("ste", "lsq") or noise_ratio > 0:
        return None
    groups = _fused.groups(x, s, z, lo, hi)
    return groups if groups is not None and _fused.kernels() is not None else None


def _per_group(groups: int, *params: Tensor | None) -> list[Tensor]:
    """Each parameter as a contiguous float32 vector of ``groups`` values (an empty one for None); the
    shapes were checked by ``fused.groups``: one value, or one per group along dim 0."""
    out = []
    for p in params:
        if p is None:
            out.append(torch.empty(0))
            continue
        v = p.detach().float().reshape(-1)
        out.append((v.expand(groups) if v.numel() == 1 else v).contiguous())
    return out


def _fused_backward(ctx, g: Tensor):
    x, s, z, lo, hi, _ = ctx.saved_tensors
    needs = ctx.needs_input_grad
    clamp = lo is not None
    dither = needs[4] and ctx.estimator != "lsq"
    vlo, vhi = _grid_bounds(lo, hi, z, s) if clamp else (None, None)
    table = _sign_table(g.device, torch.float32) if dither else torch.empty(0)
    # Same offsets, drawn in the same order from torch's RNG, as dither_signs(g) on the torch path.
    offsets = torch.tensor(_dither_offsets(g.numel()) if dither else [], dtype=torch.long)
    grad_x, sums = _fused.kernels().backward(
        x,
        g.contiguous(),
        *_per_group(ctx.groups, z, s, vlo, vhi, lo, hi),
        clamp,
        needs[0],
        table,
        offsets,
        _SIGN_WINDOW,
        dither,
    )
    if needs[0] and not clamp:
        grad_x = g  # no clamp: straight through
    shape = (ctx.groups,) + (1,) * (x.dim() - 1)
    grad_lo = _sum_to(sums[0].reshape(shape), lo.shape) if clamp and needs[1] else None
    grad_hi = _sum_to(sums[1].reshape(shape), hi.shape) if clamp and needs[2] else None
    grad_s = None
    if needs[4]:
        grad_s = _sum_to(sums[2].reshape(shape), s.shape)
        if dither:
            grad_s = grad_s + s * _sum_to(sums[3].reshape(shape), s.shape) * _INV_SQRT3
    grad_z = torch.zeros_like(z) if needs[3] else None
    return grad_x if needs[0] else None, grad_lo, grad_hi, grad_z, grad_s, None, None, None, None


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
    fused: bool = False,
) -> Tensor:
    """Training-time fake quantization: clamp to [lo, hi] (skipped when None), then noisy rounding.

    Shapes: x (N, ...), lo/hi/z/s broadcastable to x (scalars or per-channel (C, 1, ...)).
    Gradients: x (straight-through inside [lo, hi], 0 outside), lo/hi (clamped elements), s (noise model).
    ``fused``: one compiled pass each way on the CPU where it applies (``ste``/``lsq``, no extra noise,
    contiguous float32, per-tensor or per-output-channel parameters); x̂ and the x gradient are bit-identical
    to the torch path, the step and clamp gradients equal to float rounding (float32 SIMD lanes per piece,
    float64 across pieces: deterministic for any thread count).
    """
    return _NoisyRound.apply(x, lo, hi, z, s, estimator, delta, noise_ratio, fused)


class _FusedWeightQuantize(torch.autograd.Function):
    """The training weight quantizer as one kernel each way (CPU, ``ste``/``lsq``): per output channel the range
    (lo, hi) = (min, max) of w, then x̂ with z = lo, as ``channel_range`` followed by ``noisy_quantize(w, None,
    None, lo.detach(), s)``, without their separate passes over the weights.

    Returns (x̂, lo, hi); lo and hi carry the bit-width's gradient to the first arg-extremes (as ``_ChannelRange``),
    which backward adds into the weight's gradient in the pass that copies it (no sparse add afterwards).
    """

    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, estimator: str):
        ctx.set_materialize_grads(False)
        ctx.estimator = estimator
        out, lo, hi, index = _fused.kernels().weight_forward(w, s.detach(), estimator != "ste")
        ctx.save_for_backward(w, s, lo, index)
        ctx.mark_non_differentiable(index)
        return out, lo, hi

    @staticmethod
    def backward(ctx, g: Tensor | None, g_lo: Tensor | None, g_hi: Tensor | None):
        w, s, lo, index = ctx.saved_tensors
        step_grad = ctx.needs_input_grad[1] and g is not None
        if g is None:  # only the range was used (the penalty alone): its gradient, as _ChannelRange's
            g = torch.zeros_like(w)
        dither = step_grad and ctx.estimator != "lsq"
        table = _sign_table(g.device, torch.float32) if dither else torch.empty(0)
        offsets = torch.tensor(_dither_offsets(g.numel()) if dither else [], dtype=torch.long)
        empty = torch.empty(0)
        if g_lo is not None or g_hi is not None:
            g_lo = torch.zeros_like(lo) if g_lo is None else g_lo
            g_hi = torch.zeros_like(lo) if g_hi is None else g_hi
        grad_w, sums = _fused.kernels().weight_backward(
            w,
            g.contiguous(),
            lo,
            s.detach(),
            index,
            empty if g_lo is None else g_lo,
            empty if g_hi is None else g_hi,
            table,
            offsets,
            _SIGN_WINDOW,
            dither,
        )
        grad_s = None
        if step_grad:
            grad_s = sums[0].reshape(s.shape)
            if dither:
                grad_s = grad_s + s * sums[1].reshape(s.shape) * _INV_SQRT3
        return grad_w if ctx.needs_input_grad[0] else None, grad_s, None


def fused_weight_quantize(
    w: Tensor, s: Tensor, *, estimator: str = "ste", noise_ratio: float = 0.0
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(x̂, lo, hi) of a per-output-channel weight quantizer in one kernel pass (lo, hi of shape (C,)), or None
    where the kernels do not apply (then: ``channel_range`` and ``noisy_quantize``). Same values as those two:
    x̂, lo, hi and the weight's gradient bit-identical, the step gradient equal to float rounding."""
    if estimator not in ("ste", "lsq") or noise_ratio > 0 or s.dim() != w.dim() or s.shape[0] != w.shape[0]:
        return None
    if _fused.groups(w, s) != w.shape[0] or _fused.kernels() is None:
        return None
    return _FusedWeightQuantize.apply(w, s, estimator)


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


def channel_range(w: Tensor, channels: int, fused: bool = False) -> tuple[Tensor, Tensor]:
    """(min, max) of each of ``channels`` equal slices of w along dim 0 (1: the whole tensor), differentiable:
    the gradient goes to the first arg-extreme of each (``fused``: as a sparse gradient, on the CPU)."""
    flat = w.reshape(channels, -1)
    if not (torch.is_grad_enabled() and w.requires_grad):
        # No gradient wanted (the level guard after each step, convergence checks, eval): amin/amax skip the
        # indices that min/max along a dim compute.
        return flat.amin(dim=1), flat.amax(dim=1)
    if fused and _fused.groups(w) is not None:
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
