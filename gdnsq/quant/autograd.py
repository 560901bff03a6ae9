"""Autograd over the quantizer ops (``ops.py``): one quantizer, and a whole quantized conv / linear.

``QuantizeActivation`` / ``QuantizeWeight``: a quantizer alone, one op forward and one backward; it saves its input
(usually saved anyway: the ReLU before it keeps its output) and the key, never x̂ or a mask.

``QuantizedLayer``: input quantizer + weight quantizer + conv2d or linear as one autograd node, because of memory:
a conv saves its input for the weight's gradient, and a quantized conv's input is x̂, a second activation-sized
tensor beside the x the ReLU already keeps (+55 % saved bytes on a ResNet-18, +109 % with aewgs). This node saves
x instead and recomputes x̂ in backward (one replay of the forward kernel, same key, same values), so a quantized
network saves about what the float one does. Kernels per quantized conv, the convolution included:

    forward:  quantize_act, quantize_weight, convolution                                        3
    backward: replay_act, convolution_backward, quantize_act_backward, quantize_weight_backward   4 (aewgs: 5)

The weight's range (lo, hi per channel) is an output too: the bit-width penalty reads it, and its gradient reaches
the weight's arg-extremes inside quantize_weight_backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as tF
from torch import Tensor

from . import ops


class QuantizeActivation(torch.autograd.Function):
    """x̂ of an activation quantizer (``ops.quantize_act``); gradients to x, log_s, log_q, lo."""

    @staticmethod
    def forward(ctx, x, log_s, log_q, lo, state, estimator: str, delta: float, noise_ratio: float, out_dtype):
        out, key = ops.quantize_act(x, log_s, log_q, lo, state, estimator, noise_ratio, out_dtype)
        ctx.save_for_backward(x, log_s, log_q, lo, key)
        ctx.cfg = (estimator, delta, noise_ratio)
        return out

    @staticmethod
    def backward(ctx, g):
        x, log_s, log_q, lo, key = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grads = ops.quantize_act_backward(g, x, log_s, log_q, lo, key, *ctx.cfg, need[0])
        g_log_s, g_log_q, g_lo = grads.unbind()
        return (
            grad_x if need[0] else None,
            g_log_s if need[1] else None,
            g_log_q if need[2] else None,
            g_lo if need[3] else None,
            *[None] * 5,
        )


class QuantizeWeight(torch.autograd.Function):
    """(x̂, lo, hi) of a weight quantizer (``ops.quantize_weight``); lo, hi: the range per row, shape (C,)."""

    @staticmethod
    def forward(ctx, w, log_s, state, estimator: str, delta: float, noise_ratio: float, out_dtype, integer=False):
        ctx.set_materialize_grads(False)
        out, lo, hi, index, key = ops.quantize_weight(w, log_s, state, estimator, noise_ratio, out_dtype, integer)
        ctx.save_for_backward(w, log_s, lo, index, key)
        ctx.cfg = (estimator, delta, noise_ratio, integer)
        return out, lo, hi

    @staticmethod
    def backward(ctx, g, g_lo, g_hi):
        w, log_s, lo, index, key = ctx.saved_tensors
        grad_w, grad_log_s = _weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, ctx.cfg)
        return grad_w, (grad_log_s if g is not None else None), *[None] * 6


def _weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, cfg) -> tuple[Tensor, Tensor]:
    """(grad_w, grad_log_s shaped as log_s), with None gradients of x̂ or of the range read as zeros."""
    if g is None:  # only the range was used (the penalty alone)
        g = torch.zeros_like(w)
    if (g_lo is None) != (g_hi is None):
        g_lo = torch.zeros_like(lo) if g_lo is None else g_lo
        g_hi = torch.zeros_like(lo) if g_hi is None else g_hi
    grad_w, grad_log_s = ops.quantize_weight_backward(g, g_lo, g_hi, w, log_s, lo, index, key, *cfg)
    return grad_w, grad_log_s.view(log_s.shape)


class QuantizedLayer(torch.autograd.Function):
    """y = conv2d(x̂, ŵ, bias) or linear(x̂, ŵ, bias), x̂ and ŵ by the ops; returns (y, lo, hi) of the weight.

    ``act``: (log_s, log_q, lo, state) of the input quantizer, or None (input not quantized); ``layer``:
    ("conv", stride, padding, dilation, groups) or ("linear",); ``quant``: (act estimator, act delta, weight
    estimator, weight delta, noise_ratio, compute dtype[, integer weight grid]). Saves x (not x̂), ŵ, the weight and
    the keys.
    """

    @staticmethod
    def forward(ctx, x, w, bias, a_log_s, a_log_q, a_lo, a_state, w_log_s, w_state, layer: tuple, quant: tuple):
        ctx.set_materialize_grads(False)
        a_est, a_delta, w_est, w_delta, ratio, dtype, *integer = quant
        integer = bool(integer and integer[0])
        quantize_input = a_log_s is not None
        if quantize_input:
            xq, a_key = ops.quantize_act(x, a_log_s, a_log_q, a_lo, a_state, a_est, ratio, dtype)
        else:
            xq, a_key = x.to(dtype), None
        wq, lo, hi, index, w_key = ops.quantize_weight(w, w_log_s, w_state, w_est, ratio, dtype, integer)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # operands are in their compute dtype already
            if layer[0] == "conv":
                y = tF.conv2d(xq, wq, b, *layer[1:])
            else:
                y = tF.linear(xq, wq, b)
        # x̂ is recomputed in backward from x; without an input quantizer x̂ is x (cast), kept as is
        ctx.save_for_backward(x if quantize_input else xq, w, wq, lo, index, w_log_s, w_key, a_log_s, a_log_q, a_lo,
                              a_key)  # fmt: skip
        ctx.layer, ctx.quant, ctx.has_bias = layer, quant, bias is not None
        ctx.quantize_input = quantize_input
        return y, lo, hi

    @staticmethod
    def backward(ctx, g, g_lo, g_hi):
        x, w, wq, lo, index, w_log_s, w_key, a_log_s, a_log_q, a_lo, a_key = ctx.saved_tensors
        a_est, a_delta, w_est, w_delta, ratio, dtype, *integer = ctx.quant
        integer = bool(integer and integer[0])
        need = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_w_log_s = None
        a_grads = [None, None, None]
        if g is not None:
            xq = ops.replay_act(x, a_log_s, a_log_q, a_lo, a_key, a_est, ratio, dtype) if ctx.quantize_input else x
            act_params = ctx.quantize_input and any(need[3:6])  # the input quantizer's parameters need d x̂ too
            mask = (need[0] or act_params, True, ctx.has_bias and need[2])
            gxq, gwq, grad_b = _layer_backward(ctx.layer, g, xq, wq, mask)
            if ctx.quantize_input and mask[0]:
                gx, grads = ops.quantize_act_backward(gxq, x, a_log_s, a_log_q, a_lo, a_key, a_est, a_delta, ratio,
                                                      need[0])  # fmt: skip
                grad_x = gx if need[0] else None
                a_grads = [t if need[3 + i] else None for i, t in enumerate(grads.unbind())]
            elif need[0]:
                grad_x = gxq
        else:
            gwq = None
        if g is not None or g_lo is not None or g_hi is not None:
            grad_w, grad_w_log_s = _weight_backward(gwq, g_lo, g_hi, w, w_log_s, lo, index, w_key,
                                                    (w_est, w_delta, ratio, integer))  # fmt: skip
            grad_w_log_s = grad_w_log_s if g is not None else None
        return grad_x, grad_w, grad_b, *a_grads, None, grad_w_log_s, None, None, None


def _layer_backward(layer: tuple, g: Tensor, xq: Tensor, wq: Tensor, mask: tuple) -> tuple:
    """(d x̂, d ŵ, d bias) of conv2d / linear, None where ``mask`` says not wanted."""
    if layer[0] == "conv":
        stride, padding, dilation, groups = layer[1:]
        bias_sizes = [wq.shape[0]] if mask[2] else None
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, xq, wq, bias_sizes, stride, padding, dilation, False, [0, 0], groups, list(mask)
        )
        return gx, gw, gb
    g2 = g.reshape(-1, g.shape[-1])
    gx = (g @ wq) if mask[0] else None
    gw = g2.t().mm(xq.reshape(-1, xq.shape[-1]))
    gb = g2.sum(0) if mask[2] else None
    return gx, gw, gb


def quantized_layer(x: Tensor, weight: Tensor, bias, act, w_quant, layer: tuple, quant: tuple):
    """``QuantizedLayer.apply`` with ``act`` = (log_s, log_q, lo, state) or None, ``w_quant`` = (log_s, state)."""
    a = act if act is not None else (None, None, None, None)
    return QuantizedLayer.apply(x, weight, bias, *a, *w_quant, layer, quant)
