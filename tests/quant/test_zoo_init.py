"""The zoo's calibrated initialisations: the MSE clip (LSQ's activation step, PACT's α), hand-computed."""

from __future__ import annotations

import math

import pytest
import torch

from gdnsq.quant.spec import QuantSpec
from gdnsq.quant.zoo import common, lsq, pact


def observe(q, *batches):
    q.observing = True
    for x in batches:
        q(x)
    q.observing = False
    q.calibrate_(8.0)
    return q


def test_mse_clip_ignores_a_few_values_when_the_rest_fit_and_follows_them_otherwise():
    # 1-bit unsigned grid {0, s}. Nine 1s and one 10: s in (2/3, 2] keeps the 1s (error 9(s-1)² + (10-s)²,
    # least 72.9 at s = 1.9), s = 10 drops them to 0 (error 9): the outlier wins.
    few = torch.tensor([1.0] * 9 + [10.0])
    s = common.mse_clip(few, lambda s: lsq.lsq_grid(s, 0, 1, False), torch.tensor(10.0))
    assert s.item() == pytest.approx(10.0)
    # Ninety-nine 1s: 99(s-1)² + (10-s)² is least at s = 1.09; on the 0.1 grid of candidates s = 1.1
    # (80.2 against 81.0 at s = 1.0 and 99 at s = 10).
    many = torch.tensor([1.0] * 99 + [10.0])
    s = common.mse_clip(many, lambda s: lsq.lsq_grid(s, 0, 1, False), torch.tensor(10.0))
    assert s.item() == pytest.approx(1.1)


def test_lsq_activation_step_starts_at_the_mse_fit_and_the_paper_rule_stays_selectable():
    x = torch.tensor([1.0] * 99 + [10.0])
    q = observe(lsq.LSQActQuantizer(1, mse_init=True), x)
    assert torch.exp2(q.log_s).item() == pytest.approx(1.1)
    paper = observe(lsq.LSQActQuantizer(1), x)
    assert torch.exp2(paper.log_s).item() == pytest.approx(2 * x.mean().item() / math.sqrt(1))


def test_lsq_method_uses_the_mse_init_unless_told_otherwise():
    shape = torch.Size((4, 3, 3, 3))
    _, act = lsq.create_lsq(shape, QuantSpec(bound_w=2, bound_a=2, method="lsq"))
    assert act.mse_init
    _, act = lsq.create_lsq(shape, QuantSpec(bound_w=2, bound_a=2, method="lsq", method_args={"act_mse_init": 0}))
    assert not act.mse_init


def test_pact_alpha_starts_at_the_mse_clip_not_the_maximum():
    q = observe(pact.PACTActQuantizer(1, signed="unsigned"), torch.tensor([1.0] * 99 + [10.0]))
    assert q.alpha.item() == pytest.approx(1.1)  # 1 bit: grid {0, α}, the case above


def test_calibration_keeps_a_bounded_strided_sample_and_drops_it_after_calibrating():
    q = lsq.LSQActQuantizer(2, mse_init=True)
    q.observing = True
    big = torch.arange(3 * common.CALIB_SAMPLE, dtype=torch.float32)
    q(big)
    q(torch.tensor([5.0, 6.0]))
    sample = q.calib_sample()
    assert sample.numel() == common.CALIB_SAMPLE + 2
    assert torch.equal(sample[:3], torch.tensor([0.0, 3.0, 6.0]))  # every third value, no random draw
    q.observing = False
    q.calibrate_(8.0)
    with pytest.raises(RuntimeError, match="no calibration data"):
        q.calib_sample()
