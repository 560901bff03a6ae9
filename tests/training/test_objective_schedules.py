"""Exact tests of the objective and the schedules (pure torch / pure Python)."""

import math

import pytest
import torch

from gdnsq.config import ObjectiveConfig, ScheduleConfig
from gdnsq.errors import ConfigError
from gdnsq.training.objective import (
    GDNSQObjective,
    exterior_penalty,
    jeffreys_divergence,
    kl_divergence,
    ns_top1,
    task_loss,
)
from gdnsq.training.schedules import (
    ScheduleState,
    lr_factor,
    next_noise_ratio,
    plan_descent,
    temperature_increment,
)


def test_jeffreys_zero_on_equal_and_symmetric():
    a, b = torch.randn(16, 10), torch.randn(16, 10)
    assert jeffreys_divergence(a, a).item() == 0.0
    assert jeffreys_divergence(a, b).item() == pytest.approx(jeffreys_divergence(b, a).item(), rel=1e-6)
    assert jeffreys_divergence(a, b).item() == pytest.approx(
        (kl_divergence(a, b) + kl_divergence(b, a)).item(), rel=1e-6
    )
    assert jeffreys_divergence(a, b).item() > 0


def test_kl_hand_computed():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-6)


def test_task_loss_ce_uses_labels():
    logits = torch.tensor([[2.0, 0.0]])
    assert task_loss("ce", logits, None, torch.tensor([0])).item() == pytest.approx(
        math.log(1 + math.exp(-2.0)), rel=1e-6
    )


def test_penalty_zero_inside_positive_outside():
    bits = torch.tensor([1.5, 1.999])
    assert exterior_penalty(bits, 2.0, 1e-3, 1.0).item() == 0.0
    # max(0, 3 - 1.999) = 1.001 and max(0, 1 - 1.999) = 0 -> mean 0.5005
    assert exterior_penalty(torch.tensor([3.0, 1.0]), 2.0, 1e-3, 1.0).item() == pytest.approx(0.5005)
    assert exterior_penalty(torch.tensor([4.0]), 2.0, 1e-3, 2.0).item() == pytest.approx(2.001**2)


def _tiny_quantized(target=2.0, bits=8.0):
    from gdnsq.config import QuantConfig
    from gdnsq.training.models import SmallCNN
    from gdnsq.training.surgery import calibrate_model, quantize_model

    m = SmallCNN(width=4)
    quantize_model(m, QuantConfig(target_w=target, target_a=target))
    calibrate_model(m, [torch.randn(8, 1, 28, 28)], bits)
    return m


def test_objective_combines_terms_and_lossless_swaps_weights():
    m = _tiny_quantized()
    s, te, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    d = jeffreys_divergence(s, te).item()
    obj = GDNSQObjective(ObjectiveConfig(penalty_weight=2.0, task_weight=3.0))
    loss, parts = obj(m, s, te, y, temperature=0.5)
    pw, pa = float(parts["train/penalty_w"]), float(parts["train/penalty_a"])  # parts are device tensors
    assert parts["train/active_w"] == 4 and parts["train/active_a"] == 4
    w = (4 + 1e-3) / (8 + 1e-3)
    assert loss.item() == pytest.approx(3.0 * d + 2.0 * 0.5 * d * (w * pw + w * pa), rel=1e-5)
    lossless = GDNSQObjective(ObjectiveConfig(penalty_weight=2.0, task_weight=3.0, lossless=True))
    loss2, _ = lossless(m, s, te, y, temperature=0.5)
    assert loss2.item() == pytest.approx(3.0 * 0.5 * d + 2.0 * d * (w * pw + w * pa), rel=1e-5)


def test_objective_running_mean():
    m = _tiny_quantized()
    obj = GDNSQObjective(ObjectiveConfig(loss_ema=0.5))
    y = torch.zeros(2, dtype=torch.long)
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    obj(m, b, a, y, 0.0)
    first = jeffreys_divergence(b, a).item()
    obj(m, a, a, y, 0.0)
    assert obj.loss_mean == pytest.approx(0.5 * first)


