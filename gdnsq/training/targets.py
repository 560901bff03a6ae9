"""Who sets each quantized layer's bit targets, and when: one object the engine calls at fixed points.

A layer's targets live in one place, its ``target_w`` / ``target_a`` buffers (quant.layers): the penalty, the
level guard, the target hold and the convergence check read them, and the state dict carries them, so a resumed
run, a checkpoint and a packed file have them. They start at the layer's bounds (``QuantSpec.bound_w`` /
``bound_a``, set by surgery: quant.target_w / target_a or a rule's; quant.budget.max_bits under a budget).

- :class:`UniformTargets` (no budget): every target is its bound for the whole run.
- :class:`BudgetTargets` (``quant.budget``): the targets start as upper bounds. On the run's first batch the
  model's constants are measured and, with ``allocate: probe``, the probe's widths (training.allocation) become
  the targets; during the descent the level guard lets grids go down to min_bits; at the first true-bit
  convergence every layer's widths become its targets; convergence also needs the true aggregate in the budget.

The engine's call points, in run order: ``plan_target`` (the width the descent is planned for), ``start`` (every
batch; acts once), ``guard_floors`` (after each optimizer step), ``after_step`` (after the schedule advanced),
``within`` (in the convergence check) and ``resume`` (when a checkpoint is loaded).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..quant.layers import iter_quantized
from .allocation import allocate_input_widths, allocate_widths
from .budget import Budget


class UniformTargets:
    """No budget: the layers' targets are their bounds and nothing moves them."""

    def plan_target(self, model: nn.Module, init_bits: float) -> float:
        """The smallest layer target (weights or inputs): the descent is planned to reach it in time."""
        targets = [float(t) for _, layer in iter_quantized(model) for t in (layer.target_w, layer.target_a)]
        return min(targets) if targets else init_bits

    def start(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> None:
        pass

    def guard_floors(self) -> tuple[float | None, float | None]:
        """The level guard's (weights', inputs') floors; None: each layer's target."""
        return None, None

    def after_step(self, model: nn.Module, converged_step: int | None) -> None:
        pass

    def within(self, model: nn.Module) -> bool:
        return True

    def resume(self, converged_step: int | None) -> None:
        pass


class BudgetTargets:
    """quant.budget: the layers share one budget; its allocation sets their targets (see the module docstring).

    ``objective`` (a GDNSQObjective) gets the budget at :meth:`start`, for the aggregate's penalty."""

    def __init__(self, qcfg: QuantConfig, objective=None):
        self.cfg, self.margin, self.objective = qcfg.budget, qcfg.level_margin, objective
        self.budget: Budget | None = None  # the model's constants, measured on the first batch
        self.fixed = False  # the first true-bit convergence made the widths the targets (see after_step)

    def plan_target(self, model: nn.Module, init_bits: float) -> float:
        """The uniform weight width that meets the budget (bops: min_bits, its MACs need an input), and the
        activation targets, whichever is lower: the targets are upper bounds, so the descent is planned as for
        the budget's uniform width."""
        b = self.cfg
        a_targets = [float(l.target_a) for _, l in iter_quantized(model) if l.act_quant is not None]
        a = b.value_a if b.value_a is not None else (min(a_targets) if a_targets else float(b.max_bits))
        if b.kind == "bops":
            return float(b.min_bits)
        return min(max(float(b.min_bits), math.floor(Budget(b, model, None).equivalent_bits(a))), a)

    def start(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> None:
        """The model's constants (MACs on this input's shape, fixed bytes), once; with ``allocate: probe`` on the
        run's first step each layer's width from the probe becomes its target. A resumed run (step > 0) has its
        targets back in the model's state and probes nothing."""
        if self.budget is not None:
            return
        self.budget = Budget(self.cfg, model, x[:1], self.margin)
        if self.objective is not None:
            self.objective.budget = self.budget
        if self.cfg.allocate == "probe" and step == 0:
            inputs = None
            if self.cfg.value_a is not None:  # the inputs first: their widths enter the weights' BOPs
                inputs = allocate_input_widths(model, x, y, self.budget)
            widths = allocate_widths(model, x, y, self.budget, inputs)
            with torch.no_grad():
                for name, layer in iter_quantized(model):
                    layer.target_w.fill_(float(widths[name]))
                    if inputs is not None and name in inputs:
                        layer.target_a.fill_(float(inputs[name]))

    def guard_floors(self) -> tuple[float | None, float | None]:
        """During the descent the budget frees the weights (and with value_a the inputs) down to min_bits."""
        if self.fixed:
            return None, None
        return self.cfg.min_bits, (self.cfg.min_bits if self.cfg.value_a is not None else None)

    @torch.no_grad()
    def after_step(self, model: nn.Module, converged_step: int | None) -> None:
        """At the first true-bit convergence every layer's widths become its targets, so from here on the level
        guard fills each grid to all 2**width levels (a channel with fewer levels than its layer's storage width
        wastes them) and the per-layer penalty holds the widths."""
        if converged_step is None or self.fixed:
            return
        for _, layer in iter_quantized(model):
            layer.target_w.fill_(max(self.cfg.min_bits, layer.true_weight_bits()))
            if self.cfg.value_a is not None and layer.act_quant is not None:
                layer.target_a.fill_(max(self.cfg.min_bits, layer.true_act_bits()))
        self.fixed = True

    def within(self, model: nn.Module) -> bool:
        """The true aggregate within the budget (and the inputs' bits per element within value_a)."""
        return self.budget is None or self.budget.within(model)

    def resume(self, converged_step: int | None) -> None:
        self.fixed = converged_step is not None  # the fixed targets came back with the model's state


def create_targets(qcfg: QuantConfig, objective=None) -> UniformTargets | BudgetTargets:
    """The run's targets strategy: BudgetTargets under an active quant.budget, else UniformTargets."""
    return BudgetTargets(qcfg, objective) if qcfg.budget.active else UniformTargets()
