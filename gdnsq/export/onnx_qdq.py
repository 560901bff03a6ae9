"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) on every quantized layer's weights and input.

Our eval grid is ``x̂ = round((clamp(x, lo, hi) - z) / s)·s + z`` with a float zero point z (= lo,
generally not a multiple of s), while ONNX's QuantizeLinear computes
``saturate(round_half_even(x / scale) + zero_point)`` with an *integer* zero point. So z moves out of
the integer domain into explicit float ops, and the integer zero point is 0::

    input:   x -> Clip(lo, hi) -> Sub(z) -> QuantizeLinear(s, 0) -> DequantizeLinear(s, 0) -> Add(z)
    weight:  codes (uint8/int8 initializer) -> DequantizeLinear(s, 0, axis=0) -> Add(z[:, None, ...])

Each step is the same single float32 operation as in torch (torch.round is half-to-even too), so
the graph reproduces the fake-quant eval up to the accumulation order of the FP ops around it.
Codes live in the smallest container holding their range (uint8 for GDNSQ's q in [0, levels - 1]
with <= 8 bits; uint16/int16 above 8 bits, which needs opset >= 21); the real bit-widths are in
``metadata_props`` (``gdnsq.layers``: JSON list, ``gdnsq.layer.<name>``: JSON per layer).

Parity is exact up to float noise, and float noise matters exactly at rounding boundaries: the FP
ops between quantizers (conv/matmul accumulation order, LayerNorm, softmax, GELU) differ between
onnxruntime and torch in the last bits, so an input within that noise of a half-step rounds the
other way, and one flipped low-bit code can move the logits far more than 1e-4. Such flips are rare
(about 1e-7 per element here) but a ViT batch has ~1e6 quantized inputs; :func:`code_flips` tells a
flip at a boundary (margin ~1e-7 steps) from a real mismatch.

