"""The quantizer ops as torch sees them: registration (opcheck), kernels per quantized conv, what a quantized layer
saves for backward, torch.compile without graph breaks, bf16 in and out, the random key's life cycle."""

import collections
import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gdnsq.config import QuantConfig
from gdnsq.quant import ops
from gdnsq.quant.layers import QConv2d, QLinear, iter_quantized, iter_quantizers, set_fused
from gdnsq.quant.spec import QuantSpec
from gdnsq.training.models import SmallCNN
from gdnsq.training.surgery import calibrate_model, quantize_model


class KernelOps(TorchDispatchMode):
    """The ops dispatched below autograd that launch work (views and aliases excluded): CUDA kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _calibrated(layer, x, bits=8):
    layer.act_quant.observing = True
    layer(x)
    layer.act_quant.observing = False
    layer.act_quant.calibrate_(bits)
    layer.weight_quant.calibrate_(layer.weight, bits)
    return layer.train()


def _conv(estimator="ste", seed=0):
    torch.manual_seed(seed)
    spec = QuantSpec(bound_w=2, bound_a=2, estimator=estimator)
    x = torch.randn(4, 16, 10, 10).relu()
    return _calibrated(QConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1, bias=False), spec), x), x


def test_opcheck_every_op():
    """Schema (mutation of the key state declared), fake tensors, AOT dispatch: what torch.compile relies on."""
    torch.manual_seed(0)
    x, params = torch.randn(2, 3, 8, 8), (torch.tensor(-4.0), torch.tensor(0.0), torch.tensor(-0.5))
    w, log_s, key = torch.randn(4, 3, 3, 3), torch.full((4, 1, 1, 1), -5.0), torch.tensor(7)
    lo, index = w.view(4, -1).min(1).values, torch.zeros(2, 4, dtype=torch.long)
    cases = [
        (ops.quantize_act, (x, *params, torch.tensor(5), "ste", 0.0, torch.float32)),
        (ops.quantize_act, (x, *params, torch.tensor(5), "ewgs", 0.2, torch.bfloat16)),
        (ops.replay_act, (x, *params, key, "lsq", 0.0, torch.float32)),
        (ops.quantize_act_backward, (torch.randn_like(x), x, *params, key, "aewgs", 1e-2, 0.0, True)),
        (ops.quantize_weight, (w, log_s, torch.tensor(5), "ste", 0.0, torch.float32)),
        (
            ops.quantize_weight_backward,
            (torch.randn_like(w), torch.randn(4), torch.randn(4), w, log_s, lo, index, key, "ste", 1e-2, 0.0),
        ),  # fmt: skip
        (ops.quantize_weight_backward, (torch.randn_like(w), None, None, w, log_s, lo, index, key, "lsq", 1e-2, 0.0)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("estimator", ["ste", "aewgs"])
def test_kernels_per_quantized_conv(estimator):
    """Forward: quantize_act, quantize_weight, convolution; backward: replay_act, convolution_backward and the two
    quantizer backwards (each one kernel on CUDA; aewgs's activation backward is two). The torch path, for scale."""
    counts = {}
    for fused_on in (True, False):
        layer, x = _conv(estimator)
        set_fused(layer, fused_on)
        x = x.requires_grad_(True)
        with KernelOps() as fwd:
            y = layer(x)
        g = torch.randn_like(y)
        with KernelOps() as bwd:
            y.backward(g)  # fresh .grad: nothing accumulated
        counts[fused_on] = (fwd.ops, bwd.ops)
    fwd, bwd = counts[True]
    assert collections.Counter(fwd) == collections.Counter(["quantize_act", "quantize_weight", "convolution"])
    expected = ["replay_act", "convolution_backward", "quantize_act_backward", "quantize_weight_backward"]
    assert collections.Counter(bwd) == collections.Counter(expected)
    assert len(counts[False][0]) > 3 * len(fwd) and len(counts[False][1]) > 3 * len(bwd)


def _saved_bytes(model, x, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in a forward, the model's parameters left out (they exist
    whether saved or not; a cast copy of one is counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("estimator", ["ste", "aewgs"])
def test_quantized_resnet_saves_what_fp_saves_plus_the_quantized_weights(autocast, estimator):
    """The quantized layer saves its input x (which the ReLU before it keeps anyway) and not x̂: over the FP
    network, a quantized ResNet-18 saves at most its quantized weights ŵ (and per-channel scraps)."""
    torch.manual_seed(0)
    fp = timm.create_model("resnet18", num_classes=10).train()
    x = torch.randn(4, 3, 64, 64)
    qat = copy.deepcopy(fp)
    quantize_model(qat, QuantConfig(target_w=2, target_a=2, estimator=estimator))
    calibrate_model(qat, [x], init_bits=8)
    qat.train()
    itemsize = 2 if autocast else 4
    w_hat = sum(layer.weight.numel() * itemsize for _, layer in iter_quantized(qat))
    scraps = sum(layer.weight.shape[0] * 24 + 64 for _, layer in iter_quantized(qat))  # lo, index, keys
    fp_bytes, qat_bytes = _saved_bytes(fp, x, autocast), _saved_bytes(qat, x, autocast)
    assert qat_bytes <= fp_bytes + w_hat + scraps, (qat_bytes, fp_bytes, w_hat)
    set_fused(qat, False)  # the torch path saves x̂ (or its bf16 cast) beside x: what this layer avoids
    assert _saved_bytes(qat, x, autocast) > qat_bytes


def test_compile_traces_a_quantized_resnet_without_graph_breaks():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    quantize_model(model, QuantConfig(target_w=2, target_a=2))
    calibrate_model(model, [x], init_bits=8)
    explained = torch._dynamo.explain(model.train())(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_training_step_matches_eager(channels_last):
    """Inductor on the CPU, fullgraph: the ops run as opaque kernels inside the compiled graph: same values and
    gradients as eager, the key states advanced the same (lsq: no dither, whose draws follow the memory layout,
    which inductor may change). Channels-last: the layout inductor's CPU convolutions want, kept by the ops."""
    torch.manual_seed(0)
    base = SmallCNN()
    quantize_model(base, QuantConfig(target_w=2, target_a=2, estimator="lsq"))
    calibrate_model(base, [torch.randn(8, 1, 28, 28)], init_bits=6)
    x = torch.randn(8, 1, 28, 28)
    if channels_last:
        base, x = base.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(base).train()
        run = torch.compile(model, fullgraph=True) if compiled else model
        for _ in range(2):  # the second call runs with the advanced keys
            model.zero_grad(set_to_none=True)
            out = run(x)
            out.square().mean().backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        keys = [q.rng_key.clone() for q in iter_quantizers(model)]
        results.append((out.detach(), grads, keys))
    (y0, g0, k0), (y1, g1, k1) = results
    assert torch.allclose(y0, y1, rtol=1e-4, atol=1e-5) and all(torch.equal(a, b) for a, b in zip(k0, k1))
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], rtol=1e-3, atol=1e-5) for k in g0)


