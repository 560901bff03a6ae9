"""Under bf16 autocast the quantizers still compute in float32: integral codes, equal to the fp32 path's."""

import torch
from torch import nn

from gdnsq.config import QuantConfig
from gdnsq.quant.functional import integer_codes
from gdnsq.quant.layers import QConv2d, iter_quantized
from gdnsq.quant.spec import QuantSpec
from gdnsq.training.models import SmallCNN
from gdnsq.training.surgery import calibrate_model, quantize_model


def _layer(bits: float = 10.0) -> QConv2d:
    torch.manual_seed(0)
    layer = QConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), QuantSpec(bound_w=4, bound_a=4))
    x = torch.randn(4, 8, 12, 12)
    layer.act_quant.observing = True
    layer(x)
    layer.act_quant.observing = False
    layer.act_quant.calibrate_(bits)
    layer.weight_quant.calibrate_(layer.weight, bits)
    return layer


def _codes(out, lo, s):
    codes = (out - lo) / s
    return codes, (codes - codes.round()).abs().max().item()


def test_bf16_autocast_keeps_10_bit_codes_exact():
    layer = _layer(10.0).eval()
    x = torch.randn(4, 8, 12, 12).bfloat16()  # what a previous layer hands over under autocast
    with torch.no_grad():
        w32, a32 = layer.quantized_weight(), layer.quantize_input(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w16, a16, y16 = layer.quantized_weight(), layer.quantize_input(x), layer(x)
    assert y16.dtype == torch.bfloat16  # the conv itself ran in bf16
    assert w16.dtype == a16.dtype == torch.float32
    assert torch.equal(w16, w32) and torch.equal(a16, a32)
    for out, (lo, hi, z, s), src in (
        (w16, layer.weight_quant.grid(layer.weight), layer.weight),
        (a16, layer.act_quant.grid(), x.float()),
    ):
        codes, off = _codes(out, z, s)
        assert off < 1e-3
        assert torch.equal(codes.round(), integer_codes(src, lo, hi, z, s))
        assert codes.round().max() > 2**9  # a real 10-bit grid, which bf16 cannot hold:
        assert _codes(out.bfloat16().float(), z, s)[1] > 0.1


def test_training_forward_codes_exact_under_autocast():
    """Training under autocast: the quantizer ops compute the grid in float32 and hand the conv bf16 directly (no
    cast kernel around them): the fp32 path's exact codes, rounded once to bf16, the values autocast's cast before
    the conv made of them when the quantizers returned float32."""
    layer = _layer(10.0).train()
    x = torch.randn(4, 8, 12, 12)
    a32, w32 = layer.quantize_input(x), layer.quantized_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a16 = layer.quantize_input(x)
        w16 = layer.quantized_weight()
    lo, hi, z, s = layer.act_quant.grid()
    assert a32.dtype == w32.dtype == torch.float32 and a16.dtype == w16.dtype == torch.bfloat16
    assert torch.equal(a16, a32.bfloat16()) and torch.equal(w16, w32.bfloat16())
    assert _codes(a32.detach(), z, s)[1] < 1e-3
    assert (
        _codes(w32.detach(), layer.weight_quant.grid(layer.weight)[2], layer.weight_quant.grid(layer.weight)[3])[1]
        < 1e-3
    )


def test_whole_model_eval_codes_match_fp32():
    torch.manual_seed(0)
    model = SmallCNN()
    quantize_model(model, QuantConfig(target_w=4, target_a=4))
    calibrate_model(model, [torch.randn(16, 1, 28, 28)], init_bits=10)
    model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    captured = {}

    def hook(name):
        def record(module, args, out):
            captured.setdefault(name, []).append(out)

        return record

    for name, layer in iter_quantized(model):
        layer.act_quant.register_forward_hook(hook(name))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    for name, layer in iter_quantized(model):
        (out,) = captured[name]
        lo, hi, z, s = layer.act_quant.grid()
        assert out.dtype == torch.float32
        assert _codes(out, z, s)[1] < 1e-3, name
