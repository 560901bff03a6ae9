"""quant.integer_grid: every grid point an integer times the step (what int8 kernels run), through the registered ops
(the C++ kernels here) and the torch path, with the float grid's level count and the noise model's gradients."""

import copy
import math

import pytest
import torch
from torch import nn

from gdnsq.config import QuantConfig
from gdnsq.quant import functional as F
from gdnsq.quant import fused
from gdnsq.quant.autograd import QuantizeWeight
from gdnsq.quant.dither import dither_signs
from gdnsq.quant.layers import QConv2d, iter_quantized, set_fused
from gdnsq.quant.quantizer import ActivationQuantizer, WeightQuantizer
from gdnsq.quant.spec import QuantSpec
from gdnsq.training.models import SmallCNN
from gdnsq.training.surgery import calibrate_model, quantize_model

KEY = 0x2468ACE
ESTIMATORS = ["ste", "lsq", "ewgs", "aewgs"]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert fused.kernels() is not None, "the fused kernels did not build (see the warning)"


def _is_integer(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, torch.round(t)))


def _whole_steps(z: torch.Tensor, s: torch.Tensor) -> bool:
    """z is the float32 product k·s of an integer k and the step (z/s itself may be off k by an ulp)."""
    return bool(torch.equal(torch.round(z / s) * s, z))


def _weight_case(seed=0, shape=(16, 8, 3, 3)):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.1 + 0.03
    log_s = torch.log2(torch.rand((shape[0],) + (1,) * (len(shape) - 1)) * 0.08 + 0.02)
    return w, torch.randn(shape), torch.randn(shape[0]), torch.randn(shape[0]), log_s


def _weight_run(case, estimator, ops: bool, noise_ratio=0.0):
    """x̂ and the gradients of w and log_s: the op with integer_grid, or the module's torch composition."""
    w, g, g_lo, g_hi, log_s = case
    w, log_s = w.clone().requires_grad_(True), log_s.clone().requires_grad_(True)
    state = torch.tensor(KEY)
    if ops:
        y, lo, hi = QuantizeWeight.apply(w, log_s, state, estimator, 1e-2, noise_ratio, torch.float32, True)
    else:
        lo, hi = F.channel_range(w, log_s.shape[0], sparse_grad=True)
        s = torch.exp2(log_s)
        z, top = F.integer_weight_grid(lo.reshape(s.shape), hi.reshape(s.shape), s)
        y = F.noisy_quantize(
            w, lo.detach().reshape(s.shape), top, z, s, estimator=estimator, noise_ratio=noise_ratio, key=state
        )
    loss = (lo * g_lo).sum() + (hi * g_hi).sum() + (y * g).sum()
    grads = torch.autograd.grad(loss, (w, log_s))
    return y.detach(), grads[0].to_dense(), grads[1]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("noise_ratio", [0.0, 0.4])
def test_weight_op_matches_the_torch_path(estimator, noise_ratio):
    case = _weight_case()
    (y0, gw0, gs0), (y1, gw1, gs1) = (_weight_run(case, estimator, o, noise_ratio) for o in (False, True))
    assert torch.equal(y0, y1)
    assert torch.equal(gw0, gw1) if estimator != "aewgs" else torch.allclose(gw0, gw1, atol=1e-6)
    assert torch.allclose(gs0, gs1, rtol=2e-5, atol=1e-6 * float(gs0.abs().max()))


@pytest.mark.parametrize("fused_on", [True, False])
def test_weight_grid_points_are_whole_steps_with_the_float_grids_levels(fused_on):
    w, _, _, _, log_s = _weight_case(seed=1)
    for bits in (1.0, 2.0, 3.0, 4.0):
        q = WeightQuantizer(w.shape, integer_grid=True)
        q.fused = fused_on
        q.calibrate_(w, bits)
        lo, hi, z, s = q.grid(w)
        assert _whole_steps(z, s), "z is not a whole number of steps"
        codes = F.integer_codes(w, lo, hi, z, s)
        assert _is_integer(codes) and codes.min() >= 0
        # at most the float grid's level count, round(range/s) + 1: the snapped offset alone could add one
        rows = w.reshape(w.shape[0], -1)
        levels = codes.reshape(w.shape[0], -1).amax(1) + 1
        assert (levels <= F.grid_levels(rows.amax(1) - rows.amin(1), s.reshape(-1))).all()
        assert q.true_bits(w) <= math.ceil(bits)
        for train in (True, False):
            y = q.train(train)(w).detach()
            assert torch.allclose(y / s, torch.round(y / s), atol=1e-4), (bits, train)
        assert torch.equal(q.eval()(w), codes * s + z)  # the eval output is its grid() (what export reads)
        # the eval error stays within a step (half a step but at the clamped top)
        assert ((q.eval()(w) - w).abs() <= s * (1 + 1e-6)).all()


