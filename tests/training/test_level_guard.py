"""The level guard: no learnable grid loses levels, and a dead grid never counts as converged."""

import pytest
import torch

from gdnsq.config import ConfigError, JobConfig, QuantConfig, load_config
from gdnsq.quant import functional as F
from gdnsq.quant.layers import iter_quantized, keep_levels_, within_targets
from gdnsq.training.engine import Engine
from gdnsq.training.models import SmallCNN
from gdnsq.training.runtime import Precision
from gdnsq.training.surgery import calibrate_model, quantize_model


def _model(target, bits=4.0, seed=0):
    torch.manual_seed(seed)
    m = SmallCNN(width=4)
    quantize_model(m, QuantConfig(target_w=target, target_a=target))
    calibrate_model(m, [torch.randn(8, 1, 28, 28)], bits)
    return m


def _levels(m):
    out = []
    for _, layer in iter_quantized(m):
        out.append(layer.weight_quant.levels(layer.weight).min().item())
        out.append(layer.act_quant.levels().item())
    return out


@pytest.mark.parametrize("target", [1, 2, 4])
def test_guard_restores_every_level_after_direct_pushes(target):
    m = _model(target)
    with torch.no_grad():
        for i, (_, layer) in enumerate(iter_quantized(m)):
            layer.weight_quant.log_s.add_(
                torch.linspace(8, 30, layer.weight.shape[0]).view_as(layer.weight_quant.log_s)
            )
            layer.act_quant.log_s.add_(5.0 + 10 * i)  # far past log_q: hi < lo
    assert min(_levels(m)) < 2 and not within_targets(m)  # the pushes killed grids
    keep_levels_(m, margin=0.1)
    assert min(_levels(m)) == 2**target
    for _, layer in iter_quantized(m):
        assert float(layer.weight_bits().detach().min()) >= F.min_bits(target, 0.1) - 1e-6
        lo, hi, _, _ = layer.act_quant.grid()
        assert float(hi) > float(lo)
    assert within_targets(m)  # every grid at the target with all of its levels


def test_guard_holds_under_huge_gradient_steps_in_training():
    """Adam steps with an absurd quantizer LR and a loss that rewards coarse grids, guard after each step."""
    cfg = load_config(
        None,
        {
            "quant.target_w": 1,
            "quant.target_a": 1,
            "optim.name": "adamw",
            "optim.quant_lr": 50.0,
            "optim.quant_grad_clip": None,
            "schedule.mode": "absolute",
            "schedule.warmup_steps": 0,
            "ray.enabled": False,
            "tracking.enabled": False,
            "objective.distill": "ce",
        },
    )
    m = _model(1, bits=3.0)
    eng = Engine(cfg, m, None, torch.device("cpu"), Precision.create(cfg.train, torch.device("cpu")))
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 1, 28, 28, generator=gen) * 1e3, torch.randint(0, 10, (16,), generator=gen)) for _ in range(5)
    ]
    eng.sched.temperature = 1e6  # the penalty dominates: every step pushes bits down as hard as it can
    eng.train_epoch(batches)
    assert min(_levels(m)) == 2  # T = 1: both levels kept by every grid after 5 huge steps
    assert not any(layer.has_dead_grid() for _, layer in iter_quantized(m))


def test_dead_grids_are_not_converged():
    m = _model(2)
    assert not within_targets(m)  # 4-bit start, target 2
    keep_levels_(m, 0.1)
    with torch.no_grad():
        for _, layer in iter_quantized(m):  # exactly at the target: converged
            layer.weight_quant.log_s.add_(3.0)  # coarser than the target, then the guard brings it to b_min
            layer.weight_quant.keep_levels_(F.min_bits(2, 0.1), layer.weight)
            layer.act_quant.log_s.copy_(layer.act_quant.log_q - F.min_bits(2, 0.1))
    assert within_targets(m)
    _, layer = next(iter_quantized(m))
    with torch.no_grad():
        layer.weight_quant.log_s[0] += 20.0  # one channel becomes a constant: 1 level, 0 true bits
    assert layer.weight_quant.min_levels(layer.weight) == 1 and layer.has_dead_grid()
    assert not within_targets(m)
    keep_levels_(m, 0.1)
    assert within_targets(m)
    with torch.no_grad():
        layer.act_quant.log_s.copy_(layer.act_quant.log_q + 0.5)  # negative clip span: hi < lo
    assert layer.act_quant.true_bits() == 0 and layer.has_dead_grid() and not within_targets(m)


@pytest.mark.parametrize("field", ["quant.target_w", "quant.target_a"])
def test_fractional_targets_are_rejected_with_the_field_named(field):
    with pytest.raises(ConfigError, match=rf"^{field}: must be an integer"):
        load_config(None, {field: 2.5})
    with pytest.raises(ConfigError, match=r"quant.target_w: must be an integer in \[1, 16\]"):
        QuantConfig(target_w=2.5)
    assert load_config(None, {field: "3"}).quant.target_w in (2, 3)
    assert isinstance(JobConfig().quant.target_w, int)
