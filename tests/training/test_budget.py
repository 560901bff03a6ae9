"""quant.budget: the aggregate's maths (values, gradients; the penalty allocation), the shared size rule and the
convergence rule."""

import math

import pytest
import torch

from gdnsq.config import BudgetConfig, ConfigError, QuantConfig, load_config
from gdnsq.quant import functional as F
from gdnsq.quant.layers import iter_quantized, keep_levels_
from gdnsq.training import budget as B
from gdnsq.training.bits import measure_macs, packed_bytes, packed_size_parts
from gdnsq.training.models import SmallCNN
from gdnsq.training.surgery import calibrate_model, quantize_model


def _model(budget=None, bits=4.0, seed=0):
    torch.manual_seed(seed)
    m = SmallCNN(width=4)
    quantize_model(m, QuantConfig(target_w=2, target_a=2, budget=budget or BudgetConfig()))
    calibrate_model(m, [torch.randn(8, 1, 28, 28)], bits)
    return m


@pytest.mark.parametrize("levels,b_true", [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4)])
def test_whole_bits_matches_the_grid_levels(levels, b_true):
    # a grid of continuous width b has round(2**b - 1) + 1 levels; b anywhere inside the band
    for frac in (0.2, 0.5, 0.8):
        lo, hi = math.log2(levels - 0.5), math.log2(levels + 0.5)  # round(2**b - 1) + 1 == levels in (lo, hi)
        b = torch.tensor(lo + frac * (hi - lo))
        assert int(F.true_bits(torch.round(torch.exp2(b) - 1) + 1)) == b_true
        assert float(B.whole_bits(b, margin=0.0)) == b_true


def test_whole_bits_is_straight_through_and_pessimistic_at_the_edge():
    b = torch.tensor([1.5, 2.3, 3.9], requires_grad=True)
    w = B.whole_bits(b)
    w.sum().backward()
    assert w.tolist() == [2.0, 3.0, 4.0] and b.grad.tolist() == [1.0, 1.0, 1.0]
    edge = torch.tensor(math.log2(4.5 - 0.05))  # 0.05 levels inside W2's band: the 0.1-level margin counts it as 3
    assert float(B.whole_bits(edge, 0.1)) == 3.0 and float(B.whole_bits(edge, 0.0)) == 2.0


def test_soft_max_bounds_the_widest_channel():
    b = torch.tensor([2.0, 3.0, 2.95, 1.0], requires_grad=True)
    s = B.soft_max_bits(b)
    assert 3.0 <= float(s) <= 3.0 + B._TAU * math.log(4)
    s.backward()
    assert b.grad.sum().item() == pytest.approx(1.0, rel=1e-5) and b.grad[1] > b.grad[2] > b.grad[0] > b.grad[3] >= 0