Built with the torch.export-based exporter (``dynamo=True``): quantized layers are swapped for
modules calling two custom ops, which ``custom_translation_table`` maps to the QDQ nodes above.
"""

from __future__ import annotations

import ast
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from ..errors import ExportError
from ..quant import functional as F
from ..quant.layers import QConv2d, iter_quantized
from . import report as rep
from .container import f32
from .grids import act_grid, container_dtype, weight_grid

FORMAT = "gdnsq-onnx-qdq/1"
_TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "uint16": torch.uint16, "int16": torch.int16}


# ------------------------------------------------------------------------ custom ops (torch side)


@torch.library.custom_op("gdnsq_export::qdq_act", mutates_args=())
def qdq_act(x: Tensor, lo: float, hi: float, z: float, s: float, qmin: int, qmax: int) -> Tensor:
    """Fake quantization of an input on a per-tensor grid (float32 values passed as Python floats)."""

    def t(v):
        return torch.tensor(v, dtype=x.dtype, device=x.device)

    return F.exact_quantize(x, t(lo), t(hi), t(z), t(s))


@qdq_act.register_fake
def _(x, lo, hi, z, s, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("gdnsq_export::dq_weight", mutates_args=())
def dq_weight(codes: Tensor, scale: Tensor, zero: Tensor, axis: int) -> Tensor:
    """codes·s + z: ``scale`` 1-D per output channel (axis 0) or 0-d; ``zero`` broadcastable to codes."""
    s = scale.reshape((-1,) + (1,) * (codes.dim() - 1)) if axis >= 0 else scale
    return codes.to(torch.float32) * s + zero


@dq_weight.register_fake
def _(codes, scale, zero, axis):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


# ------------------------------------------------------------------------------ ONNX translations


def _translations(opset: int) -> dict:
    import onnx_ir as ir
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}", None)
    if op is None:
        raise ExportError(f"onnxscript has no opset {opset}")

    def const(v, dtype):
        return op.Constant(value=ir.tensor(np.array(v, dtype=dtype)))

    def qdq_act_onnx(x, lo: float, hi: float, z: float, s: float, qmin: int, qmax: int):
        zp = const(0, np.dtype(container_dtype(qmin, qmax)))
        scale = const(s, np.float32)
        v = op.Clip(x, const(lo, np.float32), const(hi, np.float32))
        if z != 0.0:
            v = op.Sub(v, const(z, np.float32))
        y = op.DequantizeLinear(op.QuantizeLinear(v, scale, zp), scale, zp)
        return op.Add(y, const(z, np.float32)) if z != 0.0 else y

    def dq_weight_onnx(codes, scale, zero, axis: int):
        y = op.DequantizeLinear(codes, scale, axis=axis) if axis >= 0 else op.DequantizeLinear(codes, scale)
        return op.Add(y, zero)

    return {
        torch.ops.gdnsq_export.qdq_act.default: qdq_act_onnx,
        torch.ops.gdnsq_export.dq_weight.default: dq_weight_onnx,
    }


# ----------------------------------------------------------------------- export-friendly layers


class _QDQLayer(nn.Module):
    """A quantized layer with constant grids: integer weight codes and a fixed input grid."""

    def __init__(self, name: str, layer: nn.Module, opset: int):
        super().__init__()
        wg, ag = weight_grid(name, layer), act_grid(name, layer)
        self.meta = {"kind": "conv" if isinstance(layer, QConv2d) else "linear", "weight": None, "act": None}
        self.act = None
        if ag is not None:
            dtype = container_dtype(ag.qmin, ag.qmax)
            self.act = (ag.lo, ag.hi, ag.z, ag.s, ag.qmin, ag.qmax)
            self.meta["act"] = {
                "bits": ag.bits,
                "container": dtype,
                "lo": f32(ag.lo),
                "hi": f32(ag.hi),
                "z": f32(ag.z),
                "s": f32(ag.s),
                "qmin": ag.qmin,
                "qmax": ag.qmax,
            }
        if wg is not None:
            q = wg.codes + wg.code_offset
            dtype = container_dtype(int(q.min()), int(q.max()))
            self.register_buffer("codes", q.to(_TORCH_DTYPES[dtype]))
            self.axis = 0 if wg.per_channel else -1
            self.register_buffer("w_scale", wg.s.reshape(-1).clone() if wg.per_channel else wg.s.reshape(()).clone())
            self.register_buffer("w_zero", wg.z.clone())  # (C, 1, ...) broadcasts against the codes
            self.meta["weight"] = {
                "bits": wg.bits,
                "container": dtype,
                "per_channel": wg.per_channel,
                "bits_min": min(wg.channel_bits),
                "bits_max": max(wg.channel_bits),
            }
        else:
            self.register_buffer("weight", layer.weight.detach().clone())
        for d in ("weight", "act"):
            if self.meta[d] and self.meta[d]["container"] in ("uint16", "int16") and opset < 21:
                raise ExportError(f"layer {name}: {d} codes need 16-bit QDQ containers; use opset >= 21")
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        if isinstance(layer, QConv2d):
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            self.same_pad, self.kernel_size = layer.same_pad, layer.kernel_size
            if layer.padding_mode != "zeros":
                raise ExportError(f"layer {name}: padding_mode {layer.padding_mode!r} is not supported")

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = torch.ops.gdnsq_export.qdq_act(x, *self.act)
        if self.meta["weight"] is not None:
            w = torch.ops.gdnsq_export.dq_weight(self.codes, self.w_scale, self.w_zero, self.axis)
        else:
            w = self.weight
        if self.meta["kind"] == "linear":
            return tF.linear(x, w, self.bias)
        if self.same_pad:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.conv["stride"], self.conv["dilation"])
            return tF.conv2d(x, w, self.bias, self.conv["stride"], 0, self.conv["dilation"], self.conv["groups"])
        return tF.conv2d(x, w, self.bias, **self.conv)


def qdq_model(model: nn.Module, opset: int = 21) -> tuple[nn.Module, dict[str, dict]]:
    """An eval-mode copy of ``model`` with every quantized layer replaced by its constant-grid QDQ form."""
    out = copy.deepcopy(model).eval().cpu()
    layers = {}
    for name, layer in list(iter_quantized(out)):
        q = _QDQLayer(name, layer, opset)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, q)
        layers[name] = q.meta
    if not layers:
        raise ExportError("the model has no quantized layer to export")
    return out, layers


# ------------------------------------------------------------------------------------ export, run


def run_onnx(path: str | os.PathLike, inputs) -> np.ndarray:
    """First output of the ONNX model at ``path`` for ``inputs`` (tensor or array), with onnxruntime on CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