def test_ns_top1():
    assert ns_top1(91.0, True) == 91.0 and ns_top1(91.0, False) == 0.0


def test_lr_schedule_exact():
    assert [lr_factor(s, 4, 0, 0.5) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor(6, 0, k, 0.5) for k in (0, 1, 2, 3)] == [1.0, 0.5, 0.25, 0.125]
    assert lr_factor(100, 0, 100, 0.5, min_ratio=0.01) == 0.01


def test_temperature_and_noise_schedules_exact():
    assert temperature_increment(2, 3, 0.1, 2.0) == 0.0
    assert temperature_increment(3, 3, 0.1, 2.0) == pytest.approx(0.2)
    assert next_noise_ratio(0.05, 0.0, 0.01) == 0.04
    assert next_noise_ratio(0.05, 0.3, 0.01) == 0.05
    assert next_noise_ratio(0.005, 0.0, 0.01) == 0.0


def _absolute(**kw):
    cfg = ScheduleConfig(mode="absolute", **kw)
    return cfg, plan_descent(cfg, 1000, 8.0, 2.0)


def test_absolute_schedule_state_warmup_growth_and_convergence():
    cfg, plan = _absolute(warmup_steps=2, scale_t=10.0, anneal=0.5, noise_ratio=0.02, noise_step=0.01, check_every=1)
    st = ScheduleState(noise_ratio=cfg.noise_ratio)
    for penalty, conv in ((1.0, False), (1.0, False), (1.0, False), (0.0, True), (0.0, True)):
        st.advance(cfg, plan, base_lr=0.01, penalty=penalty, lag_bits=0.0, check=lambda c=conv: c)
    # t grows by base_lr·scale_t = 0.1 from step 2 on: steps 2, 3, 4
    assert st.temperature == pytest.approx(0.3)
    assert st.converged_step == 4 and st.step == 5
    assert st.noise_ratio == 0.0
    assert st.lr_factor(cfg, plan) == 0.25  # two converged steps -> 0.5**2


def test_anneal_pauses_while_not_converged_and_resumes():
    cfg, plan = _absolute(warmup_steps=0, scale_t=1.0, anneal=0.5, check_every=2)
    st = ScheduleState()
    verdicts = iter([True, False, True])  # checks after steps 2, 4, 6
    factors = []
    for _ in range(6):
        st.advance(cfg, plan, base_lr=0.01, penalty=0.0, lag_bits=0.0, check=lambda: next(verdicts))
        factors.append(st.lr_factor(cfg, plan))
    # converged from the check after step 2; out after step 4 (paused); back after step 6
    assert factors == [1.0, 0.5, 0.25, 0.25, 0.25, 0.125]
    assert st.converged_step == 2
    # the temperature grows with the base LR, whatever the annealed LR is
    assert st.temperature == pytest.approx(6 * 0.01)


def test_planned_descent_is_derived_from_the_planned_steps():
    cfg = ScheduleConfig(descent_end=0.5, warmup=0.1, final_lr_ratio=0.01)
    for n in (90, 5000):
        plan = plan_descent(cfg, n, init_bits=8.0, min_target=2.0)
        window = plan.end_step - plan.warmup_steps
        assert plan.warmup_steps == round(0.1 * n) and plan.end_step == round(0.5 * n)
        assert plan.end_step_a is None  # unset: the activations share the weights' window
        # the ease-out level starts at 2·ΔB/window bits per step; the quantizer LR is 1.5x that, capped at 0.05
        assert plan.quant_lr == pytest.approx(min(0.05, 1.5 * 2 * (plan.init_bits - 2.0) / window))
        assert plan.anneal ** (n - plan.end_step) == pytest.approx(0.01)
        assert plan.level_fraction(0) == 1.0 and plan.level_fraction(plan.warmup_steps) == 1.0
        # at end_step the level sits halfway into the band whose true bits meet the target
        level_at_end = 2.0 + (plan.init_bits - 2.0) * plan.level_fraction(plan.end_step)
        assert level_at_end == pytest.approx(2.0 + 0.5 * math.log2(1 + 0.5 / 4), abs=1e-9)
        assert plan.level_fraction(plan.end_step + window) == 0.0
    assert plan.init_bits == 8.0  # the long budget starts where configured ...
    short = plan_descent(cfg, 90, init_bits=8.0, min_target=2.0)
    assert short.quant_lr == pytest.approx(0.05) and 2.0 < short.init_bits < 8.0  # ... the short one nearer T
    # independent of the optimizer's LR: nothing of optim enters the plan
    assert plan_descent(cfg, 400, 8.0, 1.0) == plan_descent(cfg, 400, 8.0, 1.0)


