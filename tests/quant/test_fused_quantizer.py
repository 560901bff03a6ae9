"""quant.fused: the compiled CPU kernels against the torch path (fp32) and the method's reference graph.

x̂ and the input gradient are bit-identical; the step and clamp gradients are sums, accumulated in another
order by the kernels than by torch, so they agree to float rounding.
"""

import copy
import math

import pytest
import torch
from torch import nn

from gdnsq.config import QuantConfig
from gdnsq.quant import functional as F
from gdnsq.quant import fused
from gdnsq.quant.layers import iter_quantizers, set_fused
from gdnsq.training.models import SmallCNN
from gdnsq.training.surgery import calibrate_model, quantize_model


@pytest.fixture(scope="module", autouse=True)
def built():
    # Without the kernels every comparison below would compare the torch path with itself.
    assert fused.kernels() is not None, "the fused kernels did not build (see the warning)"


def _case(shape, per_channel: bool, clamp: str | None, seed: int = 0):
    """(x, g, lo, hi, z, s): weights (no clamp, z = per-channel min) or activations (unsigned or signed)."""
    torch.manual_seed(seed)
    x, g = torch.randn(shape), torch.randn(shape)
    sshape = (shape[0],) + (1,) * (len(shape) - 1) if per_channel else ()
    s = (torch.rand(sshape) * 0.05 + 0.01).requires_grad_(True)
    if clamp is None:
        z = x.reshape(shape[0], -1).min(1).values.reshape(sshape) if per_channel else x.min()
        return x, g, None, None, z, s
    x = x.relu() if clamp == "unsigned" else x
    lo = torch.tensor(0.0 if clamp == "unsigned" else -0.7, requires_grad=clamp == "signed")
    hi = torch.tensor(0.9, requires_grad=True)
    return x, g, lo, hi, lo, s


def _run(case, estimator: str, on: bool, seed: int = 1):
    x, g, lo, hi, z, s = case
    x = x.clone().requires_grad_(True)
    leaves = [t for t in (x, s, lo, hi) if t is not None and t.requires_grad]
    torch.manual_seed(seed)  # the dither's window offsets come from torch's RNG
    y = F.noisy_quantize(x, lo, hi, z, s, estimator=estimator, fused=on)
    return y.detach(), torch.autograd.grad(y, leaves, g)


CASES = [
    ((16, 8, 3, 3), True, None),
    ((32, 64), True, None),
    ((10, 20), False, None),
    ((4, 8, 9, 9), False, "unsigned"),
    ((4, 8, 9, 9), False, "signed"),
    ((3000, 700), True, None),
]  # 2.1 M elements: more than one window of the sign table


@pytest.mark.parametrize("shape,per_channel,clamp", CASES)
@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_kernels_match_the_torch_path(shape, per_channel, clamp, estimator):
    case = _case(shape, per_channel, clamp)
    (y0, g0), (y1, g1) = _run(case, estimator, False), _run(case, estimator, True)
    assert torch.equal(y0, y1)
    assert torch.equal(g0[0], g1[0])  # input gradient
    for a, b in zip(g0[1:], g1[1:]):  # step (and clamp) gradients: sums in another order
        assert a.shape == b.shape and torch.allclose(a, b, rtol=2e-5, atol=1e-6 * float(a.abs().max())), (a, b)


