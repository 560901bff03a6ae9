"""The target hold: once the descent has reached the targets, no learnable grid gets more than 2**T levels."""

import math

import pytest
import torch

from gdnsq.config import load_config
from gdnsq.quant import functional as F
from gdnsq.quant.layers import cap_levels_, iter_quantized, keep_levels_, within_targets
from gdnsq.training.engine import Engine
from gdnsq.training.runtime import Precision
from tests.training.test_level_guard import _levels, _model


@pytest.mark.parametrize("target", [1, 2, 3, 4, 8])
def test_max_bits_is_the_widest_grid_with_2_to_the_t_levels(target):
    def levels(b):
        return F.grid_levels(torch.tensor(2.0**b - 1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))

    assert levels(F.max_bits(target, 0.1)) == 2**target
    assert levels(F.max_bits(target, 0.0) - 1e-9) == 2**target  # just under the boundary: still 2**T
    assert levels(F.max_bits(target, 0.0) + 1e-9) == 2**target + 1  # just over: one level too many
    assert F.min_bits(target, 0.1) < target - 1e-3 < F.max_bits(target, 0.1)  # the penalty's aim is inside the band


@pytest.mark.parametrize("target", [1, 2, 4])
def test_hold_brings_every_grid_back_to_its_target(target):
    m = _model(target, bits=4.0)
    with torch.no_grad():
        for i, (_, layer) in enumerate(iter_quantized(m)):  # far finer than the target, channel by channel
            layer.weight_quant.log_s.sub_(
                torch.linspace(1, 12, layer.weight.shape[0]).view_as(layer.weight_quant.log_s)
            )
            layer.act_quant.log_s.sub_(3.0 + i)
    assert not within_targets(m)
    cap_levels_(m, margin=0.1)
    for _, layer in iter_quantized(m):
        assert layer.true_weight_bits() == target and layer.true_act_bits() == target
        assert float(layer.weight_bits().detach().max()) <= F.max_bits(target, 0.1) + 1e-5
    assert min(_levels(m)) == max(_levels(m)) == 2**target  # coarse enough, and no grid lost a level
    keep_levels_(m, margin=0.1)  # the two guards agree: the lower one has nothing left to do
    assert min(_levels(m)) == max(_levels(m)) == 2**target and within_targets(m)


def test_hold_leaves_coarser_grids_alone():
    m = _model(4, bits=3.0)  # 3-bit grids under a 4-bit target
    before = [q.log_s.clone() for _, l in iter_quantized(m) for q in (l.weight_quant, l.act_quant)]
    cap_levels_(m, margin=0.1)
    after = [q.log_s for _, l in iter_quantized(m) for q in (l.weight_quant, l.act_quant)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def _engine(hold: bool, lr: float = 0.3):
    cfg = load_config(
        None,
        {
            "quant.target_w": 2,
            "quant.target_a": 2,
            "optim.name": "adamw",
            "optim.lr": lr,
            "optim.quant_lr": 1e-8,
            "schedule.mode": "absolute",
            "schedule.warmup_steps": 0,
            "ray.enabled": False,
            "tracking.enabled": False,
            "objective.distill": "ce",
            "quant.hold_targets": hold,
        },
    )
    m = _model(2, bits=2.0)
    keep_levels_(m, 0.1)
    assert within_targets(m)
    eng = Engine(cfg, m, None, torch.device("cpu"), Precision.create(cfg.train, torch.device("cpu")))
    eng.sched.converged_step, eng.sched.converged = 0, True  # the descent has ended: the model is at its targets
    eng.sched.temperature = 0.0  # no penalty; big weight steps under still steps: the weights' ranges grow
    return eng, m


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)) for _ in range(n)]


def test_engine_holds_a_converged_model_at_its_targets_while_the_weights_spread():
    batches = _batches(seed=0, n=30)
    eng, m = _engine(hold=False)
    eng.train_epoch(batches)
    assert not within_targets(m)  # the check can fail: without the hold the task takes the grids past 2 bits
    eng, m = _engine(hold=True)
    eng.train_epoch(batches)
    assert within_targets(m) and max(_levels(m)) == 4
    assert math.isfinite(float(next(iter_quantized(m))[1].weight_bits().detach().max()))


def test_hold_does_not_touch_a_run_whose_checks_pass():
    """It acts only on a failed check: a run that stays at its targets trains exactly as without it."""
    batches = _batches(seed=1, n=20)
    states = []
    for hold in (False, True):
        torch.manual_seed(0)
        eng, m = _engine(hold, lr=1e-4)
        eng.train_epoch(batches)
        assert within_targets(m)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_hold_acts_at_the_epochs_end_not_within_it():
    """Within an epoch a failed check is left to the penalty; the epoch ends at the targets."""
    batches = _batches(seed=0, n=30)
    eng, m = _engine(hold=True)
    seen = []
    eng.train_epoch(batches, on_step=lambda step, parts: seen.append(within_targets(m)))
    assert not all(seen)  # the grids left their targets during the epoch ...
    assert within_targets(m) and max(_levels(m)) == 4  # ... and are back at its end
