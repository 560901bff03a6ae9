"""Running an exported ONNX file on a deployment runtime, and its accuracy next to the fake-quant eval's.

* onnxruntime, CPU provider, at its default optimization level (``ORT_ENABLE_ALL``: the level where the QDQ
  fusions into ``QLinearConv`` happen, and where they could change outputs);
* OpenVINO (``openvino.Core().compile_model(path, "CPU")``), which reads the ONNX file directly; run with float32
  inference precision (its default is bfloat16 on CPUs that have it).

Both are imported only when used; a runtime that is not installed is a one-line error.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import ExportError

RUNTIMES = ("onnxruntime", "openvino")


def _require(module: str, runtime: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(
            f"runtime {runtime} is not installed (pip install 'gdnsq[deploy]', or pip install {runtime})"
        ) from None


def onnxruntime_session(path, optimized_path: str | os.PathLike | None = None, threads: int | None = None):
    """An onnxruntime CPU session at the default (full) optimization level; ``optimized_path``: where to save the
    graph as optimized (to see which nodes the fusions made)."""
    ort = _require("onnxruntime", "onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runner(path, runtime: str = "onnxruntime", threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function from an input batch (float32 NCHW array) to the file's first output, on ``runtime``."""
    if runtime == "onnxruntime":
        sess = onnxruntime_session(path, threads=threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    if runtime == "openvino":
        ov = _require("openvino", "openvino")
        # f32: OpenVINO's CPU plugin defaults to bfloat16 where the CPU has it (AMX / AVX512-BF16, as here), which
        # moved the digits test's logits by 3e-3 and its top-1 by 2.1 points; the float parts must stay float32.
        config = {
            "INFERENCE_NUM_THREADS": threads or max(1, torch.get_num_threads()),
            "INFERENCE_PRECISION_HINT": "f32",
        }
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()
        return lambda x: np.array(request.infer([np.ascontiguousarray(x, dtype=np.float32)])[compiled.output(0)])
    raise ExportError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def latency_ms(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``run(x)`` over ``repeats`` calls, in milliseconds."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def runtime_accuracy(model: nn.Module, path, batches: Iterable, runtime: str = "onnxruntime") -> dict:
    """Top-1 of the file on ``runtime`` and of the model's fake-quant eval over ``batches`` of (x, y), and how many
    predictions differ between the two (the honest measure of an integer export: a tie flipped by float
    reassociation shows up here, not in a logit tolerance)."""
    run = runner(path, runtime)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    n = correct_rt = correct_fq = differ = 0
    max_diff = 0.0
    try:
        for x, y in batches:
            ref = model(x.to(device)).float().cpu()
            got = torch.from_numpy(run(x.detach().cpu().float().numpy()))
            p_rt, p_fq = got.argmax(-1), ref.argmax(-1)
            n += len(y)
            correct_rt += int((p_rt == y).sum())
            correct_fq += int((p_fq == y).sum())
            differ += int((p_rt != p_fq).sum())
            max_diff = max(max_diff, float((got - ref).abs().max()))
    finally:
        model.train(was)
    if n == 0:
        raise ExportError("no samples to measure the runtime's accuracy on")
    return {
        "runtime": runtime,
        "samples": n,
        "top1_runtime": 100.0 * correct_rt / n,
        "top1_fake_quant": 100.0 * correct_fq / n,
        "differing_predictions": differ,
        "max_abs_diff": max_diff,
    }


def optimized_op_types(path, optimized_path) -> list[str]:
    """The node types of the graph onnxruntime runs after its optimizations (saved to ``optimized_path``)."""
    import onnx

    onnxruntime_session(path, optimized_path=optimized_path)
    return [n.op_type for n in onnx.load(str(optimized_path)).graph.node]
