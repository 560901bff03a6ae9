"""The int8 target's ``requantize``: 8-bit grids for the tensors a quantized model leaves in float, so that
onnxruntime runs the whole network on its int8 kernels (``QLinearConv``, ``QLinearAdd``), as its own static int8
quantization does.

Exact, the int8 export runs every quantized conv on an integer kernel but not fast: a residual block's last conv and
its shortcut conv end in an ``Add``, not in a quantizer, so their int32 accumulators have no int8 grid to land on
and run as ``ConvInteger`` (NCHW, weights unpacked per call), the sums and the FP stem stay float: resnet18 W2A2
measured 1.09x the FP32 latency, onnxruntime's own int8 0.40x. ``requantize`` adds, calibrated on input batches:

* each such conv's output: ``Q -> DQ`` on an 8-bit grid in its input's container (QLinearConv has one type in and
  out; uint8 with an integer zero point, or int8 with 0), step from the calibrated [min, max];
* each residual sum those convs feed (its other input, and its output after its Relu): uint8, so the sum runs as
  ``QLinearAdd``; each quantized layer that reads the sum gets its own copy of it (``_sum_per_quantizer``), so its
  codes come straight from a ``QLinearAdd`` on its own learned grid, not from the 8-bit sum rounded again;
* each FP conv (the stem kept FP by surgery): 8-bit weights per output channel (zero point 0) and 8-bit input and
  output grids, as onnxruntime's quantize_static writes them;
* a MaxPool fed by a grid keeps that grid after it (exact: max commutes with a monotone rounding).

This is *not* the fake-quant eval: each added grid rounds a float tensor to 8 bits (a step of range/255). The
export lists every requantized tensor with its grid (report ``requantized``, metadata ``gdnsq.requantized``), and
``runtime_accuracy``, run on the test split, counts the predictions that change; the tests bound the top-1 cost.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..errors import ExportError


def output_ranges(proto, names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(min, max) over ``batches`` of each named tensor of the graph, run by onnxruntime without optimizations (so
    the tensors are the graph's own, not a fused kernel's)."""
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
    ranges = dict.fromkeys(names, (0.0, 0.0))
    seen = 0
    for x in batches:
        outs = sess.run(names, {input_name: x.detach().cpu().float().numpy()})
        for name, value in zip(names, outs):
            lo, hi = ranges[name]
            ranges[name] = (min(lo, float(value.min())), max(hi, float(value.max())))
        seen += 1
    if not seen:
        raise ExportError("requantization needs at least one calibration batch")
    return ranges


def _residual_tensors(gr, conv_outputs: set[str]) -> list[str]:
    """The float tensors of each residual sum fed by a requantized conv: the sum's other inputs, and its output
    (after its Relu when the Relu alone reads it), so that onnxruntime can run the sum as ``QLinearAdd``."""
    tensors = []
    for add in [n for n in gr.g.node if n.op_type == "Add" and set(n.input) & conv_outputs]:
        # not a pool's output: it takes the grid of the pool's input (_pools_on_grids)
        tensors += [
            t for t in add.input
            if t not in conv_outputs and gr.const(t) is None and getattr(gr.producer.get(t), "op_type", "") != "MaxPool"
        ]  # fmt: skip
        out = add.output[0]
        users = gr.consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Relu" and out not in gr.outputs:
            out = users[0].output[0]
        tensors.append(out)
    return list(dict.fromkeys(t for t in tensors if t not in gr.outputs and t in gr.producer))


