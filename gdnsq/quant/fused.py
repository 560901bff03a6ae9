"""The C++ kernels of the quantizer ops on the CPU (``csrc/noisy_round.cpp``), built on first use; ``cpu_ops.py``
calls them. This module imports nothing but torch, so that scripts/setup.sh can build the kernels by running it
while pip installs the rest.

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
import os
import platform
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "noisy_round.cpp"


@functools.cache
def kernels(width: str | None = None):
    """The compiled module (``take_key``, ``forward``, ``backward``, ``weight_forward``), or None where it cannot
    be built. ``width``: DEFAULT (the portable build, SSE4.1 on x86-64: what training uses), AVX512, AVX2, or
    "widest" for this CPU's widest (benchmarks compare them; see _X86_WIDER for why it is not the default)."""
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
        width = _vector_width() if width == "widest" else (width or "DEFAULT")
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-msse4.1")  # round-to-nearest-even in a vector instruction (every x86-64 CPU since 2008)
            flags += _X86_WIDER[width]
        return load(
            name="gdnsq_noisy_round_v2" + (f"_{width.lower()}" if _X86_WIDER.get(width) else ""),
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


# Wider vectors where the CPU has them, as torch's own kernels pick them (``torch.backends.cpu.get_cpu_capability``,
# lowered by ATEN_CPU_CAPABILITY): the backward's per-element hashes and sums run 2.5-3.5x faster in AVX-512 than in
# SSE4.1 (fp32, 1 thread: a 32x64x32x32 activation's backward 7.2 -> 2.0 ms, a 512x512x3x3 weight's 4.5 -> 1.9 ms;
# aewgs 15 -> 3.8 and 13 -> 4.0). Element values are the same at every width (no FMA: -ffp-contract=off); only the
# per-group sums, accumulated in SIMD lanes, round differently with another lane count (the step's and clamp's
# gradients, to float rounding). A separate build name per width, so a cache shared by unlike nodes keeps both.
# Not the default: on the method harness (small CNN, 432 steps, teacher harness:e73925f862) the AVX-512 build gave
# W1A1 85.2 / 87.3 / 78.3 (seeds 0-2) where the portable build gives 89.5 / 89.7 / 88.7; W2A2 95.2 +- 0.8 against
# 95.6 (2 seeds). The cause is not understood yet (rounding alone would not lose on every seed): opt-in until it is.
_X86_WIDER = {
    "AVX512": ["-mavx2", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mf16c"],
    "DEFAULT": [],
}


def _vector_width() -> str:
    """AVX512, AVX2 or DEFAULT: the widest vectors torch's CPU kernels use here."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an older torch or another platform: the portable build
        return "DEFAULT"
    return capability if capability in _X86_WIDER else "DEFAULT"


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package (a dependency) puts it beside this Python,
    which is not on PATH when the venv is not activated (``.venv/bin/gdnsq``, Ray workers)."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if os.path.exists(os.path.join(scripts, "ninja")):
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def applies(t: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the kernels take this tensor: on the CPU, float32 / bfloat16 / float16 in and out, and built."""
    return t.device.type == "cpu" and t.dtype in DTYPES and out_dtype in DTYPES and kernels() is not None


if __name__ == "__main__":  # scripts/setup.sh builds the kernels from this file while pip installs the rest
    raise SystemExit(0 if kernels() is not None else 1)
