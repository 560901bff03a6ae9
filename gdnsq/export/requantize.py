"""Requantization of the quantized convs whose output reaches no quantizer (the int8 target's ``requantize``).

A residual block's last conv and its shortcut conv end in an ``Add``, not in the next layer's input quantizer, so
their int32 accumulators have no int8 grid to land on: written exactly they are ``ConvInteger`` (int32) followed by a
float multiply-add, which onnxruntime runs in NCHW with weights unpacked per call — on resnet18 W2A2 these 11 of 20
convs took 71 % of the time and the export ran at 1.09x the FP32 latency. Requantizing their output onto an extra
8-bit grid gives onnxruntime the ``DQ -> Conv -> Q`` group it fuses into ``QLinearConv`` for every quantized conv:

    conv output y -> QuantizeLinear(s_y, zp) -> DequantizeLinear(s_y, zp) -> Add (the residual sum, float)

with ``s_y = max|y| / 127`` over calibration batches (the conv's input container: int8 with zero point 0, or
uint8 with zero point 128, since onnxruntime's QLinearConv has one type in and out). This is *not* the fake-quant
eval: y moves by up to s_y / 2, an 8-bit rounding of a tensor whose inputs and weights are on 2-8-bit grids. The
export reports each requantized conv with its grid, and ``runtime_accuracy`` counts the predictions that change.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..errors import ExportError


def output_ranges(proto, names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """max |tensor| over ``batches`` for each named tensor of the graph, run by onnxruntime without optimizations
    (so the tensors are the graph's own, not a fused kernel's)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    amax = dict.fromkeys(names, 0.0)
    seen = 0
    for x in batches:
        outs = sess.run(names, {input_name: x.detach().cpu().float().numpy()})
        for name, value in zip(names, outs):
            amax[name] = max(amax[name], float(np.abs(value).max()))
        seen += 1
    if not seen:
        raise ExportError("requantization needs at least one calibration batch")
    return amax


def requantize_conv_outputs(gr, convs: list, batches: Iterable[torch.Tensor]) -> list[dict]:
    """Insert ``Q -> DQ`` on each conv's output (8-bit, scale from ``output_ranges``) in the graph ``gr``
    (onnx_int8's ``_Graph``); returns one record per conv: its node, the grid and the calibrated range."""
    from onnx import helper

    names = [conv.output[0] for conv in convs]
    amax = output_ranges(gr.proto, names, batches)
    records = []
    for conv in convs:
        y = conv.output[0]
        x_zero = gr.const(gr.producer[conv.input[0]].input[2])
        unsigned = x_zero.dtype == np.uint8
        zp = np.array(128 if unsigned else 0, np.uint8 if unsigned else np.int8)
        # a conv whose output is all zero on the calibration data (a zero-initialised last BatchNorm) still gets a
        # normal step: a denormal one slows every float op that touches it
        scale = np.float32(amax[y] / 127.0 if amax[y] > 0 else 1.0)
        base = y + "_requant"
        gr.set_init(base + "_scale", np.array(scale, np.float32))
        gr.set_init(base + "_zero", zp)
        users = gr.consumers.get(y, [])
        for user in users:  # the consumers read the requantized tensor; the conv keeps its output name
            for i, name in enumerate(user.input):
                if name == y:
                    user.input[i] = base + "_dq"
        at = list(gr.g.node).index(conv) + 1
        gr.g.node.insert(at, helper.make_node("QuantizeLinear", [y, base + "_scale", base + "_zero"], [base + "_q"]))
        gr.g.node.insert(
            at + 1, helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero"], [base + "_dq"])
        )
        if y in gr.outputs:
            raise ExportError(f"{conv.name}: a graph output cannot be requantized")
        records.append(
            {"node": conv.name, "scale": float(scale), "zero_point": int(zp), "container": str(zp.dtype),
             "calibrated_max_abs": amax[y]}
        )  # fmt: skip
    gr.refresh()
    return records