def _sum_per_quantizer(gr, name: str) -> int:
    """Give each QuantizeLinear reading the residual sum ``name`` (a quantized layer's input grid) its own copy of
    the sum (and its Relu), so that onnxruntime writes that layer's codes straight from a ``QLinearAdd`` instead of
    dequantizing the 8-bit sum and quantizing it again (two float passes over the tensor per block, and a double
    rounding); returns the count of copies."""
    from onnx import helper

    last = gr.producer[name]
    chain = [last] if last.op_type == "Add" else [gr.producer[last.input[0]], last]  # Add, or Add -> Relu
    copies = 0
    for i, q in enumerate([u for u in gr.consumers.get(name, []) if u.op_type == "QuantizeLinear"]):
        prev, nodes = None, []
        for node in chain:
            inputs = list(node.input) if prev is None else [prev] + list(node.input[1:])
            prev = f"{node.output[0]}_for_{q.output[0]}"
            nodes.append(helper.make_node(node.op_type, inputs, [prev], name=f"{node.name}_copy{i}"))
        at = list(gr.g.node).index(last) + 1
        for j, node in enumerate(nodes):
            gr.g.node.insert(at + j, node)
        q.input[0] = prev
        copies += 1
    gr.refresh()
    return copies


def _drop_dead_nodes(gr) -> None:
    """Remove the nodes none of whose outputs is read or is a graph output (onnxruntime keeps them)."""
    while True:
        read = {i for n in gr.g.node for i in n.input} | gr.outputs
        dead = [n for n in gr.g.node if not set(n.output) & read]
        if not dead:
            break
        for n in dead:
            gr.g.node.remove(n)
    gr.refresh()


def _grid(lo: float, hi: float, unsigned: bool) -> tuple[np.float32, np.ndarray]:
    """8-bit (scale, zero point) covering [lo, hi] and 0: uint8 with an integer zero point (0 for a Relu's output),
    or int8 symmetric with zero point 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if unsigned:
        step = (hi - lo) / 255.0
        zp = np.array(int(np.clip(round(-lo / step), 0, 255)) if step > 0 else 0, np.uint8)
    else:
        step, zp = max(-lo, hi) / 127.0, np.array(0, np.int8)
    # all zero on the calibration data (e.g. a zero-initialised last BatchNorm): any normal step holds it, and a
    # denormal one would slow every float op that touches it
    return np.float32(step if step > 0 else 1.0), zp


def _insert_qdq(gr, name: str, scale: np.float32, zp: np.ndarray) -> None:
    """``name -> QuantizeLinear -> DequantizeLinear``, every reader of ``name`` rewired to the DQ's output."""
    from onnx import helper

    base = name + "_requant"
    gr.set_init(base + "_scale", np.array(scale, np.float32))
    gr.set_init(base + "_zero", zp)
    for user in gr.consumers.get(name, []):
        for i, t in enumerate(user.input):
            if t == name:
                user.input[i] = base + "_dq"
    at = list(gr.g.node).index(gr.producer[name]) + 1 if name in gr.producer else 0  # else a graph input
    q = helper.make_node("QuantizeLinear", [name, base + "_scale", base + "_zero"], [base + "_q"])
    dq = helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero"], [base + "_dq"])
    gr.g.node.insert(at, q)
    gr.g.node.insert(at + 1, dq)
    gr.refresh()


def fp_convs(gr) -> list:
    """The float Convs (a float weight initializer, no BatchNorm after them: the exporter folds it) - the layers
    the model keeps FP, such as the stem."""
    return [
        n for n in gr.g.node
        if n.op_type == "Conv" and n.input[1] in gr.inits and gr.const(n.input[1]).dtype == np.float32
        and not any(u.op_type == "BatchNormalization" for u in gr.consumers.get(n.output[0], []))
    ]  # fmt: skip


