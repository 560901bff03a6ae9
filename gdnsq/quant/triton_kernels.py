"""Triton kernels of the quantizer ops (``ops.py``) on CUDA, launched by ``triton_ops.py``: one launch per
quantizer each way (adaptive EWGS on activations: two in backward, its scale needing the whole tensor's statistics
before any input gradient).

Same maths, float operation for float operation, as the torch reference (``functional.py``) and the CPU kernels
(``csrc/noisy_round.cpp``): precise division (``div_rn``), no FMA contraction (launched with
``enable_fp_fusion=False``), round half to even, float32 registers whatever the dtype in memory. The small
per-quantizer values (s = 2^log_s, hi = lo + 2^log_q - s, the gradients of the raw parameters) are computed
inside the kernels, and the key of the random draws (``dither.py``) is read from, and advanced in, the quantizer's
state on the device: no host synchronisation, no extra launch.

Reductions: a weight's per-channel sums belong to one program each (one row); an activation's per-tensor sums are
partial sums per program, added up (in float64, in program order: deterministic) by the last program to finish,
which a ticket counter finds. The same ticket lets the last forward program advance the key state after every
program has read it. Tickets live in a small per-device workspace that each last program resets to 0, so kernels
of these ops must not run concurrently on several streams of one device (they run in stream order).

Tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``), which runs this same code.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dither import KEY_MASK, KEY_STEP, NOISE_STREAM

_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_INV_SQRT3: tl.constexpr = tl.constexpr(0.5773502691896258)
_KEY_STEP: tl.constexpr = tl.constexpr(KEY_STEP)
_KEY_MASK: tl.constexpr = tl.constexpr(KEY_MASK)
_NOISE: tl.constexpr = tl.constexpr(NOISE_STREAM)
_LSQ: tl.constexpr = tl.constexpr(1)
_EWGS: tl.constexpr = tl.constexpr(2)
_AEWGS: tl.constexpr = tl.constexpr(3)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _rint(v):
    """Round half to even, exact for finite v (libdevice's rint has no interpreter implementation)."""
    f = tl.math.floor(v)
    d = v - f
    half = f * 0.5
    up = (d > 0.5) | ((d == 0.5) & (tl.math.floor(half) != half))
    return tl.where(up, f + 1.0, f)


@triton.jit
def _error(v, a, key_hi, ratio, NOISE: tl.constexpr):
    """e = round(v) - v, part of it replaced by uniform noise: e + ratio·((u - 1/2) - e) (dither.py's stream)."""
    e = _rint(v) - v
    if NOISE:
        u = (_mix32(a ^ key_hi ^ _NOISE) >> 8).to(tl.float32) * 5.9604644775390625e-08
        e = e + ratio * ((u - 0.5) - e)
    return e


@triton.jit
def _to(y, dtype: tl.constexpr):
    """float32 y as ``dtype``, rounded to nearest even. bfloat16 by hand, with c10's algorithm (torch's .to()): the
    interpreter's cast truncates; the GPU's rounds the same way as this."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = tl.where(y != y, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.jit
def _sign(g):
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))


@triton.jit
def _input_grad(g, e, d, delta, MODE: tl.constexpr):
    if MODE == _EWGS:
        return g - delta * tl.abs(g) * e
    elif MODE == _AEWGS:
        t = d * (_sign(g) * e)
        return g * (1.0 - tl.where(t > 0.99, 0.99, t))
    else:
        return g


@triton.jit
def _advance(key, state_ptr, key_out_ptr, ticket_ptr):
    """Every program has read ``key``; the last one to get here writes key + step to the state (and resets the
    ticket); program 0 records the key used, for the backward."""
    tl.debug_barrier()
    last = tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1
    tl.store(state_ptr, (key + _KEY_STEP) & _KEY_MASK, mask=last)
    tl.store(ticket_ptr, 0, mask=last)
    tl.store(key_out_ptr, key, mask=tl.program_id(0) == 0)


@triton.jit
def _act_forward_kernel(
    x_ptr, out_ptr, log_s_ptr, log_q_ptr, lo_ptr, key_ptr, key_out_ptr, ticket_ptr, n, ratio,
    ADVANCE: tl.constexpr, ADD_ERROR: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    s = tl.math.exp2(tl.load(log_s_ptr).to(tl.float32))
    lo = tl.load(lo_ptr).to(tl.float32)
    hi = (lo + tl.math.exp2(tl.load(log_q_ptr).to(tl.float32))) - s
    vlo, vhi = tl.math.div_rn(lo - lo, s), tl.math.div_rn(hi - lo, s)
    key = tl.load(key_ptr)
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):  # at most MAX_PROGRAMS tickets
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x - lo, s), vlo), vhi)
        if ADD_ERROR or NOISE:
            a = _mix32(offs.to(tl.uint32) ^ key.to(tl.uint32))
            v = v + _error(v, a, (key >> 32).to(tl.uint32), ratio, NOISE)
        else:
            v = _rint(v)
        tl.store(out_ptr + offs, _to(v * s + lo, out_ptr.dtype.element_ty), mask=mask)
    if ADVANCE:
        _advance(key, key_ptr, key_out_ptr, ticket_ptr)


@triton.jit
def _act_backward_kernel(
    g_ptr, x_ptr, gx_ptr, log_s_ptr, log_q_ptr, lo_ptr, key_ptr, partial_ptr, ticket_ptr, grads_ptr, scale_ptr,
    n, inv_n, ratio, delta,
    MODE: tl.constexpr, PHASE: tl.constexpr, NOISE: tl.constexpr, WRITE_GX: tl.constexpr, BLOCK: tl.constexpr,
    NPART: tl.constexpr,
):  # fmt: skip
    """PHASE 0: sums and input gradient; 1: sums and adaptive EWGS's statistics (its scale d to scale_ptr); 2: the
    input gradient with that d. The last program of phases 0 and 1 writes (d log_s, d log_q, d lo) to grads_ptr."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    s = tl.math.exp2(tl.load(log_s_ptr).to(tl.float32))
    q = tl.math.exp2(tl.load(log_q_ptr).to(tl.float32))
    lo = tl.load(lo_ptr).to(tl.float32)
    hi = (lo + q) - s
    vlo, vhi = tl.math.div_rn(lo - lo, s), tl.math.div_rn(hi - lo, s)
    key = tl.load(key_ptr)
    key_lo, key_hi = key.to(tl.uint32), (key >> 32).to(tl.uint32)
    d = tl.load(scale_ptr)  # written by phase 1 (adaptive EWGS); unused otherwise
    below = tl.zeros([BLOCK], tl.float32)
    above, ge, gr = tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32)
    sge, ee, es = tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x - lo, s), vlo), vhi)
        a = _mix32(offs.to(tl.uint32) ^ key_lo)
        e = _error(v, a, key_hi, ratio, NOISE)
        if PHASE != 2:
            ge += g * e
            if MODE != _LSQ:
                gr += g * tl.where((_mix32(a ^ key_hi) >> 31) != 0, 0.5, -0.5)
            below += tl.where(x < lo, g, 0.0)
            above += tl.where(x > hi, g, 0.0)
            if MODE == _AEWGS:
                em = tl.where(mask, e, 0.0)
                sge += _sign(g) * em
                ee += em * em
                es += em
        if WRITE_GX and PHASE != 1:
            out = tl.where((x < lo) | (x > hi), 0.0, _input_grad(g, e, d, delta, MODE))
            tl.store(gx_ptr + offs, _to(out, gx_ptr.dtype.element_ty), mask=mask)
    if PHASE != 2:
        cols = tl.arange(0, 8)
        row = tl.where(
            cols == 0, tl.sum(below), tl.where(cols == 1, tl.sum(above), tl.where(cols == 2, tl.sum(ge), 0.0))
        )
        row = tl.where(cols == 3, tl.sum(gr), tl.where(cols == 4, tl.sum(sge), row))
        row = tl.where(cols == 5, tl.sum(ee), tl.where(cols == 6, tl.sum(es), row))
        tl.store(partial_ptr + pid * 8 + cols, row)
        tl.debug_barrier()
        last = tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == nprog - 1
        rows = tl.arange(0, NPART)
        part = tl.load(partial_ptr + rows[:, None] * 8 + cols[None, :], mask=(rows[:, None] < nprog) & last,
                       other=0.0, volatile=True)  # fmt: skip
        tot = tl.sum(part.to(tl.float64), axis=0)
        t_below, t_above = tl.sum(tl.where(cols == 0, tot, 0.0)), tl.sum(tl.where(cols == 1, tot, 0.0))
        grad_s = tl.sum(tl.where(cols == 2, tot, 0.0)).to(tl.float32)
        if MODE != _LSQ:
            grad_s = grad_s + s * tl.sum(tl.where(cols == 3, tot, 0.0)).to(tl.float32) * _INV_SQRT3
        grad_hi = t_above.to(tl.float32)
        # s = 2^log_s enters x̂ directly and through hi = lo + 2^log_q - s; d 2^t / dt = 2^t·ln 2
        tl.store(grads_ptr, (grad_s - grad_hi) * s * _LN2, mask=last)
        tl.store(grads_ptr + 1, grad_hi * q * _LN2, mask=last)
        tl.store(grads_ptr + 2, t_below.to(tl.float32) + grad_hi, mask=last)
        if MODE == _AEWGS:  # as functional.aewgs_scale: float means, d = mean(sign(g)·e) / max(Var(e), 1e-3)
            num = tl.sum(tl.where(cols == 4, tot, 0.0)).to(tl.float32) * inv_n
            e2 = tl.sum(tl.where(cols == 5, tot, 0.0)).to(tl.float32) * inv_n
            me = tl.sum(tl.where(cols == 6, tot, 0.0)).to(tl.float32) * inv_n
            var = e2 - me * me
            tl.store(scale_ptr, tl.math.div_rn(num, tl.where(var < 1e-3, 1e-3, var)), mask=last)
        tl.store(ticket_ptr, 0, mask=last)