def test_step_gradient_equals_the_reference_graph():
    """Σ g·(n + s·r/√3) per channel, against autograd through x̂ = (v + n)·s + z in float64 (same draws)."""
    x, g, lo, hi, z, s = _case((6, 16, 5, 5), True, None, seed=3)
    torch.manual_seed(9)
    ours = torch.autograd.grad(F.noisy_quantize(x.requires_grad_(True), None, None, z, s, fused=True), s, g)[0]
    torch.manual_seed(9)
    r = F.dither_signs(g).double()  # the draws the backward used: same RNG state and size
    sd = s.detach().double().requires_grad_(True)
    v = (x.detach().double() - z.double()) / sd
    v32 = (x.detach() - z) / s.detach()  # the rounding error the float32 forward made
    # n as noise: dn/dv = 0, dn/ds = r/√3 (a term whose value is 0 and whose s-gradient is r/√3)
    n = (torch.round(v32) - v32).double() + (sd - sd.detach()) * r / math.sqrt(3.0)
    ref = torch.autograd.grad((v + n) * sd + z.double(), sd, g.double())[0]
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_sums_do_not_depend_on_the_thread_count():
    case = _case((64, 32, 16, 16), False, "unsigned", seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(case, "ste", True)[1]
        torch.set_num_threads(2)
        two = _run(case, "ste", True)[1]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("why", ["float64", "ewgs", "noise", "strided"])
def test_where_the_kernels_do_not_apply_the_torch_path_runs(why):
    x, g, lo, hi, z, s = _case((4, 8, 6, 6), False, "unsigned", seed=5)
    kw = {"estimator": "ewgs" if why == "ewgs" else "ste", "noise_ratio": 0.3 if why == "noise" else 0.0}
    if why == "float64":
        x, g, lo, hi, s = (
            x.double(),
            g.double(),
            lo.double(),
            hi.detach().double().requires_grad_(True),
            s.detach().double().requires_grad_(True),
        )
        z = lo
    if why == "strided":
        x, g = x.transpose(2, 3), g.transpose(2, 3)
    outs = []
    for on in (False, True):
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = F.noisy_quantize(xx, lo, hi, z, s, fused=on, **kw)
        outs.append((y.detach(),) + torch.autograd.grad(y, (xx, s, hi), g))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


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
        lo, hi = F.channel_range(x, 40, fused=on)
        # with a dense gradient from another use of x, as a layer's weight has (the quantized conv)
        (grad,) = torch.autograd.grad((lo, hi, x * 1.0), x, (g_lo, g_hi, g_w))
        outs.append((lo.detach(), hi.detach(), grad))
    assert outs[1][2].layout == torch.strided
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    extra = (outs[1][2] - g_w).view(40, -1)  # what the range added: two elements per channel at most
    assert int((extra != 0).sum()) <= 80 and extra[7, 20] == 0
    assert torch.isclose(extra[7, 10], g_hi[7]) and torch.isclose(extra[3, 0], g_lo[3] + g_hi[3])


def _weight_case(shape, seed=7):
    torch.manual_seed(seed)
    w = torch.randn(shape)
    flat = w.view(shape[0], -1)
    flat[1] = 0.25  # a constant channel: min and max are one element
    if flat.shape[1] > 2:
        flat[2, [0, 2]] = flat[2].max() + 1  # tied maxima: the first takes the gradient
        flat[3, [1, 2]] = flat[3].min() - 1
    s = torch.rand((shape[0],) + (1,) * (len(shape) - 1)) * 0.05 + 0.01
    return w, s, torch.randn(shape), torch.randn(shape[0]), torch.randn(shape[0])


def _weight_run(w, s, g, g_lo, g_hi, estimator, one_kernel: bool, use_output: bool = True):
    """x̂, lo, hi and the gradients of w and s: the one-kernel weight quantizer, or channel_range then
    noisy_quantize as the torch-path quantizer composes them."""
    w, s = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
    torch.manual_seed(1)
    if one_kernel:
        y, lo, hi = F.fused_weight_quantize(w, s, estimator=estimator)
    else:
        lo, hi = F.channel_range(w, w.shape[0], fused=True)
        y = F.noisy_quantize(w, None, None, lo.detach().reshape(s.shape), s, estimator=estimator, fused=True)
    loss = (lo * g_lo).sum() + (hi * g_hi).sum() + ((y * g).sum() if use_output else 0.0)
    return (y.detach(), lo.detach(), hi.detach()) + torch.autograd.grad(loss, (w, s), allow_unused=True)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (40, 300), (6, 1), (3000, 700)])
@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_one_kernel_weight_quantizer_equals_range_then_rounding(shape, estimator):
    """Range, x̂ and the weight's gradient (the range's part at the first arg-extremes included) bit-identical;
    the step gradient too (the same per-piece sums in the same order)."""
    case = _weight_case(shape)
    ours, ref = _weight_run(*case, estimator, True), _weight_run(*case, estimator, False)
    for name, a, b in zip(("x̂", "lo", "hi", "grad w", "grad s"), ours, ref):
        assert torch.equal(a, b), name


def test_one_kernel_weight_quantizer_range_alone_and_nan():
    w, s, g, g_lo, g_hi = _weight_case((8, 20))
    ours = _weight_run(w, s, g, g_lo, g_hi, "ste", True, use_output=False)
    ref = _weight_run(w, s, g, g_lo, g_hi, "ste", False, use_output=False)
    assert torch.equal(ours[3], ref[3].to_dense()) and ours[4] is None and ref[4] is None  # ref: sparse
    w[5, 7] = float("nan")  # torch's min / max propagate a NaN; so does the kernel
    _, lo, hi = F.fused_weight_quantize(w, s)
    assert lo[5].isnan() and hi[5].isnan() and not lo[[0, 4, 6]].isnan().any()


def test_quantized_layer_uses_one_kernel_and_its_range_serves_the_penalty():
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
        assert ("FusedWeightQuantize" in node) == on, node
        (out.square().mean() + pen.p_w + pen.p_a).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k


def test_export_traces_the_torch_path():
    """torch.export (MLflow's pt2 format) runs the model on fake tensors, which the kernels cannot read."""
    torch.manual_seed(0)
    model = SmallCNN()
    quantize_model(model, QuantConfig(target_w=2, target_a=2))
    calibrate_model(model, [torch.randn(4, 1, 28, 28)], init_bits=4)
    set_fused(model, True)
    x = torch.randn(2, 1, 28, 28)
    program = torch.export.export(model.eval(), (x,))
    assert torch.equal(program.module()(x), model(x))
