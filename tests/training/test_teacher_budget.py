"""The in-run teacher's recipe follows its step budget: a small dataset's few-step epochs get a one-cycle over
SHORT_BUDGET_STEPS steps instead of the epoch-counting plateau rule (issue 27)."""

from __future__ import annotations

import torch
from torch import nn

from gdnsq.training.teacher import SHORT_BUDGET_STEPS, train_fp

CPU = torch.device("cpu")


def _batches(n: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n * 8, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n * 8, 8)]


def test_few_steps_an_epoch_train_a_one_cycle_over_the_step_budget():
    torch.manual_seed(0)
    model, lines = nn.Linear(6, 2), []
    data = _batches(10)  # 10 steps an epoch: 30 epochs would be 300 steps
    report = train_fp(model, data, None, device=CPU, val_loader=data, max_epochs=30, log=lines.append)
    assert report == {"rule": "fixed", "epochs": SHORT_BUDGET_STEPS // 10, "plateaued": False}
    assert lines[0] == f"teacher: 10 steps an epoch, 100 epochs under a one-cycle LR ({SHORT_BUDGET_STEPS} steps)"
    assert (model(torch.cat([x for x, _ in data])).argmax(1) == torch.cat([y for _, y in data])).float().mean() > 0.95


def test_enough_steps_keep_the_plateau_rule_and_explicit_epochs_are_kept():
    data = _batches(-(-SHORT_BUDGET_STEPS // 30))  # the budget or just over it in 30 epochs
    report = train_fp(nn.Linear(6, 2), data, None, device=CPU, val_loader=data, max_epochs=30, log=lambda s: None)
    assert report["rule"] == "plateau"
    report = train_fp(nn.Linear(6, 2), _batches(10), 2, device=CPU, val_loader=None, log=lambda s: None)
    assert report == {"rule": "fixed", "epochs": 2, "plateaued": False}
