"""Quantizer modules, quantized layers and surgery on real timm models."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as tF
from torch import nn

from gdnsq.config import QuantConfig, QuantRuleConfig
from gdnsq.errors import SurgeryError
from gdnsq.quant import QConv2d, QLinear, QuantSpec, iter_quantized
from gdnsq.quant.functional import exact_quantize, integer_codes
from gdnsq.quant.quantizer import ActivationQuantizer, WeightQuantizer
from gdnsq.training.bits import bits_table
from gdnsq.training.surgery import calibrate_model, fold_batchnorm, plan, quantize_model


def test_weight_calibration_sets_init_bits_per_channel():
    w = torch.randn(6, 3, 3, 3)
    q = WeightQuantizer(w.shape, per_channel=True)
    q.calibrate_(w, 8.0)
    assert torch.allclose(q.bits(w), torch.full((6, 1, 1, 1), 8.0), atol=1e-5)
    assert q.true_bits(w) == 8
    q.eval()
    codes = integer_codes(w, None, None, *q.grid(w)[2:])
    assert codes.min() == 0 and codes.max() == 255  # the extremes land exactly on the grid ends


def test_activation_calibration_signed_auto():
    q = ActivationQuantizer()
    q.observing = True
    q(torch.tensor([0.0, 3.0]))
    q.observing = False
    q.calibrate_(4.0)
    assert not bool(q.signed) and not q.lo.requires_grad
    assert q.bits().item() == pytest.approx(4.0) and q.true_bits() == 4
    lo, hi, z, s = q.grid()
    assert lo.item() == 0.0 and hi.item() == pytest.approx(3.0) and s.item() == pytest.approx(0.2)
    q2 = ActivationQuantizer()
    q2.observing = True
    q2(torch.tensor([-1.0, 3.0]))
    q2.observing = False
    q2.calibrate_(4.0)
    assert bool(q2.signed) and q2.lo.requires_grad and q2.lo.item() == -1.0


def test_from_float_shares_parameters_and_eval_equals_integer_inference():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = QConv2d.from_float(conv, QuantSpec(bound_w=4, bound_a=4))
    assert q.weight is conv.weight and q.bias is conv.bias
    x = torch.randn(2, 3, 8, 8)
    calibrate_model(nn.Sequential(q), [x], 4.0)
    q.eval()
    # integer inference: integer codes of input and weight, dequantized by their steps
    lo, hi, za, sa = q.act_quant.grid()
    _, _, zw, sw = q.weight_quant.grid(q.weight)
    xq = integer_codes(x, lo, hi, za, sa) * sa + za
    wq = integer_codes(q.weight, None, None, zw, sw) * sw + zw
    assert torch.allclose(q(x), tF.conv2d(xq, wq, q.bias, padding=1), atol=1e-6)
    back = q.to_float()
    assert back.weight is conv.weight and type(back) is nn.Conv2d
    baked = q.to_float(bake=True)
    assert torch.allclose(baked.weight, exact_quantize(q.weight, None, None, zw, sw))


def test_qlinear_round_trip_and_training_gradients():
    lin = nn.Linear(5, 3)
    q = QLinear.from_float(lin, QuantSpec(bound_w=2, bound_a=2))
    x = torch.randn(7, 5)
    calibrate_model(nn.Sequential(q), [x], 6.0)
    q.train()
    q(x).sum().backward()
    assert lin.weight.grad is not None and q.weight_quant.log_s.grad is not None
    assert q.act_quant.log_q.grad is not None


def test_surgery_on_timm_resnet18_keeps_edges_fp():
    m = timm.create_model("resnet18", num_classes=10)
    decisions = quantize_model(m, QuantConfig())
    names = {n for n, _ in iter_quantized(m)}
    assert "conv1" not in names and "fc" not in names
    assert "layer1.0.conv1" in names and "layer2.0.downsample.0" in names
    assert len(names) == 19
    assert {d.name for d in decisions if not d.quantized} == {"conv1", "fc"}


def test_rules_first_match_wins_and_per_layer_targets():
    m = timm.create_model("resnet18", num_classes=10)
    cfg = QuantConfig(
        keep_pointwise=True,
        rules=[
            QuantRuleConfig(pattern=r"^layer4\.", target_w=4, target_a=4),
            QuantRuleConfig(pattern=r"layer4\.1\.conv2", skip=True),  # never reached: the rule above wins
            QuantRuleConfig(pattern=r"^conv1$", skip=False),
        ],
    )
    quantize_model(m, cfg)
    layers = dict(iter_quantized(m))
    assert float(layers["layer4.1.conv2"].target_w) == 4.0
    assert float(layers["layer3.0.conv1"].target_w) == 2.0
    assert "conv1" in layers  # a rule can bring an edge layer back
    assert "layer2.0.downsample.0" not in layers  # 1x1 kept FP


def test_auto_estimator_is_aewgs_on_1_bit_grids_only():
    from gdnsq.training.models import SmallCNN

    m = SmallCNN(width=4)
    quantize_model(
        m,
        QuantConfig(
            target_w=2,
            target_a=2,
            rules=[
                QuantRuleConfig(pattern=r"^features\.4$", target_w=1, target_a=1),
                QuantRuleConfig(pattern=r"^fc\.0$", target_a=1),
            ],
        ),
    )
    est = {n: (l.weight_quant.estimator, l.act_quant.estimator) for n, l in iter_quantized(m)}
    assert est.pop("features.4") == ("aewgs", "aewgs") and est.pop("fc.0") == ("ste", "aewgs")
    assert set(est.values()) == {("ste", "ste")}
    pinned = SmallCNN(width=4)
    quantize_model(pinned, QuantConfig(target_w=1, target_a=1, estimator="ste"))  # a named estimator is kept
    assert {(l.weight_quant.estimator, l.act_quant.estimator) for _, l in iter_quantized(pinned)} == {("ste", "ste")}


def test_rule_matching_nothing_and_nothing_to_quantize_are_clear_errors():
    m = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(SurgeryError, match=r"quant.rules\[0\].pattern: 'nope' matches no"):
        plan(m, QuantConfig(rules=[QuantRuleConfig(pattern="nope")]))
    with pytest.raises(SurgeryError, match="nothing|no Conv2d/Linear layer left"):
        plan(m, QuantConfig(rules=[QuantRuleConfig(pattern=".", skip=True)]))


def test_surgery_on_timm_vit_quantizes_linears():
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    quantize_model(m, QuantConfig(target_w=4, target_a=4))
    names = {n for n, _ in iter_quantized(m)}
    assert "blocks.0.attn.qkv" in names and "blocks.0.mlp.fc2" in names
    assert "head" not in names and "patch_embed.proj" not in names
    calibrate_model(m, [torch.randn(2, 3, 32, 32)], 8.0)
    m.train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(r["true_bits_w"] == 8 for r in bits_table(m))


def test_fold_batchnorm_preserves_eval_output():
    m = timm.create_model("resnet18", num_classes=10).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    folded = copy.deepcopy(m)
    assert fold_batchnorm(folded) == 20
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())
    assert torch.allclose(folded(x), ref, atol=1e-4)


def test_freeze_batchnorm_mode():
    m = timm.create_model("resnet18", num_classes=10)
    quantize_model(m, QuantConfig(batchnorm="freeze"))
    assert not any(type(mod) is nn.BatchNorm2d for mod in m.modules())
    assert (
        not m.bn1.weight.requires_grad if hasattr(m.bn1, "weight") and isinstance(m.bn1.weight, nn.Parameter) else True
    )


def test_small_cnn_pool_matches_torch_max_pool_values_and_gradients():
    """The channels-last pooling of SmallCNN (a CPU speed-up) gives nn.MaxPool2d's outputs and gradients."""
    from gdnsq.training.models import MaxPool2d

    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(8, 16, 28, 28, generator=gen)).requires_grad_()
    g = torch.randn(8, 16, 14, 14, generator=gen)
    ours, ref = MaxPool2d(2)(x), nn.MaxPool2d(2)(x)
    assert torch.equal(ours, ref) and ours.is_contiguous()
    (ga,), (gb,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(ref, x, g)
    assert torch.equal(ga, gb)
    xt = x.detach().transpose(2, 3)  # not contiguous: torch's own path
    assert torch.equal(MaxPool2d(2)(xt), nn.MaxPool2d(2)(xt))
