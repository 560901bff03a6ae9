"""Counter-based random draws of the noisy channel: the step gradient's ±1/2 dither and the optional rounding noise.

Every draw is a pure function of (key, element index), so a kernel makes it where it needs it, on any device,
without state, without a table and without asking the host: the backward recomputes exactly the draws the forward
made. The same integer hash runs in the CPU kernels (``csrc/noisy_round.cpp``), the Triton kernels
(``triton_kernels.py``) and, as the reference, in torch below; the three give the same bits.

    a    = mix32(i ^ key_lo)                       i: the element's offset in memory (uint32)
    sign = mix32(a ^ key_hi)           -> r = +1/2 if its top bit is set, else -1/2
    unif = mix32(a ^ key_hi ^ NOISE)   -> u = (unif >> 8) · 2^-24, uniform on [0, 1) (24 exact bits)

``mix32`` is the "lowbias32" integer hash (C. Wellons, 2018): a bijection of uint32 with full avalanche.

Keys: a quantizer keeps one int64 ``state`` in [0, 2^62) as a buffer on its device; each training forward uses
key = state and advances state by an odd constant mod 2^62 (a Weyl sequence, so keys never repeat within 2^62
calls) inside the forward kernel itself. The state's first value is drawn from torch's global RNG when the
quantizer is built, so runs are reproducible under ``torch.manual_seed``; being a buffer, it is saved in and
restored from every checkpoint (state_dict) and broadcast by DDP with the other buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

KEY_BITS = 62
KEY_MASK = (1 << KEY_BITS) - 1
KEY_STEP = 0x9E3779B97F4A7C15 & KEY_MASK  # golden-ratio Weyl step, odd: the key sequence has period 2^62
NOISE_STREAM = 0x68E31DA4  # separates the rounding noise's bits from the dither's
_M32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B


def new_state() -> Tensor:
    """A fresh key state (int64, 0-dim, CPU) from torch's global RNG."""
    return torch.randint(0, KEY_MASK, (), dtype=torch.int64)


@torch.no_grad()
def next_key_(state: Tensor) -> Tensor:
    """The key for this call (a copy of ``state``), advancing ``state`` in place: what the kernels do, in torch."""
    key = state.clone()
    state.add_(KEY_STEP).bitwise_and_(KEY_MASK)
    return key


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for x in [0, 2^32) held in int64, in two 16-bit halves so no product overflows int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def _from_nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


def _same(t: Tensor) -> Tensor:
    return t


def memory_order(t: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(m, back): m a contiguous tensor with t's elements in the order the kernels walk them, and back(u) laying a
    tensor shaped like m out as t is. Contiguous and channels-last tensors are walked in memory order (m is a view,
    back a view: no copy; dim 0 stays first, so a weight's output channels stay rows); others row-major (a copy)."""
    if t.is_contiguous():
        return t, _same
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1), _from_nhwc
    return t.contiguous(), _same


def walk_format(t: Tensor) -> torch.memory_format:
    """The memory format of what the kernels write for an input laid out as t (``memory_order``)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def element_index(like: Tensor) -> Tensor:
    """Each element's position in the kernels' walk (``memory_order``), shaped and laid out like ``like`` (int64):
    the index the draws hash."""
    m, back = memory_order(like)
    return back(torch.arange(like.numel(), dtype=torch.int64, device=like.device).view(m.shape))


def _inner(like: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    key = key.to(like.device, torch.int64).reshape(())
    return _mix32(element_index(like) ^ (key & _M32)), key >> 32


def dither_signs(like: Tensor, key: Tensor | None = None) -> Tensor:
    """±1/2 per element of ``like`` (its dtype), fair and independent of its values; ``key`` None: a fresh key
    from torch's global RNG (``new_state``), so a call right after ``torch.manual_seed(k)`` repeats the draws a
    ``noisy_quantize`` call made right after the same seeding."""
    a, hi = _inner(like, new_state() if key is None else key)
    top = _mix32(a ^ hi) >> 31
    return (top.to(like.dtype) - 0.5).to(like.dtype)


def uniform_noise(like: Tensor, key: Tensor) -> Tensor:
    """Uniform on [0, 1) per element of ``like`` (float32, 24 exact bits), from the noise stream of ``key``."""
    a, hi = _inner(like, key)
    return (_mix32(a ^ hi ^ NOISE_STREAM) >> 8).to(torch.float32) * 2.0**-24
