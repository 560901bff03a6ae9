"""quant.fused: the quantizer ops (``ops.py``, on the CPU the C++ kernels) against the reference torch graph.

x̂ and the input gradient are bit-identical (adaptive EWGS: its input gradient to float rounding, its scale being
a ratio of sums); the step and clamp gradients are sums, accumulated in another order by the kernels than by
torch, so they agree to float rounding.
"""

import copy
import math

import pytest
import torch
from torch import nn

from gdnsq.config import QuantConfig
from gdnsq.quant import functional as F
from gdnsq.quant import fused
from gdnsq.quant.autograd import QuantizeActivation, QuantizeWeight
from gdnsq.quant.dither import dither_signs
from gdnsq.quant.layers import iter_quantizers, set_fused
from gdnsq.training.models import SmallCNN
from gdnsq.training.surgery import calibrate_model, quantize_model

KEY = 0x123456789AB
ESTIMATORS = ["ste", "lsq", "ewgs", "aewgs"]


@pytest.fixture(scope="module", autouse=True)
def built():
    # Without the kernels every comparison below would compare the torch path with itself.
    assert fused.kernels() is not None, "the fused kernels did not build (see the warning)"


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=2e-5, atol=1e-6 * float(b.abs().max()))


def _act(shape, signed: bool, seed: int = 0):
    """(x, g, log_s, log_q, lo) of an input quantizer, unsigned (after a ReLU, lo fixed at 0) or signed."""
    torch.manual_seed(seed)
    x, g = torch.randn(shape), torch.randn(shape)
    x = x if signed else x.relu()
    lo = torch.tensor(-0.7 if signed else 0.0, requires_grad=signed)
    return x, g, torch.tensor(-4.3, requires_grad=True), torch.tensor(0.2, requires_grad=True), lo


def _act_run(case, estimator, ops: bool, noise_ratio=0.0, dtype=torch.float32):
    """x̂ and the gradients of (x, log_s, log_q[, lo]): the op, or the reference graph as the module composes it."""
    x, g, log_s, log_q, lo = case
    x = x.clone().to(dtype).requires_grad_(True)
    leaves = [t for t in (x, log_s, log_q, lo) if t.requires_grad]
    state = torch.tensor(KEY)
    if ops:
        y = QuantizeActivation.apply(x, log_s, log_q, lo, state, estimator, 1e-2, noise_ratio, dtype)
    else:
        low, hi, s = F.activation_grid(log_s, log_q, lo)
        xr = x.float() if dtype in (torch.bfloat16, torch.float16) else x  # the maths in float32 at least
        y = F.noisy_quantize(xr, low, hi, low, s, estimator=estimator, noise_ratio=noise_ratio, key=state).to(dtype)
    return y.detach(), torch.autograd.grad(y, leaves, g.to(dtype))


def _weight(shape, per_channel: bool, seed: int = 7):
    """(w, g, g_lo, g_hi, log_s) with a constant channel and tied extremes (first one takes the gradient)."""
    torch.manual_seed(seed)
    w = torch.randn(shape)
    flat = w.view(shape[0], -1)
    flat[1] = 0.25
    if flat.shape[1] > 2:
        flat[2, [0, 2]] = flat[2].max() + 1
        flat[3, [1, 2]] = flat[3].min() - 1
    c = shape[0] if per_channel else 1
    log_s = torch.log2(torch.rand((c,) + (1,) * (len(shape) - 1)) * 0.05 + 0.01)
    return w, torch.randn(shape), torch.randn(c), torch.randn(c), log_s


def _weight_run(case, estimator, ops: bool, noise_ratio=0.0, use_output=True):
    """x̂, lo, hi and the gradients of w and log_s: the op, or channel_range then noisy_quantize (the reference)."""
    w, g, g_lo, g_hi, log_s = case
    w, log_s = w.clone().requires_grad_(True), log_s.clone().requires_grad_(True)
    state = torch.tensor(KEY)
    if ops:
        y, lo, hi = QuantizeWeight.apply(w, log_s, state, estimator, 1e-2, noise_ratio, torch.float32)
    else:
        lo, hi = F.channel_range(w, log_s.shape[0], sparse_grad=True)
        z = lo.detach().reshape(log_s.shape)
        y = F.noisy_quantize(
            w, None, None, z, torch.exp2(log_s), estimator=estimator, noise_ratio=noise_ratio, key=state
        )
    loss = (lo * g_lo).sum() + (hi * g_hi).sum() + ((y * g).sum() if use_output else 0.0)
    grads = torch.autograd.grad(loss, (w, log_s), allow_unused=True)
    return (y.detach(), lo.detach(), hi.detach(), grads[0].to_dense(), grads[1])


ACT_CASES = [((4, 8, 9, 9), False), ((4, 8, 9, 9), True), ((64, 32, 16, 16), True)]  # 0.5 M: many pieces
WEIGHT_CASES = [((16, 8, 3, 3), True), ((32, 64), True), ((10, 20), False), ((6, 1), True), ((3000, 700), True)]