@triton.jit
def _weight_forward_kernel(
    w_ptr, out_ptr, log_s_ptr, lo_ptr, hi_ptr, index_ptr, key_ptr, key_out_ptr, ticket_ptr, C, K, ratio,
    ADD_ERROR: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row (output channel): its min, max and first arg-extremes, then x̂ with z = min."""
    c = tl.program_id(0)
    row = c.to(tl.int64) * K
    s = tl.math.exp2(tl.load(log_s_ptr + c).to(tl.float32))
    key = tl.load(key_ptr)
    mn, mx = tl.full([], float("inf"), tl.float32), tl.full([], -float("inf"), tl.float32)
    imn, imx = tl.full([], 0, tl.int32), tl.full([], 0, tl.int32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
        bmn, bimn = tl.min(tl.where(offs < K, x, float("inf")), axis=0, return_indices=True)
        bmx, bimx = tl.max(tl.where(offs < K, x, -float("inf")), axis=0, return_indices=True)
        imn = tl.where(bmn < mn, k0 + bimn, imn)  # strict: an earlier block's tie keeps the first index
        mn = tl.where(bmn < mn, bmn, mn)
        imx = tl.where(bmx > mx, k0 + bimx, imx)
        mx = tl.where(bmx > mx, bmx, mx)
    tl.store(lo_ptr + c, _to(mn, lo_ptr.dtype.element_ty))
    tl.store(hi_ptr + c, _to(mx, hi_ptr.dtype.element_ty))
    tl.store(index_ptr + c, imn.to(tl.int64))
    tl.store(index_ptr + C + c, imx.to(tl.int64))
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x - mn, s)
        if ADD_ERROR or NOISE:
            a = _mix32((row + offs).to(tl.uint32) ^ key.to(tl.uint32))
            v = v + _error(v, a, (key >> 32).to(tl.uint32), ratio, NOISE)
        else:
            v = _rint(v)
        tl.store(out_ptr + row + offs, _to(v * s + mn, out_ptr.dtype.element_ty), mask=offs < K)
    _advance(key, key_ptr, key_out_ptr, ticket_ptr)


@triton.jit
def _weight_backward_kernel(
    g_ptr, w_ptr, gw_ptr, log_s_ptr, lo_ptr, index_ptr, glo_ptr, ghi_ptr, key_ptr, gls_ptr, C, K, inv_k, ratio, delta,
    MODE: tl.constexpr, NOISE: tl.constexpr, RANGE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: its step gradient, and the weight's gradient with the range's added at the
    arg-extremes (g_lo first, then g_hi, as autograd's sparse add)."""
    c = tl.program_id(0)
    row = c.to(tl.int64) * K
    s = tl.math.exp2(tl.load(log_s_ptr + c).to(tl.float32))
    z = tl.load(lo_ptr + c).to(tl.float32)
    key = tl.load(key_ptr)
    key_lo, key_hi = key.to(tl.uint32), (key >> 32).to(tl.uint32)
    d = tl.full([], 0.0, tl.float32)
    if MODE == _AEWGS:  # the row's statistics first: its scale multiplies every element's gradient
        sge, ee, es = tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(w_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
            a = _mix32((row + offs).to(tl.uint32) ^ key_lo)
            e = tl.where(offs < K, _error(tl.math.div_rn(x - z, s), a, key_hi, ratio, NOISE), 0.0)
            sge += _sign(g) * e
            ee += e * e
            es += e
        num, e2, me = tl.sum(sge) * inv_k, tl.sum(ee) * inv_k, tl.sum(es) * inv_k
        var = e2 - me * me
        d = tl.math.div_rn(num, tl.where(var < 1e-3, 1e-3, var))
    if RANGE_GRAD:
        imn, imx = tl.load(index_ptr + c), tl.load(index_ptr + C + c)
        glo, ghi = tl.load(glo_ptr + c).to(tl.float32), tl.load(ghi_ptr + c).to(tl.float32)
    ge, gr = tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
        a = _mix32((row + offs).to(tl.uint32) ^ key_lo)
        e = _error(tl.math.div_rn(x - z, s), a, key_hi, ratio, NOISE)
        ge += g * e
        if MODE != _LSQ:
            gr += g * tl.where((_mix32(a ^ key_hi) >> 31) != 0, 0.5, -0.5)
        out = _input_grad(g, e, d, delta, MODE)
        if RANGE_GRAD:
            out = tl.where(offs == imn, out + glo, out)
            out = tl.where(offs == imx, out + ghi, out)
        tl.store(gw_ptr + row + offs, _to(out, gw_ptr.dtype.element_ty), mask=offs < K)
    grad_s = tl.sum(ge)
    if MODE != _LSQ:
        grad_s = grad_s + s * tl.sum(gr) * _INV_SQRT3
    tl.store(gls_ptr + c, grad_s * s * _LN2)
