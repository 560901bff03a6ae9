"""training.targets: the uniform strategy moves nothing; the budget strategy probes on the first step only, frees the
level guard during the descent and fixes the allocation at the first convergence; the targets it sets live in the
layers' buffers, so a state dict carries them."""

import copy

import pytest
import torch

from gdnsq.config import BudgetConfig, ObjectiveConfig, QuantConfig
from gdnsq.quant.layers import iter_quantized
from gdnsq.training import allocation as A
from gdnsq.training.budget import Budget, uniform_value
from gdnsq.training.models import SmallCNN
from gdnsq.training.objective import GDNSQObjective
from gdnsq.training.surgery import calibrate_model, quantize_model
from gdnsq.training.targets import BudgetTargets, UniformTargets, create_targets


def _model(qcfg: QuantConfig, bits: float = 8.0):
    torch.manual_seed(0)
    m = SmallCNN(width=4)
    quantize_model(m, qcfg)
    calibrate_model(m, [torch.randn(8, 1, 28, 28)], bits)
    return m


def _targets(m) -> dict[str, tuple[float, float]]:
    return {n: (float(l.target_w), float(l.target_a)) for n, l in iter_quantized(m)}


def _batch():
    torch.manual_seed(1)
    return torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))


def test_uniform_targets_move_nothing():
    qcfg = QuantConfig(target_w=3, target_a=2, rules=[{"pattern": r"^fc\.0$", "target_w": 4}])
    m = _model(qcfg)
    targets = create_targets(qcfg)
    assert isinstance(targets, UniformTargets)
    before = _targets(m)
    assert targets.plan_target(m, init_bits=8.0) == 2.0  # the smallest target, weights or inputs
    x, y = _batch()
    targets.start(m, x, y, step=0)
    targets.after_step(m, converged_step=5)
    targets.resume(converged_step=5)
    assert _targets(m) == before
    assert targets.guard_floors() == (None, None) and targets.within(m)


def test_budget_targets_probe_on_the_first_step_only():
    x, y = _batch()
    qcfg = QuantConfig(budget=BudgetConfig(kind="bytes", value=1.0, max_bits=4))
    m = _model(qcfg)
    qcfg.budget.value = float(uniform_value("bytes", m, 2, 2, None))
    bounds = _targets(m)
    assert {w for w, _ in bounds.values()} == {4.0}  # the layers start at their bound, budget.max_bits
    expected = A.allocate_widths(copy.deepcopy(m), x, y, Budget(qcfg.budget, m, None))

    resumed = create_targets(qcfg, GDNSQObjective(ObjectiveConfig()))
    resumed.start(m, x, y, step=7)  # a resumed run: its targets came back with the model
    assert _targets(m) == bounds and resumed.budget is not None

    objective = GDNSQObjective(ObjectiveConfig())
    targets = create_targets(qcfg, objective)
    assert isinstance(targets, BudgetTargets)
    targets.start(m, x, y, step=0)
    assert {n: int(w) for n, (w, _) in _targets(m).items()} == expected
    assert objective.budget is targets.budget  # the aggregate joins the objective
    allocated = _targets(m)
    targets.start(m, x[:8], y[:8], step=0)  # later batches measure and probe nothing
    assert _targets(m) == allocated


@pytest.mark.parametrize("value_a", [None, 2.0])
def test_budget_targets_fix_the_allocation_at_the_first_convergence(value_a):
    qcfg = QuantConfig(budget=BudgetConfig(kind="avg_bits_w", value=2.0, value_a=value_a, min_bits=2, max_bits=8))
    m = _model(qcfg, bits=3.2)
    targets = create_targets(qcfg)
    # During the descent the guard may take grids down to min_bits (the inputs only with value_a).
    assert targets.guard_floors() == (2, 2 if value_a is not None else None)
    bounds = _targets(m)
    targets.after_step(m, converged_step=None)  # not converged yet: the targets stay the bounds
    assert _targets(m) == bounds
    targets.after_step(m, converged_step=12)
    for name, layer in iter_quantized(m):
        assert float(layer.target_w) == max(2, layer.true_weight_bits())
        if value_a is not None and layer.act_quant is not None:
            assert float(layer.target_a) == max(2, layer.true_act_bits())
        else:
            assert float(layer.target_a) == bounds[name][1]
    assert targets.guard_floors() == (None, None)  # from here each grid keeps all 2**target levels
    fixed = _targets(m)
    calibrate_model(m, [torch.randn(8, 1, 28, 28)], 6.0)  # the widths move on: the targets do not follow
    targets.after_step(m, converged_step=12)
    assert _targets(m) == fixed
    # A resumed run that had converged keeps its targets and its guard at them.
    again = create_targets(qcfg)
    again.resume(converged_step=12)
    assert again.guard_floors() == (None, None)
    again.resume(converged_step=None)
    assert again.guard_floors() == (2, 2 if value_a is not None else None)


def test_allocated_targets_travel_in_the_state_dict_under_their_names():
    qcfg = QuantConfig(budget=BudgetConfig(kind="avg_bits_w", value=2.0, max_bits=8))
    m = _model(qcfg, bits=3.2)
    create_targets(qcfg).after_step(m, converged_step=1)
    state = m.state_dict()
    assert {k.rsplit(".", 1)[1] for k in state if k.endswith(("target_w", "target_a"))} == {"target_w", "target_a"}
    fresh = _model(qcfg)
    assert all(float(l.target_w) == 8.0 for _, l in iter_quantized(fresh))
    fresh.load_state_dict(state)
    assert _targets(fresh) == _targets(m)
    assert all(l.spec.bound_w == 8.0 for _, l in iter_quantized(fresh))  # the bound stays the surgery's