@pytest.mark.parametrize("shape,signed", ACT_CASES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("noise_ratio", [0.0, 0.3])
def test_activation_op_matches_the_reference(shape, signed, estimator, noise_ratio):
    case = _act(shape, signed)
    (y0, g0), (y1, g1) = _act_run(case, estimator, False, noise_ratio), _act_run(case, estimator, True, noise_ratio)
    assert torch.equal(y0, y1)
    assert torch.equal(g0[0], g1[0]) if estimator != "aewgs" else torch.allclose(g0[0], g1[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(g0[1:], g1[1:]):  # step and clamp gradients: sums in another order
        assert _close(b, a), (a, b)


@pytest.mark.parametrize("shape,per_channel", WEIGHT_CASES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_weight_op_matches_range_then_rounding(shape, per_channel, estimator):
    """Range, x̂ and the weight's gradient (the range's part at the first arg-extremes included) bit-identical."""
    case = _weight(shape, per_channel)
    ref, ours = _weight_run(case, estimator, False), _weight_run(case, estimator, True)
    for name, a, b in zip(("x̂", "lo", "hi", "grad w"), ref[:4], ours[:4]):
        assert torch.equal(a, b) if estimator != "aewgs" or name != "grad w" else torch.allclose(a, b, atol=1e-6), name
    assert _close(ours[4], ref[4])


def test_noise_path_of_the_weight_op():
    case = _weight((16, 8, 3, 3), True)
    ref, ours = _weight_run(case, "ste", False, 0.5), _weight_run(case, "ste", True, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(ref[:4], ours[:4])) and _close(ours[4], ref[4])


def test_step_gradient_equals_the_reference_graph():
    """Σ g·(n + s·r/√3) per channel, against autograd through x̂ = (v + n)·s + z in float64 (same draws)."""
    w, g, _, _, log_s = _weight((6, 16, 5, 5), True, seed=3)
    log_s.requires_grad_(True)
    y, lo, _ = QuantizeWeight.apply(w, log_s, torch.tensor(KEY), "ste", 1e-2, 0.0, torch.float32)
    ours = torch.autograd.grad(y, log_s, g)[0]
    r = dither_signs(g, torch.tensor(KEY)).double()  # the draws the backward used
    z = lo.reshape(6, 1, 1, 1).double()
    ld = log_s.detach().double().requires_grad_(True)
    s32 = torch.exp2(log_s.detach())
    sd = torch.exp2(ld)
    v = (w.double() - z) / sd
    v32 = (w - lo.reshape(6, 1, 1, 1)) / s32  # the rounding error the float32 forward made
    # n as noise: dn/dv = 0, dn/ds = r/√3 (a term whose value is 0 and whose s-gradient is r/√3)
    n = (torch.round(v32) - v32).double() + (sd - sd.detach()) * r / math.sqrt(3.0)
    ref = torch.autograd.grad((v + n) * sd + z, ld, g.double())[0]
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_sums_do_not_depend_on_the_thread_count():
    case = _act((64, 32, 16, 16), False, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _act_run(case, "ste", True)[1]
        torch.set_num_threads(2)
        two = _act_run(case, "ste", True)[1]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("why", ["float64", "strided", "channels_last", "bfloat16"])
def test_other_dtypes_and_layouts_match_the_reference(why):
    """float64 runs the torch fallback (gradients exact); a strided input is walked as a contiguous copy, a
    channels-last one in memory order; bfloat16 in and out computes in float32 (the reference: x.float(), then
    .to(bf16))."""
    x, g, log_s, log_q, lo = _act((4, 8, 6, 6), True, seed=5)
    dtype = torch.float32
    if why == "float64":
        x, g, dtype = x.double(), g.double(), torch.float64
        log_s, log_q, lo = (t.detach().double().requires_grad_(True) for t in (log_s, log_q, lo))
    if why == "strided":
        x, g = x.transpose(2, 3), g.transpose(2, 3)
    if why == "channels_last":
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    if why == "bfloat16":
        x, g, dtype = x.bfloat16(), g.bfloat16(), torch.bfloat16
    case = (x, g, log_s, log_q, lo)
    ref, ours = _act_run(case, "ewgs", False, 0.2, dtype), _act_run(case, "ewgs", True, 0.2, dtype)
    assert ours[0].dtype == dtype and torch.equal(ref[0], ours[0]) and torch.equal(ref[1][0], ours[1][0])
    if why == "float64":  # the fallback is the reference's maths itself: every gradient bit for bit, as before
        assert all(torch.equal(a, b) for a, b in zip(ref[1], ours[1]))
    assert all(_close(b, a) for a, b in zip(ref[1][1:], ours[1][1:]))


def test_fused_model_steps_track_the_torch_path():
    torch.manual_seed(0)
    base = SmallCNN()
    quantize_model(base, QuantConfig(target_w=2, target_a=2))
    calibrate_model(base, [torch.randn(16, 1, 28, 28)], init_bits=6)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    states, outputs = [], []
    for on in (False, True):
        model = copy.deepcopy(base).train()
        set_fused(model, on)
        assert all(q.fused == on for q in iter_quantizers(model) if hasattr(q, "fused"))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(2)
        for _ in range(3):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        outputs.append(out.detach())
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.allclose(states[0][k].float(), states[1][k].float(), rtol=1e-4, atol=1e-5), k
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(40, 300), (40, 3, 10, 10)])
def test_channel_range_matches_min_and_max_along_channels_ties_included(shape):
    torch.manual_seed(6)
    w = torch.randn(shape)
    flat = w.view(40, -1)
    flat[3] = 0.5  # a constant channel: min and max at index 0
    flat[7, [10, 20]] = flat[7].max() + 1  # tied maxima: the first one takes the gradient
    flat[9, [5, 6]] = flat[9].min() - 1
    g_lo, g_hi, g_w = torch.randn(40), torch.randn(40), torch.randn(shape)
    outs = []
    for on in (False, True):
        x = w.clone().requires_grad_(True)
        lo, hi = F.channel_range(x, 40, sparse_grad=on)
        # with a dense gradient from another use of x, as a layer's weight has (the quantized conv)
        (grad,) = torch.autograd.grad((lo, hi, x * 1.0), x, (g_lo, g_hi, g_w))
        outs.append((lo.detach(), hi.detach(), grad))
    assert outs[1][2].layout == torch.strided
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    extra = (outs[1][2] - g_w).view(40, -1)  # what the range added: two elements per channel at most
    assert int((extra != 0).sum()) <= 80 and extra[7, 20] == 0
    assert torch.isclose(extra[7, 10], g_hi[7]) and torch.isclose(extra[3, 0], g_lo[3] + g_hi[3])


def test_weight_op_range_alone_and_nan():
    case = _weight((8, 20), True)
    ours, ref = _weight_run(case, "ste", True, use_output=False), _weight_run(case, "ste", False, use_output=False)
    assert torch.equal(ours[3], ref[3]) and ours[4] is None and ref[4] is None
    w, _, _, _, log_s = case
    w[5, 7] = float("nan")  # torch's min / max propagate a NaN; so does the kernel
    _, lo, hi = QuantizeWeight.apply(w, log_s, torch.tensor(KEY), "ste", 1e-2, 0.0, torch.float32)
    assert lo[5].isnan() and hi[5].isnan() and not lo[[0, 4, 6]].isnan().any()


def test_quantized_layer_is_one_node_and_its_range_serves_the_penalty():
    from gdnsq.training.objective import bit_penalties

    torch.manual_seed(0)
    base = SmallCNN()
    quantize_model(base, QuantConfig(target_w=2, target_a=2))
    calibrate_model(base, [torch.randn(16, 1, 28, 28)], init_bits=6)
    x = torch.randn(16, 1, 28, 28)
    grads = []
    for on in (False, True):
        model = copy.deepcopy(base).train()
        set_fused(model, on)
        torch.manual_seed(2)
        out = model(x)
        pen = bit_penalties(model, 1e-3, 1.0)
        layer = next(m for m in model.modules() if hasattr(m, "weight_quant") and m.weight_quant.learnable_bits)
        node = type(layer.weight_quant._cache[1][0].grad_fn.next_functions[0][0]).__name__
        assert ("QuantizedLayer" in node) == on, node
        (out.square().mean() + pen.p_w + pen.p_a).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k


def test_export_traces_the_eval_path():
    """torch.export (MLflow's pt2 format) traces the exact eval maths, plain torch ops."""
    torch.manual_seed(0)
    model = SmallCNN()
    quantize_model(model, QuantConfig(target_w=2, target_a=2))
    calibrate_model(model, [torch.randn(4, 1, 28, 28)], init_bits=4)
    set_fused(model, True)
    x = torch.randn(2, 1, 28, 28)
    program = torch.export.export(model.eval(), (x,))
    assert torch.equal(program.module()(x), model(x))


@pytest.mark.parametrize("estimator", ["ste", "aewgs"])
def test_channels_last_weight_is_walked_in_memory_order(estimator):
    """A channels-last weight (``train.channels_last``) keeps its layout: x̂ and the gradient come back
    channels-last, equal to the contiguous weight's where the draws agree (lsq: none), each row still one block."""
    w, g, g_lo, g_hi, log_s = _weight((16, 8, 3, 3), True)
    cl = (w.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last), g_lo,
          g_hi, log_s)  # fmt: skip
    for est in (estimator, "lsq"):
        ours, ref = _weight_run(cl, est, True), _weight_run(cl, est, False)
        assert ours[0].is_contiguous(memory_format=torch.channels_last) and not ours[0].is_contiguous()
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]) and torch.equal(ours[2], ref[2])
        assert ours[3].is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(ours[3], ref[3], atol=1e-6) and _close(ours[4], ref[4])
    plain = _weight_run((w, g, g_lo, g_hi, log_s), "lsq", True)
    assert torch.equal(plain[0], ours[0]) and torch.equal(plain[3], ours[3]) and _close(ours[4], plain[4])
