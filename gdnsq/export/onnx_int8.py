"""Integer ONNX export: int8 / uint8 QDQ that runtimes turn into integer convolutions.

A model trained with ``quant.integer_grid`` has grids whose points are integers × s (z = k·s), so ONNX's own
``QuantizeLinear`` (``saturate(round(x / s) + zp)``) computes its codes with an *integer* zero point; the clamp to
the learned range [qmin, qmax] is a ``Clip`` on the integer codes (round is monotone, so clamping after rounding is
clamping before)::

    input:   x -> QuantizeLinear(s, zp) -> Clip(cmin, cmax) [integer] -> DequantizeLinear(s, zp) -> Conv / Gemm
    weight:  int8 codes (zero point 0, per output channel) -> DequantizeLinear(s, 0, axis=0) -> Conv / Gemm

BatchNormalization after a quantized conv is folded into it (per channel: the step is scaled by |γ/σ|, the codes
change sign with γ, the bias absorbs the rest), so ``DequantizeLinear`` feeds the convolution directly. Targets:

* ``int8`` (onnxruntime, OpenVINO): uint8 codes for non-negative inputs, int8 otherwise. onnxruntime fuses a
  ``DQ -> Conv -> (Relu) -> Q`` group into ``QLinearConv``; a quantized conv whose output reaches no quantizer (a
  residual branch's last conv, a shortcut) or one of another container than its input's is written as
  ``ConvInteger`` (exact int32 accumulation; weights as uint8 codes + 128, zero point 128, onnxruntime's fast
  case) followed by one float multiply-add by s_x·s_w and the bias, so every quantized conv runs on integer kernels.
* ``tensorrt``: int8 everywhere with zero point 0 (TensorRT's explicit quantization), every quantized conv fed by
  ``DequantizeLinear`` directly, Q and DQ adjacent (the clamp a float ``Clip`` at whole steps before Q), no
  ``ConvInteger``.

A model with float offsets (trained without ``quant.integer_grid``) is refused, one line naming the layer: its
grid cannot run on an integer kernel without changing it. Runtime outputs differ from the fake-quant eval by float
reassociation (BN folding, the runtime's bias and requantization rounding), so codes at a rounding tie can flip:
``runtime_accuracy`` counts the predictions that differ.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from ..errors import ExportError
from ..quant.layers import QConv2d, iter_quantized
from . import report as rep
from .grids import act_grid, weight_grid
from .requantize import requantize as requantize_graph

FORMAT = "gdnsq-onnx-int8/1"
TARGETS = ("int8", "tensorrt")
_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_NP = {"uint8": np.uint8, "int8": np.int8}


def _whole_steps(z: Tensor, s: Tensor) -> Tensor | None:
    """k with z == k·s in float32 (the integer grid's offset in steps), or None where z is a float offset."""
    k = torch.round(z / s)
    return k if torch.equal(k * s, z) else None


def _float_offset(name: str, what: str) -> ExportError:
    return ExportError(
        f"layer {name}: its {what} grid has a float offset (z not a whole number of steps), which integer kernels "
        "cannot run; train with quant.integer_grid: true, or export --onnx-target qdq (exact, float convs)"
    )


def integer_act(name: str, layer: nn.Module, target: str) -> dict | None:
    """The input's integer grid: scale, zero point, container and the code clamp [cmin, cmax] in the container."""
    g = act_grid(name, layer)
    if g is None:
        return None
    k = _whole_steps(torch.tensor(g.z), torch.tensor(g.s))
    if k is None:
        raise _float_offset(name, "input")
    lo_code, hi_code = int(k) + g.qmin, int(k) + g.qmax  # codes round(x/s) of the clamped range
    if target == "tensorrt" or lo_code < 0:
        dtype, zp = "int8", 0
    else:
        dtype, zp = "uint8", 0
    cmin, cmax = lo_code + zp, hi_code + zp
    lo, hi = _RANGE[dtype]
    clip_first = target == "tensorrt"
    if cmin < lo or cmax > hi:
        if target == "tensorrt" or hi_code - lo_code > 255:
            raise ExportError(
                f"layer {name}: input codes [{lo_code}, {hi_code}] do not fit {dtype} with zero point 0 "
                f"({g.bits} bits); the {target} target holds at most 8-bit grids that contain 0"
            )
        dtype, zp = "uint8", -lo_code  # an unsigned container shifted by an integer zero point
        cmin, cmax = 0, hi_code - lo_code
    return {
        "s": g.s,
        "zp": zp,
        "cmin": cmin,
        "cmax": cmax,
        "container": dtype,
        "bits": g.bits,
        "clip_first": clip_first,
    }


def integer_weight(name: str, layer: nn.Module) -> tuple[Tensor, Tensor, dict] | None:
    """(int8 codes q + k, per-channel scale, meta): ŵ = codes·s with zero point 0."""
    g = weight_grid(name, layer)
    if g is None:
        return None
    k = _whole_steps(g.z, g.s)
    if k is None:
        raise _float_offset(name, "weight")
    codes = g.codes + g.code_offset + k  # broadcasts k (C, 1, ...) over the codes
    if codes.min() < -128 or codes.max() > 127:
        raise ExportError(
            f"layer {name}: weight codes [{int(codes.min())}, {int(codes.max())}] do not fit int8 with zero point 0 "
            f"({g.bits} bits)"
        )
    scale = g.s.reshape(-1).expand(codes.shape[0]).clone()  # per channel, also for a per-tensor step (BN folding)
    meta = {"bits": g.bits, "container": "int8", "bits_min": min(g.channel_bits), "bits_max": max(g.channel_bits)}
    return codes.to(torch.int8), scale, meta


# ------------------------------------------------------------------------ custom ops (torch side)


@torch.library.custom_op("gdnsq_export::q_act_int", mutates_args=())
def q_act_int(x: Tensor, s: float, zp: int, cmin: int, cmax: int, container: str, clip_first: bool) -> Tensor:
    """(clamp(round(x/s) + zp, cmin, cmax) - zp)·s: ONNX's QuantizeLinear, Clip, DequantizeLinear."""
    st = torch.tensor(s, dtype=x.dtype)
    return (torch.clamp(torch.round(x / st) + zp, cmin, cmax) - zp) * st


@q_act_int.register_fake
def _(x, s, zp, cmin, cmax, container, clip_first):
    return torch.empty_like(x)


@torch.library.custom_op("gdnsq_export::dq_int8", mutates_args=())
def dq_int8(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """codes·s per output channel (``zero``: the int8 zero points, all 0, written out for TensorRT)."""
    return codes.to(torch.float32) * scale.reshape((-1,) + (1,) * (codes.dim() - 1))


@dq_int8.register_fake
def _(codes, scale, zero):
    return torch.empty(codes.shape, dtype=torch.float32)


def _translations(opset: int) -> dict:
    import onnx_ir as ir
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}")

    def const(v, dtype):
        return op.Constant(value=ir.tensor(np.array(v, dtype=dtype)))

    def q_act_onnx(x, s: float, zp: int, cmin: int, cmax: int, container: str, clip_first: bool):
        scale, zero = const(s, np.float32), const(zp, _NP[container])
        if clip_first and (cmin, cmax) != _RANGE[container]:
            # TensorRT wants Q -> DQ adjacent: the clamp as a float Clip at whole steps before Q, which rounds the
            # bounds to the same codes (round(k·s / s) = k), so clamping first is the same
            bounds = np.array([cmin - zp, cmax - zp], np.float32) * np.float32(s)
            x = op.Clip(x, const(bounds[0], np.float32), const(bounds[1], np.float32))
        q = op.QuantizeLinear(x, scale, zero)
        if not clip_first and (cmin, cmax) != _RANGE[container]:
            q = op.Clip(q, const(cmin, _NP[container]), const(cmax, _NP[container]))
        return op.DequantizeLinear(q, scale, zero)

    def dq_onnx(codes, scale, zero):
        return op.DequantizeLinear(codes, scale, zero, axis=0)

    return {torch.ops.gdnsq_export.q_act_int.default: q_act_onnx, torch.ops.gdnsq_export.dq_int8.default: dq_onnx}


class _IntLayer(nn.Module):
    def __init__(self, name: str, layer: nn.Module, target: str):
        super().__init__()
        self.act = integer_act(name, layer, target)
        w = integer_weight(name, layer)
        self.meta = {"kind": "conv" if isinstance(layer, QConv2d) else "linear", "act": self.act, "weight": None}
        if w is None:
            self.register_buffer("weight", layer.weight.detach().clone())
        else:
            self.register_buffer("codes", w[0])
            self.register_buffer("w_scale", w[1])
            self.register_buffer("w_zero", torch.zeros(w[1].shape, dtype=torch.int8))
            self.meta["weight"] = w[2]
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        if isinstance(layer, QConv2d):
            if layer.same_pad or layer.padding_mode != "zeros":
                raise ExportError(f"layer {name}: 'same' or non-zero padding is not supported by the integer export")
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            a = self.act
            x = torch.ops.gdnsq_export.q_act_int(
                x, a["s"], a["zp"], a["cmin"], a["cmax"], a["container"], a["clip_first"]
            )
        w = (
            self.weight
            if self.meta["weight"] is None
            else torch.ops.gdnsq_export.dq_int8(self.codes, self.w_scale, self.w_zero)
        )
        if self.meta["kind"] == "linear":
            return tF.linear(x, w, self.bias)
        return tF.conv2d(x, w, self.bias, **self.conv)


def int_model(model: nn.Module, target: str) -> tuple[nn.Module, dict[str, dict]]:
    """An eval-mode CPU copy of ``model`` with every quantized layer in its integer QDQ form."""
    out = copy.deepcopy(model).eval().cpu()
    layers = {}
    for name, layer in list(iter_quantized(out)):
        q = _IntLayer(name, layer, target)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, q)
        layers[name] = q.meta
    if not layers:
        raise ExportError("the model has no quantized layer to export")
    return out, layers


