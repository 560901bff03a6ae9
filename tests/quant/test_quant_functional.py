"""Exact tests of the quantizer maths (pure torch)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdnsq.quant import functional as F

D = torch.float64


def t(v, grad=False):
    return torch.tensor(v, dtype=D, requires_grad=grad)


def test_forward_hand_computed():
    # lo=0, hi=1.5, s=0.5: grid {0, .5, 1, 1.5}; 0.74 -> v=1.48 -> 1 -> 0.5; 0.76 -> 1.52 -> 2 -> 1.0
    x = t([-0.3, 0.1, 0.24, 0.26, 0.74, 0.76, 1.6, 9.0])
    out = F.noisy_quantize(x, t(0.0), t(1.5), t(0.0), t(0.5))
    assert out.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 1.5]
    assert F.exact_quantize(x, t(0.0), t(1.5), t(0.0), t(0.5)).tolist() == out.tolist()
    assert F.integer_codes(x, t(0.0), t(1.5), t(0.0), t(0.5)).tolist() == [0, 0, 0, 1, 1, 2, 3, 3]


def test_forward_with_zero_point_signed():
    # lo=-1, s=0.25: x=-0.9 -> v=0.4 -> 0 -> -1.0 ; x=0.13 -> v=4.52 -> 5 -> 0.25
    out = F.noisy_quantize(t([-0.9, 0.13]), t(-1.0), t(1.0), t(-1.0), t(0.25))
    assert out.tolist() == [-1.0, 0.25]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=64),
    st.floats(-3, 0),
    st.floats(0.01, 4),
    st.floats(-6, 1),
)
def test_eval_codes_integral_and_inside_clamps(values, lo, width, log_s):
    x = t(values)
    s = t(2.0**log_s)
    lo_t = t(lo)
    hi_t = lo_t + t(width)
    q = F.integer_codes(x, lo_t, hi_t, lo_t, s)
    assert torch.equal(q, q.round())
    assert (q >= math.floor((lo - lo) / float(s))).all()
    assert (q <= math.ceil(width / float(s))).all()
    xq = F.exact_quantize(x, lo_t, hi_t, lo_t, s)
    assert (xq >= lo - 1e-12).all() and (xq <= lo + width + float(s) / 2 + 1e-9).all()


def test_lsq_gradients_match_autograd_reference():
    x = torch.randn(64, 8, dtype=D, requires_grad=True)
    lo, hi, s = t(-0.7, True), t(0.9, True), t(0.13, True)
    g = torch.randn(64, 8, dtype=D)
    ours = torch.autograd.grad(F.noisy_quantize(x, lo, hi, lo, s, estimator="lsq"), (x, lo, hi, s), g)
    xc = torch.clamp(x, lo, hi)
    v = (xc - lo) / s
    ref = xc + s * (torch.round(v) - v).detach()
    theirs = torch.autograd.grad(ref, (x, lo, hi, s), g)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12)


def test_ste_input_gradient_is_identity_inside_and_zero_outside():
    x = t([-2.0, 0.3, 0.7, 5.0], True)
    out = F.noisy_quantize(x, t(0.0), t(1.0), t(0.0), t(0.1))
    (gx,) = torch.autograd.grad(out, x, torch.ones(4, dtype=D))
    assert gx.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_ewgs_input_gradient_formula():
    x = t([0.12, 0.38, 0.51], True)
    s = t(0.1)
    g = t([1.0, -2.0, 3.0])
    out = F.noisy_quantize(x, None, None, t(0.0), s, estimator="ewgs", delta=0.5)
    (gx,) = torch.autograd.grad(out, x, g)
    v = x.detach() / s
    expected = g * (1 + 0.5 * torch.sign(g) * (v - v.round()))
    assert torch.allclose(gx, expected, atol=1e-12)


def test_aewgs_gradient_keeps_sign_and_matches_formula():
    torch.manual_seed(3)
    x = torch.randn(256, dtype=D, requires_grad=True)
    s = t(0.05)
    g = torch.randn(256, dtype=D)
    out = F.noisy_quantize(x, None, None, t(0.0), s, estimator="aewgs")
    (gx,) = torch.autograd.grad(out, x, g)
    v = x.detach() / s
    e = v.round() - v
    sg_e = torch.sign(g) * e
    delta = sg_e.mean() / (e.pow(2).mean() - e.mean() ** 2).clamp_min(1e-3)
    expected = g * (1 - (delta * sg_e).clamp_max(0.99))
    assert torch.allclose(gx, expected, atol=1e-12)
    assert (torch.sign(gx) == torch.sign(g)).all()


class _ReferenceNoise(torch.autograd.Function):
    """n = round(v) - v with the method's custom backward: dn/dv = 0, dn/ds = r / sqrt(3) (r injected)."""

    @staticmethod
    def forward(ctx, v, s, r):
        ctx.save_for_backward(r)
        ctx.s_shape = s.shape
        return torch.round(v) - v

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return torch.zeros_like(g), F._sum_to(g * r / math.sqrt(3.0), ctx.s_shape), None