def test_activations_descend_first_when_their_window_ends_earlier():
    cfg = ScheduleConfig(descent_end=0.5, descent_end_a=0.3, warmup=0.1)
    plan = plan_descent(cfg, 1000, init_bits=8.0, min_target=1.0)
    assert (plan.warmup_steps, plan.end_step_a, plan.end_step) == (100, 300, 500)
    # the quantizer LR is sized for the faster descent (the activations' 200 steps, not the weights' 400)
    assert plan.quant_lr == pytest.approx(min(0.05, 1.5 * 2 * (plan.init_bits - 1.0) / 200))
    # the activations' level is at step 300 where the weights' is at step 500, and the same shape before
    assert plan.level_fraction_a(300) == pytest.approx(plan.level_fraction(500))
    assert plan.level_fraction_a(200) == pytest.approx(plan.level_fraction(300))
    assert plan.level_fraction_a(300) < 0.1 < plan.level_fraction(300)  # inputs in the band, weights still 37 % up
    st = ScheduleState(step=300)
    assert st.level_fraction(plan) == (plan.level_fraction(300), plan.level_fraction_a(300))
    # a window too short for the whole span at the capped LR lowers every layer's start (200 steps: 3.3 bits of 7)
    assert plan.init_bits == pytest.approx(1.0 + 0.05 * 200 / 3)
    # unset, both kinds share one window, as with descent_end_a = descent_end
    same = plan_descent(ScheduleConfig(descent_end=0.5, warmup=0.1), 1000, 8.0, 1.0)
    together = plan_descent(ScheduleConfig(descent_end=0.5, descent_end_a=0.5, warmup=0.1), 1000, 8.0, 1.0)
    assert same.end_step_a is None and together.end_step_a == 500 and same.init_bits == together.init_bits
    assert all(
        same.level_fraction_a(s) == same.level_fraction(s) == together.level_fraction_a(s)
        for s in (0, 150, 300, 499, 700)
    )
    with pytest.raises(ConfigError, match="schedule.descent_end_a"):
        ScheduleConfig(warmup=0.1, descent_end_a=0.1)


def test_planned_temperature_rises_while_lagging_and_falls_slowly_otherwise():
    cfg = ScheduleConfig(warmup=0.1, descent_end=0.5)
    plan = plan_descent(cfg, 100, 8.0, 2.0)
    st = ScheduleState(step=plan.warmup_steps)
    st.advance(cfg, plan, base_lr=1.0, penalty=1.0, lag_bits=1.0)
    up = st.temperature
    assert up == pytest.approx(2.0 ** (32 / 40))  # one full-lag step: 32 doublings per 40-step window / 40
    st.advance(cfg, plan, base_lr=1.0, penalty=0.0, lag_bits=-5.0)
    assert st.temperature == pytest.approx(up * 2.0 ** (-0.25 * 32 / 40))


