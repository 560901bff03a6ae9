"""Export of quantized students: a packed integer file (exact reload) and ONNX with QDQ nodes.

* :func:`export_packed` / :func:`load_packed` — one checksummed file: weight codes bit-packed at each
  layer's learned width, grids and the rebuild recipe in a JSON manifest, FP tensors in FP16/FP32;
* :func:`export_onnx` — QuantizeLinear/DequantizeLinear on every quantized layer's weights and input,
  checked against the fake-quant eval logits with onnxruntime (:func:`run_onnx`); ``target``: ``qdq`` (exact,
  float offsets, float convs), ``int8`` (integer grids: onnxruntime / OpenVINO run integer convolutions) or
  ``tensorrt`` (int8, zero point 0, DQ feeding every conv) — ``onnx_int8``;
* :func:`runtime_accuracy` — top-1 through onnxruntime or OpenVINO next to the fake-quant top-1;
* size and BOPs per layer and in total come back as the report of either export.

The ONNX side imports onnxscript/onnxruntime only when called.
"""

from __future__ import annotations

from ..errors import ExportError
from .packed import FORMAT, export_packed, load_packed, read_manifest
from .recipe import build_from_recipe, infer_recipe, recipe_from_config
from .report import format_report, measure_macs

ONNX_TARGETS = ("qdq", "int8", "tensorrt")


def export_onnx(
    model,
    path,
    example_input,
    *,
    opset: int = 21,
    verify: bool = True,
    dynamic_batch: bool = True,
    target: str = "qdq",
    requantize: bool = False,
    calibration=None,
) -> dict:
    """See :func:`gdnsq.export.onnx_qdq.export_onnx` (``target="qdq"``) and :func:`gdnsq.export.onnx_int8.export_int8`
    (``int8``, ``tensorrt``); ``verify``: the file run by onnxruntime on ``example_input`` against the model's
    fake-quant eval (``max_abs_diff``, ``top1_agree``); ``requantize``, ``calibration``: the int8 target's 8-bit grids
    for the tensors the model leaves in float (gdnsq.export.requantize), calibrated on ``calibration`` batches."""
    if target == "qdq":
        from .onnx_qdq import export_onnx as _export

        return _export(model, path, example_input, opset=opset, verify=verify, dynamic_batch=dynamic_batch)
    if requantize and target != "int8":
        raise ExportError(f"requantize is an option of the int8 target, not of {target!r}")
    if target not in ONNX_TARGETS:
        raise ExportError(f"unknown ONNX target {target!r}; choose one of {', '.join(ONNX_TARGETS)}")
    import torch

    from .onnx_int8 import export_int8

    out = export_int8(
        model, path, example_input, target=target, opset=opset, dynamic_batch=dynamic_batch, requantize=requantize,
        calibration=calibration,
    )  # fmt: skip
    if verify:
        was = model.training
        model.eval()
        try:
            param = next(model.parameters(), None)
            x = example_input.detach().float()
            with torch.no_grad():
                ref = model(x.to(param.device if param is not None else "cpu")).float().cpu()
        finally:
            model.train(was)
        got = torch.from_numpy(run_onnx(path, x.cpu()))
        out["max_abs_diff"] = float((got - ref).abs().max())
        out["top1_agree"] = bool((got.argmax(-1) == ref.argmax(-1)).all())
    return out


def runtime_accuracy(model, path, batches, runtime: str = "onnxruntime") -> dict:
    """See :func:`gdnsq.export.runtimes.runtime_accuracy`."""
    from .runtimes import runtime_accuracy as _acc

    return _acc(model, path, batches, runtime)


def run_onnx(path, inputs):
    """See :func:`gdnsq.export.onnx_qdq.run_onnx`."""
    from .onnx_qdq import run_onnx as _run

    return _run(path, inputs)


def code_flips(model, path, inputs) -> list[dict]:
    """See :func:`gdnsq.export.onnx_qdq.code_flips`."""
    from .onnx_qdq import code_flips as _flips

    return _flips(model, path, inputs)


__all__ = [
    "ExportError",
    "FORMAT",
    "export_packed",
    "load_packed",
    "read_manifest",
    "export_onnx",
    "ONNX_TARGETS",
    "runtime_accuracy",
    "run_onnx",
    "code_flips",
    "infer_recipe",
    "recipe_from_config",
    "build_from_recipe",
    "format_report",
    "measure_macs",
]
