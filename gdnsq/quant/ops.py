"""The training quantizers as registered torch ops (``torch.ops.gdnsq.*``): one kernel each way per quantizer.

    quantize_act(x, log_s, log_q, lo, state, estimator, noise_ratio, out_dtype) -> (x̂, key)
        x̂ = lo + s·round((clamp(x, lo, hi) - lo)/s), s = 2^log_s, hi = lo + 2^log_q - s   (x any shape, params 0-d)
    replay_act(x, log_s, log_q, lo, key, ...) -> x̂        the same x̂ again, from the key a forward returned
    quantize_act_backward(g, x, log_s, log_q, lo, key, estimator, delta, noise_ratio, need_grad_x)
        -> (grad_x or an empty tensor, float32 (d log_s, d log_q, d lo))
    quantize_weight(w, log_s, state, estimator, noise_ratio, out_dtype) -> (x̂, lo[C], hi[C], index[2, C], key)
        per row c of w (C = log_s.numel(): output channels, or 1): lo/hi = its min/max, index = their first
        positions, x̂ = lo + s·round((w - lo)/s)
    quantize_weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator, delta, noise_ratio)
        -> (grad_w, float32 d log_s per row); g_lo / g_hi (the range's gradient, optional) reach the arg-extremes

The maths, estimators (``ste``, ``lsq``, ``ewgs``, ``aewgs``) and gradients are those of ``functional.py`` (module
docstring), which is their reference. The ops take the raw parameters, so 2^log_s and the clamp bounds are computed
inside the kernel instead of by separate tiny ops, and return the raw parameters' gradients. ``state`` (int64, on
the device) is read and advanced inside the forward kernel; the key it held is returned for the backward (see
``dither.py``): no number goes to the host. x̂ comes out as ``out_dtype`` (float32, bfloat16 or float16) whatever
the input's dtype, with the maths in float32 registers, so autocast adds no cast around a quantizer.

Implementations: CUDA: ``triton_ops.py`` (the kernels of ``triton_kernels.py``: one launch; two for ``aewgs``'s
activation backward); CPU: ``cpu_ops.py`` (the C++ kernels that ``fused.py`` builds); elsewhere (or float64, or
without a compiler): the torch reference, same results.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import cpu_ops, dither, fused
from . import functional as F

_LN2 = math.log(2.0)
# The activation kernels walk a contiguous or channels-last tensor in memory order and write x̂ in the same layout,
# so inductor may hand them what its convolutions prefer (channels-last on the CPU) without a copy either way.
_ANY_LAYOUT = (torch.Tag.flexible_layout,)


@functools.cache
def _triton():
    """triton_ops, or None where Triton is not installed."""
    try:
        from . import triton_ops
    except ImportError:
        return None
    return triton_ops


def _backend(x: Tensor, out_dtype: torch.dtype) -> str:
    if x.device.type == "cuda" and _triton() is not None:
        return "triton"
    return "cpu" if fused.applies(x, out_dtype) else "torch"


def _take_key(state: Tensor) -> Tensor:
    """The key for this call, ``state`` advanced (CPU: one C++ call instead of three torch ops)."""
    if state.device.type == "cpu" and fused.kernels() is not None:
        return cpu_ops.take_key(state)
    return dither.next_key_(state)


def _compute(x: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
    """The reference's operands: float32 maths for float32 / bfloat16 / float16 inputs, float64 for float64."""
    dt = torch.float64 if torch.float64 in (x.dtype, *(p.dtype for p in params)) else torch.float32
    return tuple(t.to(dt) for t in (x, *params))


# ------------------------------------------------------------------------------------ activations


