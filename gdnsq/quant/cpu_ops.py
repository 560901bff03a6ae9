"""The CPU implementation of the quantizer ops (``ops.py``): the C++ kernels (``fused.py`` builds them) and the
small torch computations around them (s = 2^log_s, the clamp bounds, the chain rule to the raw parameters), done
with the very torch ops of the reference graph so that x̂ and the input gradient are its values bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import functional as F
from .dither import memory_order
from .fused import kernels

MODES = {"ste": 0, "lsq": 1, "ewgs": 2, "aewgs": 3}
_LN2 = math.log(2.0)
_EMPTY = torch.empty(0)


def walk(x: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor | None, Callable[[Tensor], Tensor]]:
    """(x, g, back) as the kernels take them: x in its walk order (``dither.memory_order``: a contiguous view),
    g laid out as x first (a copy only where it was not), and back() for what the kernels write."""
    m, back = memory_order(x)
    if g is None:
        return m, None, back
    if g.stride() != x.stride():
        g = torch.empty_like(x, dtype=g.dtype).copy_(g)
    return m, memory_order(g)[0], back


def take_key(state: Tensor) -> Tensor:
    return kernels().take_key(state)


@torch.no_grad()
def act_forward(x, log_s, log_q, lo, key, estimator: str, noise_ratio: float, out_dtype) -> Tensor:
    lo, hi, s = F.activation_grid(log_s, log_q, lo)
    vlo, vhi = F._grid_bounds(lo, hi, lo, s)
    x, _, back = walk(x)
    return back(kernels().forward(x, lo, s, vlo, vhi, True, estimator != "ste", key, noise_ratio, out_dtype))


@torch.no_grad()
def act_backward(g, x, log_s, log_q, lo, key, estimator: str, delta: float, noise_ratio: float, need_grad_x: bool):
    """(grad_x or an empty tensor, float32 (d log_s, d log_q, d lo))."""
    lo, hi, s = F.activation_grid(log_s, log_q, lo)
    vlo, vhi = F._grid_bounds(lo, hi, lo, s)
    x, g, back = walk(x, g)
    dither = estimator != "lsq"
    grad_x, sums = kernels().backward(
        x, g, lo, s, vlo, vhi, lo, hi, True, MODES[estimator], delta, key, noise_ratio, dither,
        need_grad_x, _EMPTY, _EMPTY, _EMPTY,
    )  # fmt: skip
    below, above, ge, gr = sums[:, 0]
    grads = param_grads_act(below, above, ge, gr if dither else None, s, torch.exp2(log_q))
    return (back(grad_x) if need_grad_x else _EMPTY), grads


def param_grads_act(below: Tensor, above: Tensor, ge: Tensor, gr: Tensor | None, s: Tensor, q: Tensor) -> Tensor:
    """(d log_s, d log_q, d lo) from the per-tensor sums: the step gets Σ g·n + s·Σ g·r/√3 (``gr`` None: lsq's
    residual alone) directly and -Σ g·[x > hi] through hi = lo + q - s; lo gets Σ g·[x < lo] + Σ g·[x > hi];
    d 2^t / dt = 2^t·ln 2."""
    grad_s = ge if gr is None else ge + s * gr * F._INV_SQRT3
    return torch.stack([(grad_s - above) * s * _LN2, above * q * _LN2, below + above]).float()


@torch.no_grad()
def weight_forward(w, log_s, key, estimator: str, noise_ratio: float, out_dtype):
    """(x̂, lo[C], hi[C], index[2, C]) for C = log_s.numel() rows of w, walked in memory order (rows stay rows:
    dim 0 is outermost in a contiguous or channels-last weight); index: positions within the walked row."""
    s = torch.exp2(log_s).reshape(-1)
    w, _, back = walk(w)
    out, lo, hi, index = kernels().weight_forward(w, s, estimator != "ste", key, noise_ratio, out_dtype)
    return back(out), lo, hi, index


@torch.no_grad()
def weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator: str, delta: float, noise_ratio: float):
    """(grad_w, float32 d log_s per row)."""
    s = torch.exp2(log_s).reshape(-1)
    w, g, back = walk(w, g)
    dither = estimator != "lsq"
    grad_w, sums = kernels().backward(
        w, g, lo, s, _EMPTY, _EMPTY, _EMPTY, _EMPTY, False, MODES[estimator], delta, key, noise_ratio,
        dither, True, index, _EMPTY if g_lo is None else g_lo, _EMPTY if g_hi is None else g_hi,
    )  # fmt: skip
    grad_s = sums[2] + s * sums[3] * F._INV_SQRT3 if dither else sums[2]
    return back(grad_w), (grad_s * s * _LN2).float()
