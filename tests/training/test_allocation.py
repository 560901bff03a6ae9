"""quant.budget.allocate: probe — the knapsack against brute force, the probe's bookkeeping, and a job
whose layers end at the widths the probe chose, within the budget."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gdnsq.config import BudgetConfig, QuantConfig
from gdnsq.errors import ConfigError
from gdnsq.quant.layers import iter_quantized
from gdnsq.training import allocation as A
from gdnsq.training.bits import packed_bytes
from gdnsq.training.budget import Budget, uniform_value


def _brute(losses, costs, capacity):
    best, arg = math.inf, None
    for pick in itertools.product(*(range(losses.shape[1]) for _ in range(losses.shape[0]))):
        c = sum(float(costs[l, i]) for l, i in enumerate(pick))
        v = sum(float(losses[l, i]) for l, i in enumerate(pick))
        if c <= capacity and v < best:
            best, arg = v, pick
    return best, arg


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("integer", [True, False])
def test_knapsack_matches_brute_force(seed, integer):
    g = torch.Generator().manual_seed(seed)
    n_layers, n_widths = 4, 4
    sizes = torch.randint(50, 5000, (n_layers, 1), generator=g).double()
    costs = sizes * torch.arange(1, n_widths + 1).double()  # a layer's cost grows with its width
    if not integer:
        costs = costs * 1000.37  # past the exact integer grid: costs are rounded up to 1/65536 of the capacity
    losses = torch.rand(n_layers, n_widths, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    capacity = float(costs[:, 0].sum() + torch.rand((), generator=g) * (costs[:, -1] - costs[:, 0]).sum())
    best, _ = _brute(losses, costs, capacity)
    pick = A.choose_widths(losses, costs, capacity)
    got = sum(float(losses[l, i]) for l, i in enumerate(pick))
    assert sum(float(costs[l, i]) for l, i in enumerate(pick)) <= capacity  # always fits (costs rounded up)
    if integer:
        assert got == pytest.approx(best)
    else:  # a brute-force optimum that needs the last unit of each layer may be missed
        tight, _ = _brute(losses, costs, capacity * (1 - 2 * len(losses) / A._CAPACITY_STEPS))
        assert best <= got <= tight


def test_knapsack_respects_forbidden_widths_and_reports_infeasible():
    losses = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]], dtype=torch.float64)
    costs = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, math.inf]], dtype=torch.float64)
    assert A.choose_widths(losses, costs, 5.0) == [2, 1]  # layer 1 may not take its widest width
    assert A.choose_widths(losses, costs, 1.5) is None


def test_item_costs_per_kind():
    c = A.item_costs("bytes", [9, 16], [0.0, 0.0], [2.0, 2.0], [1, 2])
    assert c.tolist() == [[2.0, 3.0], [2.0, 4.0]]  # ceil(n·b/8): bit-packed codes
    assert A.item_costs("avg_bits_w", [9, 16], [0.0, 0.0], [2.0, 2.0], [1, 2]).tolist() == [[9, 18], [16, 32]]
    assert A.item_costs("bops", [9, 16], [100.0, 10.0], [2.0, 32.0], [1, 2]).tolist() == [[200, 400], [320, 640]]


def _student_and_teacher(cfg: BudgetConfig, x):  # the teacher: the FP model the student was built from
    import copy

    from gdnsq.training.models import SmallCNN
    from gdnsq.training.surgery import calibrate_model, quantize_model

    torch.manual_seed(0)
    teacher = SmallCNN(width=4).eval()
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantConfig(budget=cfg))
    calibrate_model(student, [x], 8.0)
    return student, teacher


def test_allocation_fits_the_budget_and_restores_the_quantizers():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    cfg = BudgetConfig(kind="bytes", value=1.0, max_bits=4)
    student, _ = _student_and_teacher(cfg, x)
    cfg.value = float(uniform_value("bytes", student, 2, 2, None))
    budget = Budget(cfg, student, None)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    widths = A.allocate_widths(student, x, y, budget)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the probe left no trace
    assert set(widths.values()) <= set(range(1, 5))
    quantized = {n for n, l in iter_quantized(student) if l.weight_quant.enabled}
    assert packed_bytes(student, {n: widths[n] for n in quantized}) <= cfg.value
    cfg.value = float(uniform_value("bytes", student, 1, 1, None)) - 1
    with pytest.raises(ConfigError, match="quant.budget.value"):
        A.allocate_widths(student, x, y, Budget(cfg, student, None))


def test_sensitivities_fall_with_width_and_a_budget_spends_bits_where_they_matter():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    cfg = BudgetConfig(kind="bytes", value=1.0, max_bits=4)
    student, _ = _student_and_teacher(cfg, x)
    prices = A.sensitivities(student, x, y, [1, 2, 4, 8])
    assert (prices[:, 0] > prices[:, 1]).all() and (prices[:, 1] > prices[:, -1]).all()
    # The price is the Fisher-weighted error of the best clipped grid: at most the min/max grid's (by hand).
    fisher = A.fisher_diagonal(student, x, y)
    _, layer = next(iter(iter_quantized(student)))
    w = layer.weight.detach()
    lo, hi = w.flatten(1).min(1).values.view(-1, 1, 1, 1), w.flatten(1).max(1).values.view(-1, 1, 1, 1)
    s = (hi - lo) / 3  # 2 bits: 4 levels over [min, max] per channel
    min_max = float((fisher[0] * (torch.round((w - lo) / s) * s + lo - w) ** 2).sum())
    assert 0 < float(prices[0, 1]) <= min_max * (1 + 1e-6)
    # A budget between uniform W1 and W2 spends bits: the allocation is never all-1 when more fits.
    cfg.value = float(uniform_value("bytes", student, 2, 2, None))
    widths = A.allocate_widths(student, x, y, Budget(cfg, student, None))
    assert max(widths.values()) > 1


def test_grid_error_is_zero_on_the_grid_and_per_channel_never_worse():
    codes = torch.randint(0, 4, (3, 50)).float()
    codes[:, 0], codes[:, 1] = 0, 3  # every row spans its grid
    w = codes * torch.tensor([[0.1], [0.5], [2.0]]) - 1.0  # each row exactly on its own 2-bit grid
    f = torch.rand_like(w)
    assert float(A.grid_error(w, f, 2)) == pytest.approx(0.0, abs=1e-9)
    assert float(A.grid_error(w, f, 1)) > 0
    assert float(A.grid_error(w, f, 2, per_channel=False)) > 0  # one grid for rows of different steps
    # Clipping helps a heavy tail: one outlier per row makes the min/max grid coarse for the rest.
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 200, generator=g)
    v[:, 0] = 12.0
    ones = torch.ones_like(v)
    step = (v.max(1, keepdim=True).values - v.min(1, keepdim=True).values) / 3
    lo = v.min(1, keepdim=True).values
    min_max = float(((torch.round((v - lo) / step) * step + lo - v) ** 2).sum())
    assert float(A.grid_error(v, ones, 2)) < 0.5 * min_max


def test_input_grid_error_is_zero_on_the_grid_and_clipping_helps_a_tail():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 1.0]) * 0.25  # on the unsigned 2-bit grid 0, 1/4, 2/4, 3/4
    g2 = torch.rand(6) + 0.5
    assert float(A.input_grid_error(x, g2, 2, signed=False)) == pytest.approx(0.0, abs=1e-12)
    assert float(A.input_grid_error(x, g2, 1, signed=False)) > 0
    assert float(A.input_grid_error(x - 0.5, g2, 2, signed=True)) == pytest.approx(0.0, abs=1e-12)  # from min(x)
    v = torch.rand(500, generator=torch.Generator().manual_seed(0))
    v[0] = 3.0  # one outlier makes the full-range grid coarse for the rest
    ones = torch.ones_like(v)
    step = 3.0 / 3
    full = float(((torch.clamp(torch.round(v / step), 0, 3) * step - v) ** 2).sum())
    assert float(A.input_grid_error(v, ones, 2, signed=False)) < full


def test_input_widths_fit_the_per_element_budget_and_respect_bounds():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    cfg = BudgetConfig(kind="bytes", value=1.0, max_bits=8, value_a=2.0)
    student, _ = _student_and_teacher(cfg, x)
    cfg.value = float(uniform_value("bytes", student, 2, 2, None))
    budget = Budget(cfg, student, x[:1])
    # Elements per sample of each quantized input (width-4 CNN on 28x28): conv1 4x28x28, conv2 4x14x14,
    # conv3 8x7x7, the hidden Linear 8.
    assert budget.elems.tolist() == [4 * 28 * 28, 4 * 14 * 14, 8 * 7 * 7, 8]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    widths = A.allocate_input_widths(student, x, y, budget)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the probe left no trace
    bits = torch.tensor([float(widths[n]) for n, _ in iter_quantized(student)])
    assert float(budget.act_mean(bits)) <= 2.0
    assert set(widths.values()) <= set(range(1, 9))
    # The inputs' prices fall with the width (one row per quantized input).
    prices = A.input_prices(student, x, y, [1, 2, 8])
    assert prices.shape == (4, 3)
    assert (prices[:, 0] > prices[:, 1]).all() and (prices[:, 1] > prices[:, 2]).all()
    # A layer's own target_a (a rule) bounds its input's width; a budget below min_bits everywhere is an error.
    layers = [l for _, l in iter_quantized(student)]
    layers[-1].target_a.fill_(3.0)
    assert A.allocate_input_widths(student, x, y, budget)[list(widths)[-1]] <= 3
    cfg.min_bits, cfg.value_a = 2, 1.5
    with pytest.raises(ConfigError, match="quant.budget.value_a"):
        A.allocate_input_widths(student, x, y, Budget(cfg, student, x[:1]))


def test_activation_budget_counts_bits_per_element():
    cfg = BudgetConfig(kind="bytes", value=1e9, value_a=2.0)
    x = torch.randn(4, 1, 28, 28)
    student, _ = _student_and_teacher(cfg, x)
    budget = Budget(cfg, student, x[:1])
    e = budget.elems
    # The hidden Linear's 8 inputs at 8 bits and conv3's 392 at 1 bit fit 2 bits per element with conv1 and
    # conv2 at 2; a plain mean over the four layers (3.25) would not.
    bits = torch.tensor([2.0, 2.0, 1.0, 8.0])
    assert float(budget.act_mean(bits)) == pytest.approx(float((e * bits).sum() / e.sum()))
    assert float(budget.act_mean(bits)) <= 2.0 < float(bits.mean())


def test_engine_probe_sets_the_inputs_targets_then_the_weights():
    from gdnsq.config import load_config
    from gdnsq.training.engine import Engine

    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    probe = BudgetConfig(kind="bytes", value=1.0, value_a=2.0)
    student, _ = _student_and_teacher(probe, x)
    value = float(uniform_value("bytes", student, 2, 2, None))
    cfg = load_config(
        None,
        {
            "quant.budget.kind": "bytes",
            "quant.budget.value": value,
            "quant.budget.value_a": 2.0,
            "ray.enabled": False,
            "tracking.enabled": False,
            "objective.distill": "ce",
        },
    )
    probe.value = value
    expected_inputs = A.allocate_input_widths(student, x, y, Budget(probe, student, x[:1]))
    eng = Engine(cfg, student, None, torch.device("cpu"))
    eng.targets.start(eng.core, x, y, eng.sched.step)
    got = {n: int(l.target_a) for n, l in iter_quantized(student) if l.act_quant is not None}
    assert got == expected_inputs
    bits = torch.tensor([float(l.target_a) for _, l in iter_quantized(student)])
    assert float(eng.objective.budget.act_mean(bits)) <= 2.0
    assert eng.objective.budget.penalties(student, 1e-3, 1.0).p_a.item() == 0.0  # the per-layer targets descend