@torch.no_grad()
def code_flips(model: nn.Module, path: str | os.PathLike, inputs: Tensor) -> list[dict]:
    """Per quantized layer: input codes where onnxruntime and torch disagree, and how close torch was to a tie.

    Each QuantizeLinear output of the file is compared with the codes torch's fake-quant eval computes
    for ``inputs``. ``margin`` is |frac(v) - 1/2| of the first flipped element (v = (x - z)/s in torch):
    ~1e-7 means float noise at a rounding boundary, a large margin means the graphs really differ.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    outs = {}
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        props = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))  # module path, innermost last
        if len(scopes) >= 2:
            outs[scopes[-2]] = node.output[0]
    grids, v_torch, hooks = {}, {}, []
    for name, layer in iter_quantized(model):
        g = act_grid(name, layer)
        if g is None or name not in outs:
            continue
        grids[name] = g

        def hook(mod, inp, name=name, g=g):
            xc = inp[0].detach().clamp(g.lo, g.hi)
            v_torch[name] = ((xc - torch.tensor(g.z)) / torch.tensor(g.s)).numpy()

        hooks.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    del proto.graph.output[1:]
    types = {
        "uint8": onnx.TensorProto.UINT8,
        "int8": onnx.TensorProto.INT8,
        "uint16": onnx.TensorProto.UINT16,
        "int16": onnx.TensorProto.INT16,
    }
    names = list(grids)
    for name in names:
        dtype = types[container_dtype(grids[name].qmin, grids[name].qmax)]
        proto.graph.output.append(onnx.helper.make_tensor_value_info(outs[name], dtype, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: inputs.detach().cpu().numpy().astype(np.float32)})[1:]
    rows = []
    for name, q in zip(names, got):
        v = v_torch[name]
        flipped = np.argwhere(np.round(v) != q.astype(np.int64))
        row = {"layer": name, "elements": int(v.size), "flips": int(len(flipped)), "margin": None}
        if len(flipped):
            vf = float(v[tuple(flipped[0])])
            row["margin"] = float(abs(vf - np.floor(vf) - 0.5))
        rows.append(row)
    return rows


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor,
    *,
    opset: int = 21,
    verify: bool = True,
    dynamic_batch: bool = True,
) -> dict:
    """Write ``model`` as ONNX with QDQ nodes; return a report (layers, bits, BOPs, parity if ``verify``).

    ``example_input``: one batch (N, C, H, W) used for tracing; the batch dimension stays dynamic unless
    ``dynamic_batch=False``. ``verify``: run the file with onnxruntime on ``example_input`` and compare with
    the model's fake-quant eval logits (``max_abs_diff``, ``top1_agree``).
    """
    path = Path(path)
    if not 13 <= opset:
        raise ExportError(f"{path}: opset {opset} has no per-channel DequantizeLinear; use opset >= 13")
    was_training = model.training
    model.eval()
    try:
        export_model, layers = qdq_model(model, opset)  # on CPU, whatever the model's device
        x = example_input.detach().to("cpu", torch.float32)
        trace_x = torch.cat([x, x]) if dynamic_batch and x.shape[0] == 1 else x  # batch 1 would be specialised
        kwargs = {}
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        try:
            program = torch.onnx.export(
                export_model,
                (trace_x,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                verbose=False,
                custom_translation_table=_translations(opset),
                **kwargs,
            )
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporter's errors are pages long; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path}: torch.onnx.export failed ({type(e).__name__}: {first})") from None
        props = program.model.metadata_props
        props["gdnsq.format"] = FORMAT
        props["gdnsq.zero_point"] = "float z applied by Sub before QuantizeLinear / Add after DequantizeLinear"
        props["gdnsq.layers"] = json.dumps([{"name": n, **m} for n, m in layers.items()], separators=(",", ":"))
        for name, meta in layers.items():
            props[f"gdnsq.layer.{name}"] = json.dumps(meta, separators=(",", ":"))
        path.parent.mkdir(parents=True, exist_ok=True)
        program.save(str(path))

        bits = {
            n: (m["weight"]["bits"] if m["weight"] else rep.FP_BITS, m["act"]["bits"] if m["act"] else rep.FP_BITS)
            for n, m in layers.items()
        }
        rows = rep.layer_rows(model, bits, x, {})
        out = {
            "path": str(path),
            "format": FORMAT,
            "opset": opset,
            "bytes_file": path.stat().st_size,
            **{k: v for k, v in rep.totals(rows, 0, 0).items() if "bytes" not in k and k != "compression"},
            "layers": rows,
        }
        if verify:
            param = next(model.parameters(), None)
            ref = model(x.to(param.device if param is not None else "cpu")).float().cpu()
            got = torch.from_numpy(run_onnx(path, x))
            out["max_abs_diff"] = float((got - ref).abs().max())
            out["top1_agree"] = bool((got.argmax(-1) == ref.argmax(-1)).all())
        return out
    finally:
        model.train(was_training)