def test_objective_level_moves_from_init_bits_to_the_target():
    m = _tiny_quantized(target=2, bits=8.0)  # every quantizer calibrated at exactly 8 bits
    obj = GDNSQObjective(ObjectiveConfig(), init_bits=8.0)
    s, te, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    _, at_start = obj(m, s, te, y, temperature=1.0, level_fraction=1.0)
    assert at_start["train/penalty_w"] == pytest.approx(1e-3, abs=1e-4) and at_start[
        "train/penalty_a"
    ] == pytest.approx(1e-3, abs=1e-4)
    _, half = obj(m, s, te, y, temperature=1.0, level_fraction=0.5)  # level 2 + 6·0.5 = 5 -> 3 bits above
    assert half["train/penalty_a"] == pytest.approx(3.001, abs=1e-4)
    assert obj.last_terms.lag == pytest.approx(3.0, abs=1e-3)
    _, end = obj(m, s, te, y, temperature=1.0, level_fraction=0.0)
    assert end["train/penalty_a"] == pytest.approx(6.001, abs=1e-4)


def test_objective_levels_of_weights_and_activations_follow_their_own_fractions():
    m = _tiny_quantized(target=2, bits=8.0)
    obj = GDNSQObjective(ObjectiveConfig(), init_bits=8.0)
    s, te, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    _, parts = obj(m, s, te, y, temperature=1.0, level_fraction=(1.0, 0.0))  # weights at init, inputs at target
    assert parts["train/penalty_w"] == pytest.approx(1e-3, abs=1e-4)
    assert parts["train/penalty_a"] == pytest.approx(6.001, abs=1e-4)
    assert obj.last_terms.lag == pytest.approx(6.0, abs=1e-3)


def test_objective_cumulative_loss_scale_and_channel_counts():
    m = _tiny_quantized(target=2, bits=8.0)
    y = torch.zeros(2, dtype=torch.long)
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    obj = GDNSQObjective(ObjectiveConfig(loss_scale="cumulative", count_active="channels"))
    obj(m, b, a, y, 0.0)
    obj(m, a, a, y, 0.0)
    obj(m, a, a, y, 0.0)
    assert obj.loss_mean == pytest.approx(jeffreys_divergence(b, a).item() / 3)
    from gdnsq.quant.layers import iter_quantized

    channels = sum(layer.weight.shape[0] for _, layer in iter_quantized(m))
    assert obj.last_terms.active_w == channels and obj.last_terms.active_a == 4


def test_planned_temperature_is_capped_and_falls_back_once_nothing_lags():
    from gdnsq.config import ScheduleConfig
    from gdnsq.training.schedules import ScheduleState, plan_descent

    cfg = ScheduleConfig(max_temperature=8.0)
    plan = plan_descent(cfg, planned_steps=200, init_bits=8.0, min_target=1.0)
    state = ScheduleState()
    for _ in range(plan.end_step):  # a layer that never catches up with its plan
        state.advance(cfg, plan, base_lr=1e-3, penalty=1.0, lag_bits=0.8)
    assert state.temperature == 8.0
    for _ in range(5):
        state.advance(cfg, plan, base_lr=1e-3, penalty=0.0, lag_bits=-0.1)
    assert 1.0 < state.temperature < 8.0


def test_temperature_cap_is_released_late_in_a_run_that_has_not_converged():
    from gdnsq.config import ScheduleConfig
    from gdnsq.training.schedules import ScheduleState, plan_descent

    cfg = ScheduleConfig(max_temperature=8.0)
    plan = plan_descent(cfg, planned_steps=200, init_bits=8.0, min_target=1.0)
    release = (plan.end_step + plan.planned_steps) / 2
    lagging, converged = ScheduleState(), ScheduleState()
    converged.converged, converged.converged_step = True, 1  # it met its targets once: the cap holds
    for state in (lagging, converged):
        for _ in range(plan.planned_steps):
            state.advance(cfg, plan, base_lr=1e-3, penalty=1.0, lag_bits=0.8)
            if state.step == int(release):
                assert state.temperature == 8.0
    assert converged.temperature == 8.0
    assert lagging.temperature > 8.0 * 2**8