def _act_forward(x, log_s, log_q, lo, key, estimator, noise_ratio, out_dtype) -> Tensor:
    backend = _backend(x, out_dtype)
    if backend == "triton":
        return _triton().act_forward(x, log_s, log_q, lo, key, estimator, noise_ratio, out_dtype, False)[0]
    if backend == "cpu":
        return cpu_ops.act_forward(x, log_s, log_q, lo, key, estimator, noise_ratio, out_dtype)
    xm, _, back = cpu_ops.walk(x)  # the layout the kernels give back
    xm, log_s, log_q, lo = _compute(xm, log_s, log_q, lo)
    lo, hi, s = F.activation_grid(log_s, log_q, lo)
    return back(F.reference_forward(xm, lo, hi, lo, s, key, estimator, noise_ratio)[0].to(out_dtype))


@torch.library.custom_op("gdnsq::quantize_act", mutates_args=("state",), tags=_ANY_LAYOUT)
def quantize_act(
    x: Tensor, log_s: Tensor, log_q: Tensor, lo: Tensor, state: Tensor, estimator: str, noise_ratio: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    if _backend(x, out_dtype) == "triton":
        return _triton().act_forward(x, log_s, log_q, lo, state, estimator, noise_ratio, out_dtype, True)
    key = _take_key(state)
    return _act_forward(x, log_s, log_q, lo, key, estimator, noise_ratio, out_dtype), key


@quantize_act.register_fake
def _(x, log_s, log_q, lo, state, estimator, noise_ratio, out_dtype):
    out = torch.empty_like(x, dtype=out_dtype, memory_format=dither.walk_format(x))
    return out, torch.empty((), dtype=torch.int64, device=state.device)


@torch.library.custom_op("gdnsq::replay_act", mutates_args=(), tags=_ANY_LAYOUT)
def replay_act(
    x: Tensor, log_s: Tensor, log_q: Tensor, lo: Tensor, key: Tensor, estimator: str, noise_ratio: float,
    out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    return _act_forward(x, log_s, log_q, lo, key, estimator, noise_ratio, out_dtype)


@replay_act.register_fake
def _(x, log_s, log_q, lo, key, estimator, noise_ratio, out_dtype):
    return torch.empty_like(x, dtype=out_dtype, memory_format=dither.walk_format(x))


@torch.library.custom_op("gdnsq::quantize_act_backward", mutates_args=(), tags=_ANY_LAYOUT)
def quantize_act_backward(
    g: Tensor, x: Tensor, log_s: Tensor, log_q: Tensor, lo: Tensor, key: Tensor, estimator: str, delta: float,
    noise_ratio: float, need_grad_x: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    backend = _backend(x, x.dtype)
    if backend == "triton":
        return _triton().act_backward(g, x, log_s, log_q, lo, key, estimator, delta, noise_ratio, need_grad_x)
    if backend == "cpu" and g.dtype in fused.DTYPES:
        return cpu_ops.act_backward(g, x, log_s, log_q, lo, key, estimator, delta, noise_ratio, need_grad_x)
    xm, gm, back = cpu_ops.walk(x, g)
    xc, gc, log_s, log_q, lo = _compute(xm, gm, log_s, log_q, lo)
    lo, hi, s = F.activation_grid(log_s, log_q, lo)
    gx, g_lo, g_hi, _, g_s = F.reference_backward(
        (need_grad_x, True, True, False, True), gc, xc, lo, hi, lo, s, key, None, estimator, delta, noise_ratio
    )
    # float32 like the kernels' sums, float64 kept where the maths ran in it (the reference's own gradients)
    grads = torch.stack([(g_s - g_hi) * s * _LN2, g_hi * torch.exp2(log_q) * _LN2, g_lo + g_hi]).to(_grads_dtype(xc))
    return (back(gx.to(x.dtype, copy=True)) if need_grad_x else x.new_empty(0)), grads  # a copy: never g itself


def _grads_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (t.dtype for t in tensors) else torch.float32


@quantize_act_backward.register_fake
def _(g, x, log_s, log_q, lo, key, estimator, delta, noise_ratio, need_grad_x):
    grad_x = torch.empty_like(x, memory_format=dither.walk_format(x)) if need_grad_x else x.new_empty(0)
    return grad_x, x.new_empty(3, dtype=_grads_dtype(x, g, log_s, log_q, lo))


# ------------------------------------------------------------------------------------ weights


@torch.library.custom_op("gdnsq::quantize_weight", mutates_args=("state",))
def quantize_weight(
    w: Tensor, log_s: Tensor, state: Tensor, estimator: str, noise_ratio: float, out_dtype: torch.dtype,
    integer_grid: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    if integer_grid:
        return _integer_weight_forward(w, log_s, _take_key(state), estimator, noise_ratio, out_dtype)
    backend = _backend(w, out_dtype)
    if backend == "triton":
        return _triton().weight_forward(w, log_s, state, estimator, noise_ratio, out_dtype)
    if backend == "cpu":
        key = _take_key(state)
        return (*cpu_ops.weight_forward(w, log_s, key, estimator, noise_ratio, out_dtype), key)
    key = _take_key(state)
    wm, _, back = cpu_ops.walk(w)  # rows in memory order, as the kernels walk them
    wc, log_s = _compute(wm, log_s)
    flat = wc.reshape(log_s.numel(), -1)
    (lo, ilo), (hi, ihi) = flat.min(dim=1), flat.max(dim=1)
    s = torch.exp2(log_s).reshape((-1,) + (1,) * (wc.dim() - 1))
    out = F.reference_forward(wc, None, None, lo.reshape(s.shape), s, key, estimator, noise_ratio)[0]
    return back(out.to(out_dtype)), lo.to(w.dtype), hi.to(w.dtype), torch.stack([ilo, ihi]), key


@quantize_weight.register_fake
def _(w, log_s, state, estimator, noise_ratio, out_dtype, integer_grid=False):
    c = log_s.numel()
    index = torch.empty((2, c), dtype=torch.int64, device=w.device)
    key = torch.empty((), dtype=torch.int64, device=state.device)
    out = torch.empty_like(w, dtype=out_dtype, memory_format=dither.walk_format(w))
    return out, w.new_empty(c), w.new_empty(c), index, key


@torch.library.custom_op("gdnsq::quantize_weight_backward", mutates_args=())
def quantize_weight_backward(
    g: Tensor, g_lo: Tensor | None, g_hi: Tensor | None, w: Tensor, log_s: Tensor, lo: Tensor, index: Tensor,
    key: Tensor, estimator: str, delta: float, noise_ratio: float, integer_grid: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    if integer_grid:
        return _integer_weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator, delta, noise_ratio)
    backend = _backend(w, w.dtype)
    if backend == "triton":
        return _triton().weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator, delta, noise_ratio)
    if backend == "cpu" and g.dtype in fused.DTYPES:
        return cpu_ops.weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator, delta, noise_ratio)
    wm, gm, back = cpu_ops.walk(w, g)
    wc, gc, log_s, z = _compute(wm, gm, log_s, lo)
    s = torch.exp2(log_s).reshape((-1,) + (1,) * (wc.dim() - 1))
    gw, _, _, _, g_s = F.reference_backward(
        (True, False, False, False, True), gc, wc, None, None, z.reshape(s.shape), s, key, None, estimator, delta,
        noise_ratio,
    )  # fmt: skip
    gw = gw.clone() if gw is gc else gw  # ste: the gradient is g, which the range's part must not be added into
    flat = gw.reshape(log_s.numel(), -1)
    for i, gr in ((0, g_lo), (1, g_hi)):  # min's, then max's, as autograd's sparse add
        if gr is not None:
            flat.scatter_add_(1, index[i].unsqueeze(1), gr.to(flat.dtype).unsqueeze(1))
    return back(gw.to(w.dtype, copy=True)), (g_s * s * _LN2).reshape(-1).float()  # a copy: never g itself


@quantize_weight_backward.register_fake
def _(g, g_lo, g_hi, w, log_s, lo, index, key, estimator, delta, noise_ratio, integer_grid=False):
    return torch.empty_like(w, memory_format=dither.walk_format(w)), w.new_empty(log_s.numel(), dtype=torch.float32)


# ------------------------------------------------------------------------------ integer weight grids
# ``quant.integer_grid``: z = s·round(min/s) and the top clamped to keep the float grid's level count
# (``functional.integer_weight_grid``). On the CPU the generic kernels run it (per-row z, s and clamp bounds); on CUDA
# the torch reference does (the Triton weight kernels know only z = min).


def _integer_weight_bounds(wc: Tensor, log_s: Tensor, lo: Tensor, hi: Tensor):
    """(s, z, lo, top, vlo, vhi) shaped (C, 1): the clamp [lo, top] and its bounds in grid units."""
    c = log_s.numel()
    s = torch.exp2(log_s.to(wc.dtype)).reshape(c, 1)
    lo, hi = lo.to(wc.dtype).reshape(c, 1), hi.to(wc.dtype).reshape(c, 1)
    z, top = F.integer_weight_grid(lo, hi, s)
    return (s, z, lo, top, *F._grid_bounds(lo, top, z, s))


def _integer_weight_forward(w, log_s, key, estimator, noise_ratio, out_dtype):
    wm, _, back = cpu_ops.walk(w)
    flat = _compute(wm)[0].reshape(log_s.numel(), -1)
    (lo, ilo), (hi, ihi) = flat.min(dim=1), flat.max(dim=1)
    s, z, clo, top, vlo, vhi = _integer_weight_bounds(flat, log_s, lo, hi)
    if _backend(w, out_dtype) == "cpu":
        out = fused.kernels().forward(wm, z, s, vlo, vhi, True, estimator != "ste", key, noise_ratio, out_dtype)
    else:
        out = F.reference_forward(flat, clo, top, z, s, key, estimator, noise_ratio)[0].to(out_dtype)
    return back(out.reshape(wm.shape)), lo.to(w.dtype), hi.to(w.dtype), torch.stack([ilo, ihi]), key


def _integer_weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator, delta, noise_ratio):
    wm, gm, back = cpu_ops.walk(w, g)
    c = log_s.numel()
    flat = _compute(wm)[0].reshape(c, -1)
    hi = flat.gather(1, index[1].reshape(c, 1))  # the row's max, at the index its forward found
    s, z, clo, top, vlo, vhi = _integer_weight_bounds(flat, log_s, lo, hi)
    dither = estimator != "lsq"
    if _backend(w, w.dtype) == "cpu" and g.dtype in fused.DTYPES:
        empty = cpu_ops._EMPTY
        grad_w, sums = fused.kernels().backward(
            wm, gm, z, s, vlo, vhi, clo, top, True, cpu_ops.MODES[estimator], delta, key, noise_ratio, dither,
            True, index, empty if g_lo is None else g_lo, empty if g_hi is None else g_hi,
        )  # fmt: skip
        grad_s = sums[2] + s.reshape(-1) * sums[3] * F._INV_SQRT3 if dither else sums[2]
        return back(grad_w), (grad_s * s.reshape(-1) * _LN2).float()
    gc = _compute(gm)[0].reshape(c, -1)
    gw, _, _, _, g_s = F.reference_backward(
        (True, False, False, False, True), gc, flat, clo, top, z, s, key, None, estimator, delta, noise_ratio
    )
    gw = gw.clone() if gw is gc else gw
    for i, gr in ((0, g_lo), (1, g_hi)):  # min's, then max's, as autograd's sparse add
        if gr is not None:
            gw.scatter_add_(1, index[i].unsqueeze(1), gr.to(gw.dtype).unsqueeze(1))
    return back(gw.reshape(wm.shape).to(w.dtype, copy=True)), (g_s * s * _LN2).reshape(-1).float()
