"""The CPU implementation of the quantizer ops (``ops.py``): the C++ kernels of ``csrc/noisy_round.cpp``, built on
first use, and the small torch computations around them (s = 2^log_s, the clamp bounds, the chain rule to the raw
parameters), done with the very torch ops of the reference graph so that x̂ and the input gradient are its values
bit for bit.

Why C++ and not inductor's generated code for the CPU: forward + backward of one quantizer, fp32, 2 threads
(``benchmarks/bench_quantizer_kernels.py``, load 8 on the 2 cores): a 32x64x56x56 activation took 64 ms with these
kernels and 90 ms with the reference graph compiled by ``torch.compile`` (2.8 s eager); a 256x2304 weight 40 ms
against 55 ms. They also need no compilation per shape, and keep the reductions deterministic whatever the thread
count (fixed pieces, float64 across them).

torch's JIT extension builder compiles the C++ source once per machine (about a minute) into its cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and reloads it from there in every later
process; it rebuilds by itself when the source or the flags change, and a file lock makes concurrent first
uses (DDP ranks, Ray workers) build once. Where the kernels cannot be built (no C++ compiler), quantizers
fall back to the pure-torch path of ``functional`` with one warning: same results, slower.

On CUDA the Triton kernels run instead (``triton_ops.py``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import functional as F
from .dither import kernel_layout

_SOURCE = Path(__file__).with_name("csrc") / "noisy_round.cpp"


@functools.cache
def kernels():
    """The compiled module (``take_key``, ``forward``, ``backward``, ``weight_forward``), or None where it cannot
    be built."""
    try:
        # Its import warns "No CUDA runtime is found" on CPU machines with a CUDA build of torch: not ours to show.
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load
        finally:
            quiet.setLevel(level)

        _ninja_on_path()
        # -ffp-contract=off: no fused multiply-add, so every float op rounds as the torch path's does.
        flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-msse4.1")  # round-to-nearest-even in a vector instruction (every x86-64 CPU since 2008)
        return load(
            name="gdnsq_noisy_round_v2",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"gdnsq: the fused quantizer kernel could not be built ({type(e).__name__}: {first}); "
            "quantizers use the (slower, equivalent) torch path",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package (a dependency) puts it beside this Python,
    which is not on PATH when the venv is not activated (``.venv/bin/gdnsq``, Ray workers)."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if os.path.exists(os.path.join(scripts, "ninja")):
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


MODES = {"ste": 0, "lsq": 1, "ewgs": 2, "aewgs": 3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LN2 = math.log(2.0)
_EMPTY = torch.empty(0)


def applies(t: Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the kernels take this tensor: on the CPU, float32 / bfloat16 / float16 in and out, and built."""
    return t.device.type == "cpu" and t.dtype in DTYPES and out_dtype in DTYPES and kernels() is not None


def _like(g: Tensor, x: Tensor) -> Tensor:
    """g laid out as x (the kernels walk both in x's memory order)."""
    return g if g.stride() == x.stride() else torch.empty_like(x, dtype=g.dtype).copy_(g)


def take_key(state: Tensor) -> Tensor:
    return kernels().take_key(state)


@torch.no_grad()
def act_forward(x, log_s, log_q, lo, key, estimator: str, noise_ratio: float, out_dtype) -> Tensor:
    lo, hi, s = F.activation_grid(log_s, log_q, lo)
    vlo, vhi = F._grid_bounds(lo, hi, lo, s)
    return kernels().forward(kernel_layout(x), lo, s, vlo, vhi, True, estimator != "ste", key, noise_ratio, out_dtype)


@torch.no_grad()
def act_backward(g, x, log_s, log_q, lo, key, estimator: str, delta: float, noise_ratio: float, need_grad_x: bool):
    """(grad_x or an empty tensor, float32 (d log_s, d log_q, d lo))."""
    lo, hi, s = F.activation_grid(log_s, log_q, lo)
    vlo, vhi = F._grid_bounds(lo, hi, lo, s)
    x = kernel_layout(x)
    dither = estimator != "lsq"
    grad_x, sums = kernels().backward(
        x, _like(g, x), lo, s, vlo, vhi, lo, hi, True, MODES[estimator], delta, key, noise_ratio, dither,
        need_grad_x, _EMPTY, _EMPTY, _EMPTY,
    )  # fmt: skip
    below, above, ge, gr = sums[:, 0]
    grads = param_grads_act(below, above, ge, gr if dither else None, s, torch.exp2(log_q))
    return (grad_x if need_grad_x else _EMPTY), grads


def param_grads_act(below: Tensor, above: Tensor, ge: Tensor, gr: Tensor | None, s: Tensor, q: Tensor) -> Tensor:
    """(d log_s, d log_q, d lo) from the per-tensor sums: the step gets Σ g·n + s·Σ g·r/√3 (``gr`` None: lsq's
    residual alone) directly and -Σ g·[x > hi] through hi = lo + q - s; lo gets Σ g·[x < lo] + Σ g·[x > hi];
    d 2^t / dt = 2^t·ln 2."""
    grad_s = ge if gr is None else ge + s * gr * F._INV_SQRT3
    return torch.stack([(grad_s - above) * s * _LN2, above * q * _LN2, below + above]).float()


@torch.no_grad()
def weight_forward(w, log_s, key, estimator: str, noise_ratio: float, out_dtype):
    """(x̂, lo[C], hi[C], index[2, C]) for C = log_s.numel() rows of w."""
    s = torch.exp2(log_s).reshape(-1)
    return tuple(kernels().weight_forward(w.contiguous(), s, estimator != "ste", key, noise_ratio, out_dtype))


@torch.no_grad()
def weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, estimator: str, delta: float, noise_ratio: float):
    """(grad_w, float32 d log_s per row)."""
    s = torch.exp2(log_s).reshape(-1)
    w = w.contiguous()
    dither = estimator != "lsq"
    grad_w, sums = kernels().backward(
        w, _like(g, w), lo, s, _EMPTY, _EMPTY, _EMPTY, _EMPTY, False, MODES[estimator], delta, key, noise_ratio,
        dither, True, index, _EMPTY if g_lo is None else g_lo, _EMPTY if g_hi is None else g_hi,
    )  # fmt: skip
    grad_s = sums[2] + s * sums[3] * F._INV_SQRT3 if dither else sums[2]
    return grad_w, (grad_s * s * _LN2).float()


if __name__ == "__main__":  # scripts/setup.sh builds the kernels from this file while pip installs the rest
    raise SystemExit(0 if kernels() is not None else 1)
