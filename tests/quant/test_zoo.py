"""Exact tests of the method zoo (LSQ, DoReFa, PACT, PEGE, BNN++, CoDeQ) and its hooks in the shared harness."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from gdnsq.config import ObjectiveConfig, QuantConfig, load_config
from gdnsq.errors import ConfigError
from gdnsq.quant import QConv2d, QuantSpec, available_methods, iter_quantized
from gdnsq.quant import functional as F
from gdnsq.quant.zoo import bnnpp, codeq, common, dorefa, lsq, pact, pege
from gdnsq.training.bits import bits_table
from gdnsq.training.models import SmallCNN
from gdnsq.training.objective import (
    GDNSQObjective,
    bit_penalties,
    converged,
    extra_losses,
)
from gdnsq.training.surgery import calibrate_model, quantize_model

D = torch.float64
ROOT = Path(__file__).resolve().parents[2]
ZOO = ("lsq", "dorefa", "pact", "pege", "bnnpp", "codeq")


def t(v, grad=False):
    return torch.tensor(v, dtype=D, requires_grad=grad)


def ones_grad(out, *inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


def bits_for(method):
    return {"bnnpp": (1,), "codeq": (2, 4)}.get(method, (1, 2, 4))


# --------------------------------------------------------------------------------------- registry


def test_every_zoo_method_is_registered():
    assert set(ZOO) | {"gdnsq"} <= set(available_methods())


@pytest.mark.parametrize(
    "method, target, message",
    [
        ("bnnpp", 2, "W1A1"),
        ("codeq", 1, "at least 2 bits"),
    ],
)
def test_methods_refuse_targets_they_do_not_define(method, target, message):
    with pytest.raises(ConfigError, match=message):
        QConv2d.from_float(nn.Conv2d(2, 2, 3), QuantSpec(bound_w=target, bound_a=target, method=method))


def test_unknown_method_argument_names_the_setting():
    spec = QuantSpec(bound_w=2, bound_a=2, method="pege", method_args={"lambda": 1.0})
    with pytest.raises(ConfigError, match=r"quant.method_args.lambda: not a setting of method 'pege'"):
        QConv2d.from_float(nn.Conv2d(2, 2, 3), spec)


def test_method_args_reach_the_quantizers_from_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("quant:\n  method: pege\n  method_args: {error_weight: 0.5, ramp_end: 0.25}\n")
    cfg = load_config(path)
    assert cfg.quant.method_args == {"error_weight": 0.5, "ramp_end": 0.25}
    model = SmallCNN()
    quantize_model(model, cfg.quant)
    layer = next(layer for _, layer in iter_quantized(model))
    assert layer.weight_quant.error_weight == 0.5 and layer.act_quant.ramp_end == 0.25
    path.write_text("quant:\n  method_args: {error_weight: lots}\n")
    with pytest.raises(ConfigError, match="quant.method_args.error_weight: must be a number"):
        load_config(path)


def test_fractional_targets_round_up():
    assert common.int_bits(2.0) == 2 and common.int_bits(2.3) == 3 and common.int_bits(0.5) == 1


# --------------------------------------------------------------------------------------- shared pieces


def test_fake_quant_ste_equals_exact_quantize_and_passes_gradients():
    x = t([-2.0, -0.3, 0.1, 0.74, 0.76, 5.0], True)
    lo, hi, z, s = t(-1.0), t(1.5), t(-1.0), t(0.5)
    out = common.fake_quant_ste(x, lo, hi, z, s)
    assert torch.equal(out, F.exact_quantize(x.detach(), lo, hi, z, s))
    (gx,) = ones_grad(out, x)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_grad_scale_is_exact_identity_forward():
    s = t([0.1234567], True)
    out = common.grad_scale(s, 0.25)
    assert torch.equal(out, s.detach())
    (g,) = torch.autograd.grad(out.sum() * 3, s)
    assert g.item() == pytest.approx(0.75)


def test_code_stats_hand_computed():
    stats = common.code_stats(torch.tensor([0.0, 0.0, 1.0, -1.0]))
    assert stats == {"sparsity": 0.5, "entropy_bits": 1.5, "used_bits": pytest.approx(math.log2(3), abs=1e-4)}


# --------------------------------------------------------------------------------------- LSQ


def test_lsq_forward_and_gradients_hand_computed():
    # 2-bit signed: Q_n = 2, Q_p = 1, s = 0.5; v = x/s = [-4, -1.6, -0.4, 0.52, 1.48, 6]
    x = t([-2.0, -0.8, -0.2, 0.26, 0.74, 3.0], True)
    s = t(0.5, True)
    out = common.lsq_quantize(x, s, 2, 1, False, g=0.25)
    assert out.tolist() == [-1.0, -1.0, 0.0, 0.5, 0.5, 0.5]
    gx, gs = ones_grad(out, x, s)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # step terms: -Q_n, round(v)-v = -0.4, 0.4, 0.48, then +Q_p twice; sum 0.48, times g = 0.25
    assert gs.item() == pytest.approx(0.12, abs=1e-12)


def test_lsq_binary_grid_for_signed_one_bit():
    assert common.lsq_levels(1, signed=True) == (1, 1, True)
    assert common.lsq_levels(1, signed=False) == (0, 1, False)
    assert common.lsq_levels(3, signed=True) == (4, 3, False)
    x = t([-1.0, -0.2, 0.0, 0.3, 2.0], True)
    s = t(0.5, True)
    out = common.lsq_quantize(x, s, 1, 1, True, g=1.0)
    assert out.tolist() == [-0.5, -0.5, -0.5, 0.5, 0.5]
    gx, gs = ones_grad(out, x, s)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # sign(v) - v inside (-1 + 0.4, -1 - 0, 1 - 0.6), ±1 outside
    assert gs.item() == pytest.approx(-1.0 - 0.6 - 1.0 + 0.4 + 1.0, abs=1e-12)


def test_lsq_gradient_scale_and_init_per_channel():
    w = torch.randn(4, 3, 3, 3, dtype=D)
    q = lsq.LSQWeightQuantizer(w.shape, 4, per_channel=True).double()
    q.calibrate_(w, 8.0)
    s = torch.exp2(q.log_s.detach())
    assert torch.allclose(s, 2 * w.abs().mean(dim=(1, 2, 3), keepdim=True) / math.sqrt(7))
    assert q.grad_scale == pytest.approx(1 / math.sqrt(27 * 7))
    upstream = torch.randn_like(w)
    (g_log_s,) = torch.autograd.grad(q(w), q.log_s, upstream)
    # reference: plain autograd of the LSQ formula, no scaling, chained through s = 2**log_s
    s_ref = s.clone().requires_grad_(True)
    xc = torch.minimum(torch.maximum(w, -8 * s_ref), 7 * s_ref)
    ref = xc + s_ref * (torch.round(xc / s_ref) - xc / s_ref).detach()
    (g_s,) = torch.autograd.grad(ref, s_ref, upstream)
    assert torch.allclose(g_log_s, g_s * q.grad_scale * s * math.log(2), atol=1e-12)


def test_lsq_activation_calibration_unsigned_and_signed():
    q = lsq.LSQActQuantizer(2)
    q.observing = True
    q(torch.tensor([0.0, 1.0, 2.0, 5.0]))
    q.observing = False
    q.calibrate_(8.0)
    assert not bool(q.is_signed)
    lo, hi, z, s = q.grid()
    assert (
        s.item() == pytest.approx(2 * 2.0 / math.sqrt(3))
        and lo.item() == 0
        and hi.item() == pytest.approx(3 * s.item())
    )
    q2 = lsq.LSQActQuantizer(2)
    q2.observing = True
    q2(torch.tensor([-1.0, 3.0]))
    q2.observing = False
    q2.calibrate_(8.0)
    lo, hi, z, s = q2.grid()
    assert bool(q2.is_signed) and lo.item() == pytest.approx(-2 * s.item()) and hi.item() == pytest.approx(s.item())


# --------------------------------------------------------------------------------------- DoReFa / PACT


def test_dorefa_weights_hand_computed():
    w = torch.atanh(t([-0.9, -0.2, 0.1, 0.45])).reshape(4, 1)
    q = dorefa.DoReFaWeightQuantizer(w.shape, 2, per_channel=False).eval()
    # t = tanh(w)/0.9 = [-1, -2/9, 1/9, 1/2]; codes round(1.5·(t + 1)) = [0, 1, 2, 2]
    assert torch.allclose(q(w).reshape(-1), t([-1.0, -1 / 3, 1 / 3, 1 / 3]), atol=1e-12)
    assert q.codes(w).reshape(-1).tolist() == [0, 1, 2, 2]
    assert q.train()(w).reshape(-1).tolist() == q.eval()(w).reshape(-1).tolist()


def test_dorefa_weight_normalisation_gradcheck():
    q = dorefa.DoReFaWeightQuantizer(torch.Size((3, 4)), 3, per_channel=True)
    w = torch.randn(3, 4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(q._to_grid_domain, (w,))


def test_dorefa_one_bit_weights_mean_abs_sign_and_identity_gradient():
    w = t([[-3.0, -0.5, 0.5, 1.0]], True)
    q = dorefa.DoReFaWeightQuantizer(w.shape, 1, per_channel=True)
    out = q(w)
    assert out.tolist() == [[-1.25, -1.25, 1.25, 1.25]]  # E = mean|w| = 1.25
    (gw,) = ones_grad(out, w)
    assert gw.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert torch.equal(out, q.eval()(w.detach()))


def test_dorefa_activations_clip_to_unit_interval():
    q = dorefa.DoReFaActQuantizer(2)
    x = t([-0.5, 0.1, 0.2, 0.5, 0.9, 1.7], True).float()
    x = x.detach().requires_grad_(True)
    out = q(x)
    assert torch.allclose(out, torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]))
    (gx,) = ones_grad(out, x)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_pact_forward_and_alpha_gradient_hand_computed():
    q = pact.PACTActQuantizer(2, signed="unsigned", alpha_l2=0.1).double()
    with torch.no_grad():
        q.alpha.fill_(2.0)
    x = t([-1.0, 0.3, 0.4, 1.9, 2.5], True)
    out = q(x)  # s = 2/3: codes [0, 0, 1, 3, 3]
    assert torch.allclose(out, t([0.0, 0.0, 2 / 3, 2.0, 2.0]), atol=1e-12)
    gx, ga = ones_grad(out, x, q.alpha)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert ga.item() == 1.0  # d/dα = [x >= α]: only 2.5
    assert q.extra_loss().item() == pytest.approx(0.1 * 4.0)


def test_pact_signed_alpha_gradient_counts_both_tails():
    q = pact.PACTActQuantizer(3, signed="signed").double()
    q.is_signed.fill_(True)
    with torch.no_grad():
        q.alpha.fill_(1.0)
    x = t([-3.0, -2.0, 0.2, 1.5], True)
    (ga,) = ones_grad(q(x), q.alpha)
    assert ga.item() == 1.0 - 2.0


# --------------------------------------------------------------------------------------- PEGE


def test_pege_log_curriculum():
    assert pege.replacement_ratio(0.0, 0.8) == 0.0
    assert pege.replacement_ratio(0.8, 0.8) == pytest.approx(1.0)
    assert pege.replacement_ratio(1.0, 0.8) == pytest.approx(1.0)
    assert pege.replacement_ratio(0.4, 0.8) == pytest.approx(math.log10(5.5))
    rs = [pege.replacement_ratio(p / 20, 0.8) for p in range(21)]
    assert all(a <= b for a, b in zip(rs, rs[1:])) and rs[2] - rs[0] > rs[12] - rs[10]  # concave: fast, then slow


def test_pege_weights_progressive_replacement():
    w = torch.randn(8, 4, 3, 3, dtype=D, requires_grad=True)
    q = pege.PEGEWeightQuantizer(w.shape, 2).double()
    q.calibrate_(w.detach(), 8.0)
    full = lsq.LSQWeightQuantizer.forward(q.eval(), w.detach())
    q.train()
    q.set_progress(0.0)
    out = q(w)
    assert torch.equal(out, w.detach())
    (gw,) = ones_grad(out, w)
    assert torch.equal(gw, torch.ones_like(w))
    masks = []
    for p in (0.1, 0.3, 0.8):
        q.set_progress(p)
        out = q(w).detach()
        replaced = q.priority < q.ratio
        assert torch.equal(out[replaced], full[replaced]) and torch.equal(out[~replaced], w.detach()[~replaced])
        assert abs(replaced.double().mean().item() - q.ratio) < 0.1
        masks.append(replaced)
    assert bool((masks[0] <= masks[1]).all() and (masks[1] <= masks[2]).all())  # once quantized, stays quantized
    assert masks[2].all() and torch.equal(q(w).detach(), full)


def test_pege_activation_mask_follows_ratio_and_eval_is_full():
    q = pege.PEGEActQuantizer(2)
    q.observing = True
    q(torch.rand(1000) * 4)
    q.observing = False
    q.calibrate_(8.0)
    x = torch.rand(20000) * 4
    q.set_progress(0.4)  # r = log10(1 + 9·0.5) = 0.74
    out = q(x)
    replaced = (out != x).double().mean().item()
    assert abs(replaced - math.log10(5.5)) < 0.02
    assert torch.equal(q.eval()(x), F.exact_quantize(x, *q.grid()))


def test_pege_discretization_error_hand_computed():
    lo, hi, z, s = t(-4.0), t(4.0), t(0.0), t(0.5, True)
    x = t([0.1, 0.6, -0.3], True)
    err = pege.discretization_error(x, lo, hi, z, s)
    # x̄ = [0, 0.5, -0.5]: error² [0.01, 0.01, 0.04] over the power (0.01 + 0.36 + 0.09)
    assert err.item() == pytest.approx(0.06 / 0.46)
    gx, gs = torch.autograd.grad(err, (x, s))
    assert torch.allclose(gx, 2 * t([0.1, 0.1, 0.2]) / 0.46)
    assert gs.item() == pytest.approx(2 * (0.1 * -1 + 0.2 * 1) / 0.46)  # Σ 2(x - x̄)(-q), q = [0, 1, -1]
    # clipping counts: x = 9 on a grid ending at 4 has error 5 and pulls the step up
    clipped = pege.discretization_error(t([9.0]), t(0.0), t(4.0), t(0.0), s)
    assert clipped.item() == pytest.approx(25 / 81)
    (gs,) = torch.autograd.grad(clipped, s)
    assert gs.item() < 0


def test_pege_extra_loss_is_weighted_error_and_cleared():
    w = torch.randn(4, 3, 3, 3)
    q = pege.PEGEWeightQuantizer(w.shape, 2, error_weight=0.5)
    q.calibrate_(w, 8.0)
    q(w)
    lo, hi, z, s = q.grid(w)
    expected = 0.5 * pege.discretization_error(w, lo, hi, z, s)
    assert q.extra_loss().item() == pytest.approx(expected.item())
    assert q.extra_loss().item() == 0.0


# --------------------------------------------------------------------------------------- BNN++


def test_sign_swish_values_slope_and_limit():
    u = t([-2.0, -0.1, 0.0, 0.1, 2.0], True)
    assert bnnpp.sign_swish(u, 1.0)[2].item() == 0.0
    (g,) = torch.autograd.grad(bnnpp.sign_swish(u, 3.0)[2], u)
    assert g[2].item() == pytest.approx(3.0)  # SS_β'(0) = β
    assert torch.allclose(bnnpp.sign_swish(u, 1e4).detach(), torch.sign(u.detach()), atol=1e-6)
    assert bnnpp.annealed_beta(0.0, 1.0, 50.0, 0.8) == 1.0
    assert bnnpp.annealed_beta(0.4, 1.0, 50.0, 0.8) == pytest.approx(math.sqrt(50.0))
    assert bnnpp.annealed_beta(0.9, 1.0, 50.0, 0.8) == pytest.approx(50.0)


def test_bnnpp_matching_backward_gradcheck():
    wq = bnnpp.BNNppWeightQuantizer(torch.Size((3, 5)), beta_start=1.0, beta_end=50.0, ramp_end=0.8).double()
    wq.set_progress(0.3)
    assert torch.autograd.gradcheck(wq, (torch.randn(3, 5, dtype=D, requires_grad=True),))
    for signed in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, a, signed=signed: bnnpp.proximal_binarize(x, a, signed, 7.0),
            (torch.randn(6, dtype=D, requires_grad=True), t(1.3, True)),
        )
    aq = bnnpp.BNNppActQuantizer(beta_start=1.0, beta_end=50.0, ramp_end=0.8).double()
    aq.set_progress(0.5)
    x = torch.rand(6, dtype=D, requires_grad=True)
    out = aq(x)
    a = 2 ** aq.log_a.item()
    (gx,) = ones_grad(out, x)
    u = (x.detach() - a / 2) / (a / 2)
    ref = u.clone().requires_grad_(True)
    (gu,) = ones_grad(bnnpp.sign_swish(ref, aq.beta), ref)
    assert torch.allclose(gx, gu, atol=1e-12)  # dx̂/dx = h·SS'(u)/h


def test_bnnpp_eval_is_scaled_sign_per_channel():
    w = t([[0.2, -0.4, 0.6], [-3.0, 1.0, 0.0]])
    q = bnnpp.BNNppWeightQuantizer(w.shape, beta_start=1.0, beta_end=50.0, ramp_end=0.8).eval()
    assert torch.allclose(q(w), t([[0.4, -0.4, 0.4], [-4 / 3, 4 / 3, -4 / 3]]))  # α = mean|w|; w = 0 -> -α
    assert q.codes(w).tolist() == [[1, 0, 1], [0, 1, 0]]
    aq = bnnpp.BNNppActQuantizer(beta_start=1.0, beta_end=50.0, ramp_end=0.8).eval()
    aq.observing = True
    aq(torch.tensor([0.0, 1.0, 2.0, 1.0]))
    aq.observing = False
    aq.calibrate_(8.0)  # a = 2·mean|x| = 2: levels {0, 2}, threshold 1
    assert aq(torch.tensor([0.2, 0.99, 1.01, 7.0])).tolist() == [0.0, 0.0, 2.0, 2.0]


# --------------------------------------------------------------------------------------- CoDeQ


def test_codeq_dead_zone_forward_and_backward_hand_computed():
    w = t([0.1, -0.2, 0.3, 0.76, -1.0, 2.5], True)
    s, delta = t(0.5, True), t(0.5, True)
    out = codeq.dead_zone_quantize(w, s, delta, qmax=3)
    # |w|/s - δ = [-0.3, -0.1, 0.1, 1.02, 1.5, 4.5] -> ceil, clamp [0, 3] = [0, 0, 1, 2, 2, 3]
    assert out.tolist() == [0.0, -0.0, 0.5, 1.0, -1.0, 1.5]
    gw, gs, gd = ones_grad(out, w, s, delta)
    assert gw.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # pruned pass through, saturated stop
    assert gs.item() == pytest.approx((1 - 0.6) + (2 - 1.52) + (-2 + 2.0) + 3)  # k - w/s live, Q saturated
    assert gd.item() == pytest.approx(-0.5 - 0.5 + 0.5)  # -sign(w)·s on live weights
    wider = codeq.dead_zone_quantize(w.detach(), s.detach(), t(1.5), qmax=3)
    assert wider.tolist() == [0.0, -0.0, 0.0, 0.5, -0.5, 1.5]


def test_codeq_sparsity_stats_and_rate_term():
    w = t([[0.1, -0.2, 0.3, 0.76, -1.0, 2.5]]).float()
    q = codeq.CoDeQWeightQuantizer(w.shape, 3, per_channel=True, sparsity_weight=0.1)
    with torch.no_grad():
        q.log_s.fill_(-1.0)  # s = 0.5
        q.delta.fill_(1.5)
    stats = q.extra_stats(w)  # codes [0, 0, 0, 1, -1, 3]
    assert stats["sparsity"] == 0.5 and stats["dead_zone"] == 1.5
    assert stats["entropy_bits"] == pytest.approx(-(0.5 * math.log2(0.5) + 3 * (1 / 6) * math.log2(1 / 6)), abs=1e-4)
    assert stats["used_bits"] == 2.0
    q.train()(w)
    assert q.extra_loss().item() == pytest.approx(0.1 * (1 + 1 + 3) / 6)
    # the rate term widens the dead zone and grows sparsity
    loss = q.train()(w).abs().mean() * 0 + q.extra_loss()
    (gd,) = torch.autograd.grad(loss, q.delta)
    assert gd.item() < 0


def test_codeq_learns_sparsity_under_its_regulariser():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 32))
    q = codeq.CoDeQWeightQuantizer(w.shape, 4, per_channel=True, sparsity_weight=1.0)
    q.calibrate_(w.detach(), 8.0)
    before = q.extra_stats(w.detach())["sparsity"]
    opt = torch.optim.Adam(list(q.parameters()) + [w], lr=0.05)
    for _ in range(30):
        q.train()(w)
        loss = q.extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert q.extra_stats(w.detach())["sparsity"] > before + 0.2


# --------------------------------------------------------------------------------------- every method, every grid


@pytest.mark.parametrize("method, bits", [(m, b) for m in ZOO for b in bits_for(m)])
def test_eval_is_integral_inside_the_grid_and_fixed_bit(method, bits):
    conv = nn.Conv2d(3, 5, 3, padding=1)
    q = QConv2d.from_float(conv, QuantSpec(bound_w=bits, bound_a=bits, method=method))
    x = torch.relu(torch.randn(4, 3, 8, 8)) if method != "dorefa" else torch.rand(4, 3, 8, 8) * 1.5
    calibrate_model(nn.Sequential(q), [x], 8.0)
    wq, aq = q.weight_quant, q.act_quant
    assert not wq.learnable_bits and not aq.learnable_bits
    assert wq.true_bits(q.weight) == bits and aq.true_bits() == bits
    assert float(wq.bits(q.weight)) == bits and float(aq.bits()) == bits
    q.eval()
    with torch.no_grad():
        w_hat = wq(q.weight)
        lo, hi, z, s = wq.grid(q.weight)
        codes = F.integer_codes(w_hat, lo, hi, z, s)
        assert torch.equal(codes, codes.round()) and torch.equal(codes * s + z, w_hat)
        assert bool((codes >= torch.floor((lo - z) / s)).all() and (codes <= torch.ceil((hi - z) / s)).all())
        assert int(codes.amax() - codes.amin()) < 2**bits
        if wq.grid_domain == "input":
            assert torch.equal(F.exact_quantize(q.weight, lo, hi, z, s), w_hat)
        probe = torch.linspace(-3, 6, 2001)
        assert torch.equal(aq(probe), F.exact_quantize(probe, *aq.grid()))
        a_codes = aq.codes(probe)
        assert torch.equal(a_codes, a_codes.round()) and int(a_codes.max() - a_codes.min()) < 2**bits
        # the whole layer equals integer inference on the two grids
        xq = F.exact_quantize(x, *aq.grid())
        ref = torch.nn.functional.conv2d(xq, codes * s + z, conv.bias, padding=1)
        assert torch.allclose(q(x), ref, atol=1e-5)


@pytest.mark.parametrize("method", ZOO)
def test_penalty_ignores_fixed_bit_methods_and_they_count_as_converged(method):
    model = SmallCNN()
    bits = 1 if method == "bnnpp" else 2
    quantize_model(model, QuantConfig(method=method, target_w=bits, target_a=bits))
    calibrate_model(model, [torch.randn(8, 1, 28, 28)], 8.0)
    terms = bit_penalties(model, 1e-3, 1.0)
    assert terms.n_w == terms.n_a == 0 and float(terms.p_w) == float(terms.p_a) == 0.0
    assert converged(model)


# --------------------------------------------------------------------------------------- hooks in the harness


def test_objective_adds_the_extra_loss_terms():
    model = SmallCNN()
    quantize_model(model, QuantConfig(method="pact", target_w=2, target_a=2))
    calibrate_model(model, [torch.randn(8, 1, 28, 28)], 8.0)
    for _, layer in iter_quantized(model):
        layer.act_quant.alpha_l2 = 0.5
    alphas = [layer.act_quant.alpha.item() for _, layer in iter_quantized(model)]
    assert extra_losses(model).item() == pytest.approx(0.5 * sum(a * a for a in alphas), rel=1e-5)
    obj = GDNSQObjective(ObjectiveConfig(distill="ce"))
    logits, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    loss, parts = obj(model, logits, None, y, temperature=1.0)
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item() + parts["train/extra_loss"], rel=1e-5
    )
    gdnsq_model = SmallCNN()
    quantize_model(gdnsq_model, QuantConfig())
    assert extra_losses(gdnsq_model) is None


def test_engine_drives_set_progress_through_the_run():
    from gdnsq.training.engine import Engine

    cfg = load_config(
        None,
        {
            "quant.method": "pege",
            "train.epochs": 2,
            "objective.distill": "ce",
            "schedule.warmup_steps": 1,
            "optim.name": "adamw",
        },
    )
    model = SmallCNN()
    quantize_model(model, cfg.quant)
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(4)]
    calibrate_model(model, [x for x, _ in batches], 8.0)
    seen = []
    layer = next(layer for _, layer in iter_quantized(model))
    original = layer.weight_quant.set_progress
    layer.weight_quant.set_progress = lambda p: (seen.append(p), original(p))[1]
    engine = Engine(cfg, model, None, torch.device("cpu"))
    engine.train_epoch(batches)
    engine.train_epoch(batches, max_steps=3)  # planned steps: epochs x min(len(loader), max_steps) = 6
    assert seen[:4] == [0.0, 0.125, 0.25, 0.375]
    assert seen[4:] == pytest.approx([4 / 6, 5 / 6, 1.0])
    assert layer.weight_quant.ratio == pege.replacement_ratio(1.0, 0.8)


def test_bits_table_shows_method_stats():
    model = SmallCNN()
    quantize_model(model, QuantConfig(method="codeq", target_w=4, target_a=4))
    calibrate_model(model, [torch.randn(8, 1, 28, 28)], 8.0)
    row = bits_table(model)[0]
    assert {"w_sparsity", "w_entropy_bits", "w_used_bits", "w_dead_zone"} <= set(row)
    assert row["true_bits_w"] == 4 and 0 <= row["w_sparsity"] < 1


def test_pipeline_runs_a_zoo_method_end_to_end(tmp_path, monkeypatch):
    import functools

    from gdnsq.data import bundled
    from gdnsq.training.job import run_job

    # the pipeline builds its loaders twice; decode the bundled digits once
    monkeypatch.setattr(bundled, "load_bundled", functools.lru_cache(maxsize=1)(bundled.load_bundled))
    teacher = tmp_path / "teacher.pt"
    torch.save(SmallCNN().state_dict(), teacher)
    cfg = load_config(
        ROOT / "gdnsq" / "configs" / "quickstart.yaml",
        {
            "quant.method": "pege",
            "model.checkpoint": str(teacher),
            "train.epochs": 1,
            "train.max_steps_per_epoch": 2,
            "ray.enabled": False,
            "train.device": "cpu",
        },
    )
    summary = run_job(cfg)
    assert summary["protocol"]["method"] == "pege" and summary["converged"]
    assert summary["avg_bits_w"] == 2.0 and summary["avg_bits_a"] == 2.0 and summary["steps"] == 2


# --------------------------------------------------------------------------------------- comparison jobs


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imagenet_comparison_jobs_parse_and_match_their_generator():
    jobs = _compare_module().imagenet_jobs()
    files = sorted((ROOT / "jobs" / "compare").glob("*.yaml"))
    assert sorted(p.name for p in files) == sorted(jobs)
    for path in files:
        cfg = load_config(path)
        assert yaml.safe_load(path.read_text()) == jobs[path.name]
        assert cfg.model.name == "resnet18" and cfg.data.kind == "ffcv" and cfg.quant.method in available_methods()
    recipes = {yaml.safe_dump({k: v for k, v in job.items() if k not in ("name", "quant")}) for job in jobs.values()}
    assert len(recipes) == 1  # one recipe and budget for every method


def test_comparison_shares_one_recipe_and_budget():
    compare = _compare_module()
    args = compare.parse_args(["--quick", "--set", "schedule.scale_t=50", "optim.quant_lr=0.05"])
    assert (args.epochs, args.max_steps) == (3, 30)
    recipe = compare.load_recipe(args)
    cfgs = [compare.job_config(recipe, compare.job_overrides(args, m, (2, 2), None)) for m in ("gdnsq", "lsq")]
    for cfg, method in zip(cfgs, ("gdnsq", "lsq")):
        assert cfg.quant.method == method and (cfg.quant.target_w, cfg.quant.target_a) == (2, 2)
        assert cfg.schedule.scale_t == 50 and cfg.optim.quant_lr == 0.05 and not cfg.ray.enabled
        assert (cfg.train.epochs, cfg.train.max_steps_per_epoch) == (3, 30)
    assert cfgs[0].optim == cfgs[1].optim and cfgs[0].schedule == cfgs[1].schedule