def test_bf16_autocast_adds_no_casts_around_the_quantizers():
    """Under autocast the conv gets bf16 operands straight from the quantizer ops (the FP conv needs two casts),
    equal to the fp32 path's x̂ and ŵ rounded once; gradients come back in the parameters' dtype."""
    layer, x = _conv()
    x = x.requires_grad_(True)
    with KernelOps() as fwd, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and "_to_copy" not in fwd.ops and len(fwd.ops) == 3
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xq, wq = layer.quantize_input(x), layer.quantized_weight()
    xq32, wq32 = layer.quantize_input(x), layer.quantized_weight()
    assert torch.equal(xq, xq32.bfloat16()) and torch.equal(wq, wq32.bfloat16())


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_one_node_layer_matches_quantizers_then_layer(kind):
    """QuantizedLayer (x̂ recomputed in backward) against the same ops composed by autograd, bit for bit; and
    float64 gradcheck of the bias (the part of the node that is differentiable in the plain sense)."""
    torch.manual_seed(3)
    spec = QuantSpec(bound_w=3, bound_a=3)
    if kind == "conv":
        x = torch.randn(2, 6, 9, 9)
        layer = _calibrated(QConv2d.from_float(nn.Conv2d(6, 5, 3, stride=2, padding=1), spec), x)
    else:
        x = torch.randn(2, 7, 12)
        layer = _calibrated(QLinear.from_float(nn.Linear(12, 5), spec), x)
    g = torch.randn_like(layer(x))
    state = [q.rng_key.clone() for q in (layer.act_quant, layer.weight_quant)]
    results = []
    for one_node in (True, False):
        for q, k in zip((layer.act_quant, layer.weight_quant), state):
            q.rng_key.copy_(k)  # the same draws in both runs
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        if one_node:
            y = layer(xx)
        else:
            xq, wq = layer.quantize_input(xx), layer.quantized_weight()
            y = layer._conv_forward(xq, wq, layer.bias) if kind == "conv" else nn.functional.linear(xq, wq, layer.bias)
        y.backward(g)
        results.append([y.detach(), xx.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    layer = layer.double()
    xd, bias = x.double(), layer.bias.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: torch.func.functional_call(layer, {"bias": b}, (xd,)), (bias,))


def test_random_key_life_cycle():
    """Drawn from torch's RNG when built (seeded runs repeat), advanced by each training forward (new draws every
    step), restored by load_state_dict, and a checkpoint from before the key existed still loads."""

    def build(seed):
        torch.manual_seed(seed)
        model = SmallCNN()
        quantize_model(model, QuantConfig(target_w=2, target_a=2))
        calibrate_model(model, [torch.randn(8, 1, 28, 28)], init_bits=6)
        return model.train()

    a, b, c = build(0), build(0), build(1)
    keys = lambda m: torch.stack([q.rng_key for q in iter_quantizers(m)])  # noqa: E731
    assert torch.equal(keys(a), keys(b)) and not torch.equal(keys(a), keys(c))
    assert len(set(keys(a).tolist())) == len(keys(a))  # every quantizer its own stream
    snapshot = copy.deepcopy(a.state_dict())
    a(torch.randn(2, 1, 28, 28))
    assert (keys(a) != keys(b)).all()
    a.load_state_dict(snapshot)
    assert torch.equal(keys(a), keys(b))
    old = {k: v for k, v in snapshot.items() if not k.endswith("rng_key")}
    c.load_state_dict(old)  # strict: the missing keys are this model's own
    assert torch.equal(keys(c), keys(build(1)))
