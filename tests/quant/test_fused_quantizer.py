"""quant.fused: the weight quantizer's kept-error path is bit-identical to the recomputing one (fp32, CPU)."""
import copy

import pytest
import torch
from torch import nn

from gdnsq.config import QuantConfig
from gdnsq.quant.functional import noisy_quantize
from gdnsq.quant.layers import iter_quantizers, set_fused
from gdnsq.training.models import SmallCNN
from gdnsq.training.surgery import calibrate_model, quantize_model


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 64)])
@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_kept_error_is_bit_identical(shape, estimator):
    torch.manual_seed(0)
    w = torch.randn(shape)
    s = torch.rand(shape[0], *([1] * (len(shape) - 1))) * 0.05 + 0.01
    z = w.reshape(shape[0], -1).min(1).values.reshape(s.shape)
    g = torch.randn(shape)
    outs = []
    for keep in (False, True):
        x, st = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
        torch.manual_seed(1)  # the dither signs come from torch's RNG
        y = noisy_quantize(x, None, None, z, st, estimator=estimator, keep_error=keep)
        y.backward(g)
        outs.append((y.detach(), x.grad, st.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_fused_model_steps_match_unfused_bit_for_bit():
    torch.manual_seed(0)
    base = SmallCNN()
    quantize_model(base, QuantConfig(target_w=2, target_a=2))
    calibrate_model(base, [torch.randn(16, 1, 28, 28)], init_bits=6)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    states = []
    for fused in (False, True):
        model = copy.deepcopy(base).train()
        set_fused(model, fused)
        assert all(q.fused == fused for q in iter_quantizers(model) if hasattr(q, "fused"))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(2)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
