"""Export of quantized students: a packed integer file (exact reload) and ONNX with QDQ nodes.

* :func:`export_packed` / :func:`load_packed` — one checksummed file: weight codes bit-packed at each
  layer's learned width, grids and the rebuild recipe in a JSON manifest, FP tensors in FP16/FP32;
* :func:`export_onnx` — QuantizeLinear/DequantizeLinear on every quantized layer's weights and input,
  checked against the fake-quant eval logits with onnxruntime (:func:`run_onnx`);
* size and BOPs per layer and in total come back as the report of either export.

The ONNX side imports onnxscript/onnxruntime only when called.
"""

from __future__ import annotations

from ..errors import ExportError
from .packed import FORMAT, export_packed, load_packed, read_manifest
from .recipe import build_from_recipe, infer_recipe, recipe_from_config
from .report import format_report, measure_macs


def export_onnx(
    model, path, example_input, *, opset: int = 21, verify: bool = True, dynamic_batch: bool = True
) -> dict:
    """See :func:`gdnsq.export.onnx_qdq.export_onnx`."""
    from .onnx_qdq import export_onnx as _export

    return _export(model, path, example_input, opset=opset, verify=verify, dynamic_batch=dynamic_batch)


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
    "run_onnx",
    "code_flips",
    "infer_recipe",
    "recipe_from_config",
    "build_from_recipe",
    "format_report",
    "measure_macs",
]