def test_step_gradient_is_the_noise_model_on_the_integer_grid():
    """d log_s = Σ g·(n + s·r/√3)·s·ln 2 per channel, n the rounding error on the snapped, clamped grid (float64)."""
    w, g, _, _, log_s = _weight_case(seed=3, shape=(6, 16, 5, 5))
    log_s.requires_grad_(True)
    y, lo, hi = QuantizeWeight.apply(w, log_s, torch.tensor(KEY), "ste", 1e-2, 0.0, torch.float32, True)
    ours = torch.autograd.grad(y, log_s, g)[0]
    r = dither_signs(g, torch.tensor(KEY)).double()
    s32 = torch.exp2(log_s.detach())
    z, top = F.integer_weight_grid(lo.reshape(s32.shape), hi.reshape(s32.shape), s32)
    v = ((w - z) / s32).clamp(max=(top - z) / s32)  # the clamped grid value the float32 forward rounded
    n = (torch.round(v) - v).double()
    s64 = s32.double()
    ref = ((g.double() * (n + s64 * r / math.sqrt(3.0))).sum(dim=(1, 2, 3), keepdim=True)) * s64 * math.log(2.0)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6)


def _act(signed: bool, lo_value: float):
    torch.manual_seed(0)
    q = ActivationQuantizer(signed="signed" if signed else "unsigned", integer_grid=True)
    x = torch.randn(4, 8, 9, 9) if signed else torch.randn(4, 8, 9, 9).relu()
    with torch.no_grad():
        q.log_s.fill_(-2.3)
        q.log_q.fill_(-2.3 + 2)
        q.lo.fill_(lo_value)
    q.lo.requires_grad_(signed)
    return q, x


@pytest.mark.parametrize("signed,lo_value", [(False, 0.0), (True, -0.77)])
@pytest.mark.parametrize("fused_on", [True, False])
def test_activation_grid_points_are_whole_steps(signed, lo_value, fused_on):
    q, x = _act(signed, lo_value)
    q.fused = fused_on
    lo, hi, z, s = q.grid()
    assert _whole_steps(z, s) and torch.equal(lo, z)
    if not signed:
        assert float(z) == 0.0
    assert int(q.levels()) == 4  # 2 bits: the float grid's count
    for train in (True, False):
        y = q.train(train)(x).detach()
        assert torch.allclose(y / s, torch.round(y / s), atol=1e-4)
        assert len(torch.unique(torch.round(y / s))) <= 4


@pytest.mark.parametrize("estimator", ["ste", "aewgs"])
def test_activation_on_a_step_multiple_is_the_float_grid_and_lo_learns_straight_through(estimator):
    """With lo already a whole number of steps the integer grid is the float grid, values and gradients (lo's
    included: the snap passes its gradient straight through), through the op and the torch path alike."""
    s = 2.0**-2.3
    outs = []
    for integer in (False, True):
        for fused_on in (True, False):
            q, x = _act(True, -3 * s)
            q.integer_grid, q.fused, q.estimator = integer, fused_on, estimator
            q.train()
            y = q(x)
            grads = torch.autograd.grad((y * torch.cos(x)).sum(), (q.log_s, q.log_q, q.lo))
            outs.append((y.detach(), grads))
    y0, g0 = outs[0]
    for y, g in outs[1:]:
        assert torch.equal(y, y0)
        for a, b in zip(g, g0):
            assert torch.allclose(a, b, rtol=2e-5, atol=1e-6), (a, b)
    assert float(g0[2]) != 0.0


def test_quant_config_reaches_every_quantizer_and_a_fused_model_step_tracks_the_torch_path():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_chans=1)
    quantize_model(model, QuantConfig(target_w=2, target_a=2, integer_grid=True))
    x = torch.rand(8, 1, 28, 28)
    calibrate_model(model, [x], init_bits=4.0)
    assert all(layer.weight_quant.integer_grid and layer.act_quant.integer_grid for _, layer in iter_quantized(model))
    results = []
    for fused_on in (True, False):
        m = copy.deepcopy(model).train()
        set_fused(m, fused_on)
        loss = m(x).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    model.eval()
    for name, layer in iter_quantized(model):
        lo, hi, z, s = layer.weight_quant.grid(layer.weight)
        assert _whole_steps(z, s), name
        lo, hi, z, s = layer.act_quant.grid()
        assert _whole_steps(z, s), name


def test_spec_default_is_the_float_grid():
    spec = QuantSpec(bound_w=2, bound_a=2)
    layer = QConv2d.from_float(nn.Conv2d(3, 4, 3), spec)
    assert spec.integer_grid is False and not layer.weight_quant.integer_grid and not layer.act_quant.integer_grid
    assert QuantConfig().integer_grid is False


def test_opcheck_integer_weight_ops():
    """Schema, fake tensors and AOT dispatch of the weight ops with integer_grid (what torch.compile relies on)."""
    from gdnsq.quant import ops

    w, g, g_lo, g_hi, log_s = _weight_case()
    y, lo, hi, index, key = ops.quantize_weight(w, log_s, torch.tensor(5), "ste", 0.0, torch.float32, True)
    cases = [
        (ops.quantize_weight, (w, log_s, torch.tensor(5), "ewgs", 0.2, torch.float32, True)),
        (ops.quantize_weight_backward, (g, g_lo, g_hi, w, log_s, lo, index, key, "ste", 1e-2, 0.0, True)),
        (ops.quantize_weight_backward, (g, None, None, w, log_s, lo, index, key, "aewgs", 1e-2, 0.0, True)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