@pytest.mark.parametrize("kind", ["avg_bits_w", "bytes", "bops"])
def test_aggregate_values_and_gradients(kind):
    n = torch.tensor([100.0, 300.0, 600.0], dtype=torch.float64)
    macs = torch.tensor([5e4, 2e4, 1e3], dtype=torch.float64)
    bw = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64, requires_grad=True)
    ba = torch.tensor([4.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    a = B.aggregate(kind, bw, ba, n, macs, fixed=77.0)
    expected = {
        "avg_bits_w": (200 + 900 + 600) / 1000,
        "bytes": 77 + (200 + 900 + 600) / 8,
        "bops": 77 + 5e4 * 8 + 2e4 * 6 + 1e3 * 2,
    }[kind]
    assert float(a) == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(lambda w, x: B.aggregate(kind, w, x, n, macs, 77.0), (bw, ba))
    a.backward()
    grad_w = {"avg_bits_w": n / n.sum(), "bytes": n / 8, "bops": macs * ba.detach()}[kind]
    assert torch.allclose(bw.grad, grad_w)
    # D turns the excess into bits: raising every layer's weights by one bit adds exactly D
    d = B.scale(kind, ba, n, macs)
    a1 = B.aggregate(kind, bw.detach() + 1, ba.detach(), n, macs, 77.0)
    assert float(a1 - a.detach()) == pytest.approx(d, rel=1e-12)


def test_packed_bytes_is_fixed_plus_codes_and_counts_fp_layers():
    m = _model()
    fixed, counts = packed_size_parts(m)
    assert set(counts) == {n for n, _ in iter_quantized(m)}
    bits = {n: 2 for n in counts}
    total = packed_bytes(m, bits)
    assert total == fixed + sum((c * 2 + 7) // 8 for c, _ in counts.values())
    fp_params = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("stem", "head", "fc", "classifier")))
    assert fixed > 4 * fp_params  # the FP stem and classifier are in the size
    with pytest.raises(KeyError):
        packed_bytes(m, {})


def test_budget_penalty_trades_bits_by_size():
    m = _model(BudgetConfig(allocate="penalty", kind="bytes", value=1.0))
    budget = B.Budget(BudgetConfig(allocate="penalty", kind="bytes", value=1.0), m, None)
    layers = list(iter_quantized(m))
    db, soft = [], []
    for _, l in layers:  # ∂b_c/∂log_s_c: each channel's bits depend on its own step only
        b = l.weight_bits()
        db.append(torch.autograd.grad(b.sum(), l.weight_quant.log_s)[0].reshape(-1))
        soft.append(torch.softmax(b.detach().reshape(-1) / B._TAU, 0))
    terms = budget.penalties(m, eps=1e-3, p=1.0)
    assert terms.value > 1.0 and terms.lag > 0 and float(terms.p_w) == pytest.approx(terms.lag)
    terms.p_w.backward()
    # dP/dlog_s_c = (n_l / N) · softmax(b/τ)_c · ∂b_c/∂log_s_c: a layer's pull is its share of the weights
    total = sum(l.weight.numel() for _, l in layers)
    for (_, l), d, w in zip(layers, db, soft):
        want = l.weight.numel() / total * w * d
        assert torch.allclose(l.weight_quant.log_s.grad.reshape(-1), want, rtol=1e-4, atol=1e-9)


def test_budget_inside_gives_zero_penalty_and_the_planned_level_starts_at_init():
    m = _model(bits=4.0)
    big = B.Budget(BudgetConfig(allocate="penalty", kind="avg_bits_w", value=6.0), m, None)
    assert float(big.penalties(m, 1e-3, 1.0).p_w) == 0.0
    tight = B.Budget(BudgetConfig(allocate="penalty", kind="avg_bits_w", value=2.0), m, None)
    assert tight.penalties(m, 1e-3, 1.0, level_fraction=1.0, init_bits=8.0).lag < 0  # the level is still at 8
    assert tight.penalties(m, 1e-3, 1.0).lag == pytest.approx(4.0 + 1.0 - 2.0, abs=0.3)  # 4-bit init, +1 whole bit


def test_a_budget_met_exactly_in_whole_bits_switches_the_penalty_off():
    m = _model(bits=1.9)  # every weight grid inside W2's band
    from gdnsq.training.budget import uniform_value

    exact = B.Budget(
        BudgetConfig(allocate="penalty", kind="bytes", value=uniform_value("bytes", m, 2, 2, None)), m, None
    )
    assert float(exact.penalties(m, 1e-3, 1.0).p_w) == 0.0 and exact.within(m)


def test_convergence_rule_uses_true_bits_and_exact_bytes():
    m = _model(bits=2.2)  # every grid at 2 bits (5 levels?) -> true bits from the grid
    true_w = {n: max(1, l.true_weight_bits()) for n, l in iter_quantized(m)}
    exact = packed_bytes(m, true_w)
    assert B.Budget(BudgetConfig(allocate="penalty", kind="bytes", value=exact), m, None).within(m)
    assert not B.Budget(BudgetConfig(allocate="penalty", kind="bytes", value=exact - 1), m, None).within(m)
    x = torch.randn(2, 1, 28, 28)
    macs = measure_macs(m, x)
    bops = B.Budget(BudgetConfig(allocate="penalty", kind="bops", value=1.0), m, x).true_value(m)
    want = sum(
        macs[n] * true_w.get(n, 32) * (l.true_act_bits() if n in true_w else 32)
        for n, l in m.named_modules()
        if n in macs
    )
    assert bops == pytest.approx(want)


def test_bounds_are_the_targets_and_the_guard_uses_min_bits():
    cfg = QuantConfig(
        budget=BudgetConfig(allocate="penalty", kind="bytes", value=100.0, min_bits=1, max_bits=6),
        rules=[{"pattern": r"features\.4", "target_w": 3}],
    )
    torch.manual_seed(0)
    m = SmallCNN(width=4)
    quantize_model(m, cfg)
    targets = {n: int(l.target_w) for n, l in iter_quantized(m)}
    assert targets["features.4"] == 3 and {v for k, v in targets.items() if k != "features.4"} == {6}
    calibrate_model(m, [torch.randn(8, 1, 28, 28)], 4.0)
    with torch.no_grad():
        for _, l in iter_quantized(m):
            l.weight_quant.log_s.add_(20.0)
    keep_levels_(m, 0.1, floor=1)  # activations keep their target_a (no value_a)
    assert all(l.weight_quant.levels(l.weight).min() == 2 for _, l in iter_quantized(m))


def test_quantize_edges_puts_stem_and_classifier_weights_under_the_budget_with_fp_inputs():
    fp_edges = _model(BudgetConfig(kind="bytes", value=1e6))
    edges = _model(BudgetConfig(kind="bytes", value=1e6, quantize_edges=True))
    assert {n for n, _ in iter_quantized(edges)} == {n for n, _ in iter_quantized(fp_edges)} | {"stem.0", "head"}
    for name in ("stem.0", "head"):
        layer = edges.get_submodule(name)
        assert layer.act_quant is None or not layer.act_quant.enabled  # the input stays FP, as when skipped
        assert int(layer.target_w) == 8  # bounded by max_bits like every other layer
    _, counts = packed_size_parts(edges)
    assert {n: c[0] for n, c in counts.items() if n in ("stem.0", "head")} == {"stem.0": 36, "head": 80}
    at2 = packed_bytes(edges, {n: 2 for n in counts})
    assert at2 < packed_bytes(fp_edges, {n: 2 for n, _ in iter_quantized(fp_edges)})  # codes replace FP weights
    assert packed_bytes(edges, {**{n: 2 for n in counts}, "head": 3}) == at2 + (80 * 3 + 7) // 8 - (80 * 2 + 7) // 8
    # No budget: the option changes nothing (the paper's convention keeps the edges FP)
    torch.manual_seed(0)
    plain = SmallCNN(width=4)
    quantize_model(plain, QuantConfig(budget=BudgetConfig(quantize_edges=True)))
    assert "stem.0" not in {n for n, _ in iter_quantized(plain)}


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="quant.budget.value"):
        load_config(overrides={"quant.budget.kind": "bytes"})
    with pytest.raises(ConfigError, match="quant.budget.max_bits"):
        BudgetConfig(allocate="penalty", kind="bops", value=1.0, min_bits=4, max_bits=2)