def _int8_weight(gr, conv) -> dict:
    """The float weight of ``conv`` as int8 codes per output channel (zero point 0, step max|w|/127) behind a
    DequantizeLinear, as onnxruntime's own static quantization writes it."""
    from onnx import helper

    w = gr.const(conv.input[1]).astype(np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    step = np.where(amax > 0, amax / 127.0, 1.0)
    codes = np.clip(np.round(w / step.reshape((-1,) + (1,) * (w.ndim - 1))), -127, 127).astype(np.int8)
    base = conv.input[1] + "_int8"
    gr.set_init(base, codes)
    gr.set_init(base + "_scale", step.astype(np.float32))
    gr.set_init(base + "_zero", np.zeros(w.shape[0], np.int8))
    dq = helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zero"], [base + "_dq"], axis=0)
    gr.g.node.insert(list(gr.g.node).index(conv), dq)
    conv.input[1] = base + "_dq"
    return {"tensor": conv.input[1], "role": "FP conv weight", "bits": 8, "max_abs_error": float(step.max() / 2)}


def _after_relu(gr, name: str) -> str:
    users = gr.consumers.get(name, [])
    return users[0].output[0] if len(users) == 1 and users[0].op_type == "Relu" and name not in gr.outputs else name


def _pools_on_grids(gr) -> int:
    """A MaxPool fed by a DequantizeLinear gets the same grid after it (exact: max commutes with a monotone
    rounding), so onnxruntime pools the integer codes; returns the count."""
    done = 0
    for pool in [n for n in gr.g.node if n.op_type == "MaxPool"]:
        dq = gr.producer.get(pool.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or pool.output[0] in gr.outputs:
            continue
        users = gr.consumers.get(pool.output[0], [])
        if any(u.op_type == "QuantizeLinear" and u.input[1] == dq.input[1] for u in users):
            continue
        _insert_qdq(gr, pool.output[0], gr.const(dq.input[1]), gr.const(dq.input[2]))
        done += 1
    return done


def requantize(gr, convs: list, batches: Iterable[torch.Tensor]) -> list[dict]:
    """Insert ``Q -> DQ`` (8-bit, calibrated on ``batches``) on each conv's output and on the residual sums they
    feed, in the graph ``gr`` (onnx_int8's ``_Graph``); returns one record per requantized tensor."""
    batches = list(batches)
    floats = fp_convs(gr)
    graph_inputs = {i.name for i in gr.g.input}
    fp_inputs = [  # those not on a grid already
        c.input[0] for c in floats if getattr(gr.producer.get(c.input[0]), "op_type", "") != "DequantizeLinear"
    ]
    fp_outputs = [_after_relu(gr, c.output[0]) for c in floats]
    conv_outputs = {conv.output[0]: conv for conv in convs}
    residual = _residual_tensors(gr, set(conv_outputs))
    for name in residual:
        if gr.producer[name].op_type in ("Add", "Relu"):
            _sum_per_quantizer(gr, name)
    _drop_dead_nodes(gr)  # a sum read by quantizers only (before a downsampling block) lives on in its copies
    residual = [t for t in residual if t in gr.producer]
    named = list(
        dict.fromkeys(t for t in fp_inputs + fp_outputs + list(conv_outputs) + residual if t not in graph_inputs)
    )
    ranges = output_ranges(gr.proto, named, batches)
    for name in fp_inputs:
        if name in graph_inputs:  # the network's input: its range straight from the batches
            ranges[name] = (min(float(x.min()) for x in batches), max(float(x.max()) for x in batches))
    records = []
    for conv in floats:  # the FP layers run as int8 too (8-bit weights per channel, 8-bit input and output)
        records.append(_int8_weight(gr, conv))
    for name in dict.fromkeys(fp_inputs + fp_outputs):
        scale, zp = _grid(*ranges[name], unsigned=True)
        _insert_qdq(gr, name, scale, zp)
        records.append(
            {"tensor": name, "role": "FP conv input" if name in fp_inputs else "FP conv output", "scale": float(scale),
             "zero_point": int(zp), "container": str(zp.dtype), "calibrated_range": list(ranges[name])}
        )  # fmt: skip
    for name in list(conv_outputs) + residual:
        conv = conv_outputs.get(name)
        if conv is not None:  # QLinearConv has one type in and out: the container of the conv's input
            unsigned = gr.const(gr.producer[conv.input[0]].input[2]).dtype == np.uint8
            scale, zp = _grid(*ranges[name], unsigned)
        else:
            scale, zp = _grid(*ranges[name], unsigned=True)
        _insert_qdq(gr, name, scale, zp)
        records.append(
            {"tensor": name, "role": "conv output" if conv is not None else "residual", "scale": float(scale),
             "zero_point": int(zp), "container": str(zp.dtype), "calibrated_range": list(ranges[name])}
        )  # fmt: skip
    _pools_on_grids(gr)
    gr.refresh()
    return records