def _reference_quantize(x, lo, hi, z, s, r):
    """The reference graph: v = (clamp(x) - z)/s; x̂ = (v + n)·s + z, autograd through every factor."""
    xc = x if lo is None else torch.clamp(x, lo, hi)
    v = (xc - z) / s
    return (v + _ReferenceNoise.apply(v, s, r)) * s + z


@pytest.mark.parametrize("estimator", ["ste", "ewgs", "aewgs"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_step_gradient_equals_autograd_through_the_reference_graph(estimator, per_channel):
    """The custom backward's step gradient is Σ g·(n + s·r/√3), exactly as autograd gives it (float64)."""
    torch.manual_seed(5)
    x = torch.randn(6, 16, dtype=D) * 0.8
    g = torch.randn(6, 16, dtype=D)
    log_s = (
        (torch.full((6, 1), -2.3, dtype=D) + 0.1 * torch.arange(6, dtype=D)[:, None]) if per_channel else t([[-2.0]])
    )
    log_s.requires_grad_(True)
    lo, hi = t(-0.9, True), t(1.1, True)
    seed = 99
    torch.manual_seed(seed)
    s = torch.exp2(log_s)
    ours = torch.autograd.grad(F.noisy_quantize(x, lo, hi, lo, s, estimator=estimator), (log_s, lo, hi), g)
    torch.manual_seed(seed)
    r = F.dither_signs(g)  # the very draws the backward used: same RNG state, shape and dtype
    s = torch.exp2(log_s)
    theirs = torch.autograd.grad(_reference_quantize(x, lo, hi, lo, s, r), (log_s, lo, hi), g)
    assert torch.allclose(ours[0], theirs[0], atol=1e-12, rtol=0)
    if estimator == "ste":  # the clamp gradients agree too (EWGS rescales only the input gradient)
        assert torch.allclose(ours[1], theirs[1], atol=1e-12) and torch.allclose(ours[2], theirs[2], atol=1e-12)
    assert set(r.unique().tolist()) == {-0.5, 0.5}
    # the dither must matter: without it (r = 0) the gradient differs
    s = torch.exp2(log_s)
    no_dither = torch.autograd.grad(_reference_quantize(x, lo, hi, lo, s, torch.zeros_like(r)), log_s, g)[0]
    assert not torch.allclose(ours[0], no_dither)


def test_step_gradient_expectation_is_the_rounding_residual():
    """Averaged over dither draws, Σ g·(n + s·r/√3) -> Σ g·n (the lsq ablation's gradient)."""
    torch.manual_seed(11)
    x = torch.rand(512, dtype=D) * 3 - 1
    g = torch.randn(512, dtype=D)
    s = t(0.37, True)
    lo, hi = t(-0.5), t(1.5)
    residual = torch.autograd.grad(F.noisy_quantize(x, lo, hi, lo, s, estimator="lsq"), s, g)[0]
    v = (torch.clamp(x, lo, hi) - lo) / s.detach()
    assert float(residual) == pytest.approx(float((g * (v.round() - v)).sum()), abs=1e-12)
    draws = torch.stack([torch.autograd.grad(F.noisy_quantize(x, lo, hi, lo, s), s, g)[0] for _ in range(4000)])
    sd_one = 0.37 * float(g.pow(2).sum().sqrt()) / (2 * math.sqrt(3))  # s·sqrt(Σ g²/12)
    assert float(draws.std()) == pytest.approx(sd_one, rel=0.05)
    assert abs(float(draws.mean() - residual)) < 4 * sd_one / math.sqrt(len(draws))
    assert abs(float(residual)) > 10 * sd_one / math.sqrt(len(draws))  # the residual is not ~0 here


def test_shared_step_gradient_is_the_sum_of_per_element_gradients():
    torch.manual_seed(1234)
    x = torch.rand(1000, dtype=D)
    g = torch.full((1000,), 0.7, dtype=D)
    s = t(0.1, True)
    s_vec = torch.full((1000,), 0.1, dtype=D, requires_grad=True)
    torch.manual_seed(7)
    (g_shared,) = torch.autograd.grad(F.noisy_quantize(x, None, None, t(0.0), s), s, g)
    torch.manual_seed(7)
    (g_vec,) = torch.autograd.grad(F.noisy_quantize(x, None, None, t(0.0), s_vec), s_vec, g)
    assert float(g_shared) == pytest.approx(float(g_vec.sum()), abs=1e-9)
    # per element: g·n ± s·g/(2·sqrt(3))
    v = x / 0.1
    dither = (g_vec - g * (v.round() - v)) / 0.1
    assert torch.allclose(dither.abs(), torch.full_like(dither, 0.7 / (2 * math.sqrt(3))))


def test_min_bits_keeps_every_level():
    for target in range(1, 17):
        b = F.min_bits(target, 0.1)
        assert b < target - 1e-3  # below the penalty's aim, so the two never fight
        levels = F.grid_levels(torch.tensor(2.0**b - 1.0, dtype=D), t(1.0))
        # all levels wherever half a level is wider than the penalty's eps (every practical target)
        assert levels.item() == 2**target or target >= 9
        below = F.grid_levels(torch.tensor(2.0 ** (math.log2(2**target - 0.5) - 1e-6) - 1.0, dtype=D), t(1.0))
        assert below.item() < 2**target  # the boundary is tight: a hair lower loses a level


def test_bit_width_gradients_gradcheck():
    log_q, log_s = t(3.0, True), t(-2.0, True)
    assert torch.autograd.gradcheck(F.activation_bits, (log_q, log_s))
    (dq, ds) = torch.autograd.grad(F.activation_bits(log_q, log_s), (log_q, log_s))
    assert (dq.item(), ds.item()) == (1.0, -1.0)
    rng, ls = t([0.5, 2.0, 7.0], True), t([-3.0, -1.0, 0.5], True)
    assert torch.autograd.gradcheck(F.weight_bits, (rng, ls))
    # closed form: d/dlog_s [log2(r + 2^l) - l] = 2^l / (r + 2^l) - 1
    (g_ls,) = torch.autograd.grad(F.weight_bits(rng, ls).sum(), ls)
    expected = 2.0 ** ls.detach() / (rng.detach() + 2.0 ** ls.detach()) - 1
    assert torch.allclose(g_ls, expected)


def test_weight_bits_counts_levels():
    # range 3, s 1 -> levels {0,1,2,3}: exactly 2 bits, and the grid agrees
    assert F.weight_bits(t(3.0), t(0.0)).item() == 2.0
    assert F.grid_levels(t(3.0), t(1.0)).item() == 4
    assert F.true_bits(t(4.0)).item() == 2 and F.true_bits(t(5.0)).item() == 3 and F.true_bits(t(2.0)).item() == 1
    assert F.true_bits(t(1.0)).item() == 0  # one level: a constant, no information