# ------------------------------------------------------------------------------ graph rewrites (onnx)


class _Graph:
    """Producers, consumers and initializers of an ONNX graph, for the two rewrites below."""

    def __init__(self, proto):
        from onnx import numpy_helper

        self.proto, self.g, self.nh = proto, proto.graph, numpy_helper
        self.inits = {t.name: t for t in self.g.initializer}
        self.refresh()

    def refresh(self):
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self.nh.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return self.nh.to_array(n.attribute[0].t)
        return None

    def set_init(self, name: str, value: np.ndarray) -> None:
        t = self.nh.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:
            self.g.initializer.append(t)
            self.inits[name] = self.g.initializer[-1]

    def weight_dq(self, conv):
        """The DequantizeLinear giving ``conv`` its weight from int8 initializer codes, or None."""
        dq = self.producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.inits:
            return None
        return dq


def fold_batchnorm(proto) -> int:
    """Fold every BatchNormalization that alone consumes a DQ-weight Conv's output into that Conv; returns the count."""
    gr, folded = _Graph(proto), 0
    for bn in [n for n in gr.g.node if n.op_type == "BatchNormalization"]:
        conv = gr.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(gr.consumers.get(conv.output[0], [])) != 1:
            continue
        dq = gr.weight_dq(conv)
        params = [gr.const(i) for i in bn.input[1:5]]
        if dq is None or any(p is None for p in params) or conv.output[0] in gr.outputs:
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        a = gamma / np.sqrt(var + eps)
        codes = gr.const(dq.input[0]).astype(np.int32)
        scale = gr.const(dq.input[1]).astype(np.float64)
        sign = np.where(a < 0, -1, 1).reshape((-1,) + (1,) * (codes.ndim - 1))
        codes = codes * sign
        dead = a == 0  # a constant channel: its output is beta
        codes[dead] = 0
        if codes.min() < -128 or codes.max() > 127:
            raise ExportError(f"{conv.name}: weight codes leave int8 when BatchNorm's sign is folded in")
        new_scale = np.where(dead, scale, scale * np.abs(a)).astype(np.float32)
        bias = gr.const(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        new_bias = ((bias - mean) * a + beta).astype(np.float32)
        gr.set_init(dq.input[0], codes.astype(np.int8))
        gr.set_init(dq.input[1], new_scale)
        bias_name = conv.output[0] + "_folded_bias"
        gr.set_init(bias_name, new_bias)
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        gr.g.node.remove(bn)
        gr.refresh()
        folded += 1
    return folded


def _quantizer_after(gr: _Graph, name: str):
    """The QuantizeLinear that ``name`` reaches directly or through Relu (what onnxruntime fuses), or None."""
    users = gr.consumers.get(name, [])
    if len(users) != 1 or name in gr.outputs:
        return None
    if users[0].op_type == "Relu":
        return _quantizer_after(gr, users[0].output[0])
    return users[0] if users[0].op_type == "QuantizeLinear" else None


def _fusable(gr: _Graph, conv, xdq) -> bool:
    """Whether onnxruntime makes ``conv`` a QLinearConv: a quantizer after it, in the container of its input."""
    q = _quantizer_after(gr, conv.output[0])
    if q is None or len(q.input) < 3 or len(xdq.input) < 3:
        return False
    zq, zx = gr.const(q.input[2]), gr.const(xdq.input[2])
    return zq is not None and zx is not None and zq.dtype == zx.dtype


def unfused_convs(gr: _Graph) -> list:
    """The quantized Convs (DQ-fed data and weight) that onnxruntime would leave float Convs: no quantizer after
    them, or one in another container than their input's (QLinearConv has one type in and out)."""
    convs = []
    for conv in [n for n in gr.g.node if n.op_type == "Conv"]:
        wdq, xdq = gr.weight_dq(conv), gr.producer.get(conv.input[0])
        if wdq is None or xdq is None or xdq.op_type != "DequantizeLinear" or _fusable(gr, conv, xdq):
            continue
        convs.append(conv)
    return convs


def integer_convs(proto) -> int:
    """Write each of :func:`unfused_convs` as ConvInteger (int32, exact) · s_x·s_w + bias; returns the count.
    onnxruntime fuses the others (DQ -> Conv -> Q) into QLinearConv itself."""
    from onnx import TensorProto, helper

    gr, done = _Graph(proto), 0
    for conv in unfused_convs(gr):
        wdq, xdq = gr.weight_dq(conv), gr.producer[conv.input[0]]
        sx, sw = gr.const(xdq.input[1]), gr.const(wdq.input[1])
        if sx is None or sw is None or sx.size != 1:
            continue
        out, base = conv.output[0], conv.output[0] + "_int"
        channels = sw.size
        gr.set_init(base + "_scale", (sw.astype(np.float32) * np.float32(sx)).reshape(1, channels, 1, 1))
        # uint8 weights (codes + 128, zero point 128): onnxruntime's ConvInteger has its fast kernel for uint8 x
        # uint8 only (measured: a 128-channel 3x3 conv on 8x128x14x14 took 132 ms with int8 weights, 16 with uint8)
        codes = gr.const(wdq.input[0]).astype(np.int16) + 128
        gr.set_init(base + "_w", codes.astype(np.uint8))
        gr.set_init(base + "_wzero", np.array(128, np.uint8))
        nodes = [
            helper.make_node(
                "ConvInteger",
                [xdq.input[0], base + "_w", xdq.input[2], base + "_wzero"],
                [base + "_acc"],
                name=base,
                **{a.name: helper.get_attribute_value(a) for a in conv.attribute},
            ),
            helper.make_node("Cast", [base + "_acc"], [base + "_f"], to=TensorProto.FLOAT),
        ]
        if len(conv.input) > 2 and conv.input[2]:
            nodes.append(helper.make_node("Mul", [base + "_f", base + "_scale"], [base + "_y"]))
            bias = gr.const(conv.input[2])
            gr.set_init(base + "_bias", bias.astype(np.float32).reshape(1, channels, 1, 1))
            nodes.append(helper.make_node("Add", [base + "_y", base + "_bias"], [out]))
        else:
            nodes.append(helper.make_node("Mul", [base + "_f", base + "_scale"], [out]))
        at = list(gr.g.node).index(conv)
        gr.g.node.remove(conv)
        for i, n in enumerate(nodes):
            gr.g.node.insert(at + i, n)
        done += 1
    gr.refresh()
    used = {i for n in gr.g.node for i in n.input}  # the float weights' DequantizeLinear, now unused
    for n in [n for n in gr.g.node if n.op_type == "DequantizeLinear" and not (set(n.output) & used)]:
        if not set(n.output) & gr.outputs:
            gr.g.node.remove(n)
    used = {i for n in gr.g.node for i in n.input}
    for t in [t for t in gr.g.initializer if t.name not in used]:  # the int8 codes the uint8 copies replaced
        gr.g.initializer.remove(t)
    return done


# ------------------------------------------------------------------------------------ export


@torch.no_grad()
def export_int8(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor,
    *,
    target: str = "int8",
    opset: int = 21,
    dynamic_batch: bool = True,
    requantize: bool = False,
    calibration: Iterable[Tensor] | None = None,
) -> dict:
    """Write the integer ONNX of ``model`` for ``target`` (``int8`` or ``tensorrt``); returns a report.

    ``requantize`` (int8 target): the convs whose output reaches no quantizer get an 8-bit output grid calibrated on
    ``calibration`` (input batches; default ``example_input``) so that onnxruntime runs every quantized conv as
    ``QLinearConv`` (gdnsq.export.requantize) — faster, no longer the fake-quant eval; without it they are exact
    ``ConvInteger``."""
    import onnx

    if target not in TARGETS:
        raise ExportError(f"unknown integer ONNX target {target!r}; choose one of {', '.join(TARGETS)}")
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        export_model, layers = int_model(model, target)
        x = example_input.detach().to("cpu", torch.float32)
        trace_x = torch.cat([x, x]) if dynamic_batch and x.shape[0] == 1 else x
        kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic_batch else {}
        try:
            program = torch.onnx.export(
                export_model, (trace_x,), None, dynamo=True, opset_version=opset, input_names=["input"],
                output_names=["logits"], verbose=False, custom_translation_table=_translations(opset), **kwargs,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the exporter's errors are pages long; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path}: torch.onnx.export failed ({type(e).__name__}: {first})") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        folded = fold_batchnorm(proto)
        requantized, conv_integer = [], 0
        if target == "int8" and requantize:
            graph = _Graph(proto)
            requantized = requantize_graph(graph, unfused_convs(graph), calibration or [x])
        elif target == "int8":
            conv_integer = integer_convs(proto)
        meta = {
            "gdnsq.format": FORMAT,
            "gdnsq.target": target,
            "gdnsq.requantized": json.dumps(requantized, separators=(",", ":")),
            "gdnsq.layers": json.dumps([{"name": n, **m} for n, m in layers.items()], separators=(",", ":")),
        }
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
        bits = {
            n: (m["weight"]["bits"] if m["weight"] else rep.FP_BITS, m["act"]["bits"] if m["act"] else rep.FP_BITS)
            for n, m in layers.items()
        }
        rows = rep.layer_rows(model, bits, x, {})
        return {
            "path": str(path),
            "format": FORMAT,
            "target": target,
            "opset": opset,
            "bytes_file": path.stat().st_size,
            "batchnorm_folded": folded,
            "conv_integer": conv_integer,
            "requantized": requantized,
            **{k: v for k, v in rep.totals(rows, 0, 0).items() if "bytes" not in k and k != "compression"},
        }
    finally:
        model.train(was_training)
