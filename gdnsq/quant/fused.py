"""The fused CPU kernels of the noisy rounding (``csrc/noisy_round.cpp``), built on first use: ``forward`` /
``backward`` (any GDNSQ quantizer) and ``weight_forward`` / ``weight_backward`` (a per-channel weight quantizer,
its range included).

torch's JIT extension builder compiles the C++ source once per machine (about a minute) into its cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and reloads it from there in every later
process; it rebuilds by itself when the source or the flags change, and a file lock makes concurrent first
uses (DDP ranks, Ray workers) build once. Where the kernels cannot be built (no C++ compiler), quantizers
fall back to the pure-torch path of ``functional`` with one warning: same results, slower.

On CUDA the torch path runs (no fused CUDA kernel yet).
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
def kernels():
    """The compiled module (``forward``, ``backward``), or None where it cannot be built."""
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
            name="gdnsq_noisy_round",
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


def groups(x: torch.Tensor, *params: torch.Tensor | None) -> int | None:
    """How many step groups the kernels see for ``x`` and its broadcast parameters: 1 (per tensor) or
    x.shape[0] (per output channel); None when the kernels do not apply (device, dtype, layout, shapes)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or x.dim() == 0:
        return None
    # Tracing (torch.compile, torch.export for MLflow's pt2 models) sees fake tensors without data, and
    # cannot trace into compiled code: the torch ops stand for the kernels there.
    if torch.compiler.is_compiling() or type(x) not in (torch.Tensor, torch.nn.Parameter):
        return None
    shape = torch.broadcast_shapes(*(p.shape for p in params if p is not None))
    if len(shape) > x.dim():
        return None
    shape = (1,) * (x.dim() - len(shape)) + tuple(shape)
    if any(n != 1 for n in shape[1:]) or shape[0] not in (1, x.shape[0]):
        return None
    return shape[0]


if __name__ == "__main__":  # scripts/setup.sh builds the kernels from this file while pip installs the rest
    raise SystemExit(0 if kernels() is not None else 1)
