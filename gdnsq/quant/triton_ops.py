"""The CUDA implementation of the quantizer ops (``ops.py``): launchers of the Triton kernels of
``triton_kernels.py``, one launch per op (two for adaptive EWGS's activation backward), no host synchronisation.

Grids: activations, at most 1,024 programs looping over the tensor in blocks of 1,024 elements (bounding the
tickets taken, and the partial sums the last program adds up); weights, one program per row (output channel).
Tickets: a per-device int32 counter, zero at rest, that the kernels' last program resets.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import triton_kernels
from .cpu_ops import walk
from .dither import next_key_

ESTIMATOR_CODES = {"ste": 0, "lsq": 1, "ewgs": 2, "aewgs": 3}
BLOCK = 1024
MAX_PROGRAMS = 1024  # partial sums of a per-tensor reduction: one per program, at most this many
launches = 0  # kernel launches so far (tests hold the one-launch-per-op count)

_tickets: dict[torch.device, Tensor] = {}


def _ticket(device: torch.device) -> Tensor:
    """The per-device ticket counter (int32, zero at rest: every kernel's last program resets it)."""
    if device not in _tickets:
        _tickets[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _tickets[device]


def _launch(kernel, grid, *args, **meta) -> None:
    global launches
    launches += 1
    kernel[grid](*args, enable_fp_fusion=False, **meta)  # no FMA: every product rounds, as in torch's graph


def act_forward(x, log_s, log_q, lo, key_src, estimator, noise_ratio, out_dtype, advance):
    """(x̂, key used): ``key_src`` is the state (advanced in the kernel) when ``advance``, else the key itself."""
    x, _, back = walk(x)
    out, n = torch.empty_like(x, dtype=out_dtype), x.numel()
    key = torch.empty((), dtype=torch.int64, device=x.device) if advance else key_src
    if n == 0:  # no program to advance the state: torch ops do it (an empty batch, never in a real step)
        return back(out), next_key_(key_src) if advance else key
    _launch(
        triton_kernels._act_forward_kernel, (min(triton.cdiv(n, BLOCK), MAX_PROGRAMS),),
        x, out, log_s, log_q, lo, key_src, key, _ticket(x.device), n, float(noise_ratio),
        ADVANCE=advance, ADD_ERROR=estimator != "ste", NOISE=noise_ratio > 0, BLOCK=BLOCK,
    )  # fmt: skip
    return back(out), key


def act_backward(g, x, log_s, log_q, lo, key, estimator, delta, noise_ratio, need_grad_x):
    """(grad_x or an empty tensor, float32 (d log_s, d log_q, d lo))."""
    x, g, back = walk(x, g)
    n = x.numel()
    grad_x = torch.empty_like(x) if need_grad_x else torch.empty(0, dtype=x.dtype, device=x.device)
    grads = (torch.zeros if n == 0 else torch.empty)(3, dtype=torch.float32, device=x.device)
    if n == 0:
        return (back(grad_x) if need_grad_x else grad_x), grads
    programs = min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)
    partial = torch.empty((programs, 8), dtype=torch.float32, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    mode = ESTIMATOR_CODES[estimator]
    args = (g, x, grad_x, log_s, log_q, lo, key, partial, _ticket(x.device), grads, scale, n, 1.0 / n)
    args += (float(noise_ratio), float(delta))
    meta = dict(MODE=mode, NOISE=noise_ratio > 0, BLOCK=BLOCK, NPART=triton.next_power_of_2(programs))
    kernel = triton_kernels._act_backward_kernel
    if mode == ESTIMATOR_CODES["aewgs"]:  # statistics and scale first, then the input gradient with that scale
        _launch(kernel, (programs,), *args, PHASE=1, WRITE_GX=False, **meta)
        if need_grad_x:
            _launch(kernel, (programs,), *args, PHASE=2, WRITE_GX=True, **meta)
    else:
        _launch(kernel, (programs,), *args, PHASE=0, WRITE_GX=need_grad_x, **meta)
    return (back(grad_x) if need_grad_x else grad_x), grads


def _row_block(k: int) -> int:
    return min(triton.next_power_of_2(max(k, 1)), BLOCK)


def weight_forward(w, log_s, state, estimator, noise_ratio, out_dtype):
    """(x̂, lo[C], hi[C], index[2, C], key used), C = log_s.numel() rows of w in memory order."""
    w, _, back = walk(w)
    C = log_s.numel()
    K = w.numel() // C
    out = torch.empty_like(w, dtype=out_dtype)
    lo, hi = w.new_empty(C), w.new_empty(C)
    index = torch.empty((2, C), dtype=torch.int64, device=w.device)
    key = torch.empty((), dtype=torch.int64, device=w.device)
    _launch(
        triton_kernels._weight_forward_kernel, (C,),
        w, out, log_s, lo, hi, index, state, key, _ticket(w.device), C, K, float(noise_ratio),
        ADD_ERROR=estimator != "ste", NOISE=noise_ratio > 0, BLOCK=_row_block(K),
    )  # fmt: skip
    return back(out), lo, hi, index, key


def weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator, delta, noise_ratio):
    """(grad_w, float32 d log_s per row); g_lo / g_hi: the range's gradient (None: none reached it)."""
    w, g, back = walk(w, g)
    C = log_s.numel()
    K = w.numel() // C
    grad_w = torch.empty_like(w)
    grad_log_s = torch.empty(C, dtype=torch.float32, device=w.device)
    range_grad = g_lo is not None
    _launch(
        triton_kernels._weight_backward_kernel, (C,),
        g, w, grad_w, log_s, lo, index, g_lo if range_grad else lo, g_hi if range_grad else lo, key, grad_log_s,
        C, K, 1.0 / K, float(noise_ratio), float(delta),
        MODE=ESTIMATOR_CODES[estimator], NOISE=noise_ratio > 0, RANGE_GRAD=range_grad, BLOCK=_row_block(K),
    )  # fmt: skip
    return back(grad_w), grad_log_s
