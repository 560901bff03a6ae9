"""Schedules as pure functions of the step, plus the small state the engine carries between steps.

Two modes (``schedule.mode``, METHOD.md section 2):

* ``planned`` (default): the user says where in the run the descent should end (``descent_end``, a fraction
  of the planned steps) and how long the warm-up is (``warmup``, a fraction too); :func:`plan_descent`
  derives the rest from the planned steps, ``quant.init_bits`` and the targets, independent of ``optim.lr``.
  Each layer's penalty aims at a level that eases from init_bits (end of warm-up) to its target T - ε (at
  ``descent_end``; the activations' at ``descent_end_a`` when set), so every channel descends
  gradually; the temperature t is a multiplier
  raised (dual-ascent style) while some layer lags its planned level and lowered slowly while none does.
  The quantizer LR is sized so that Adam's per-step cap on a log-parameter (≈ its LR) is twice the planned
  descent rate; the LR anneal after convergence reaches ``final_lr_ratio`` at the end of the run.
* ``absolute`` (the paper protocol): warm-up of ``warmup_steps``; the penalty aims at T - ε from the start;
  t grows each step by (base LR) · ``scale_t``; the anneal factor is ``anneal`` per step.

In both modes the LR follows a linear warm-up, is constant until every layer's *true* bit-width meets
its target (checked every ``check_every`` steps), and then anneals by one factor per step *while* the
model stays converged: the anneal pauses when the model falls out of the feasible set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..config import JobConfig, ScheduleConfig

# Adam moves a log-parameter by about its LR per step when one gradient sign dominates; a margin over the
# planned rate leaves room for the task gradient pulling back and for weight bits' weaker response at low bits.
_QUANT_LR_HEADROOM = 1.5
# The quantizer LR falls with the planned rate down to this share of its peak, then stays (clip ranges keep learning).
_QUANT_LR_FLOOR = 0.25
# Largest quantizer LR a plan may ask for: a log2-parameter moving more than ~5 % per step jitters the grids
# more than the network can follow. A budget too short for the full descent starts closer to the target
# instead (init bits lowered), so at very short budgets GDNSQ starts near its target like a fixed-bit method.
_QUANT_LR_CAP = 0.05


# The fewest steps a planned descent window should have: _feasible_bits gives it 3 bits to descend (a W2 target
# from a 5-bit start). The quick start's 432-step runs (a 194-step window) meet their gaps to FP at W4A4..W1A1; a
# 110-step run with a 50-step window ended W3.00/A2.50 unconverged (issue 27).
MIN_DESCENT_STEPS = 180


def steps_needed(cfg: ScheduleConfig) -> int:
    """The fewest planned steps whose descent window (warm-up to the earlier descent end) holds MIN_DESCENT_STEPS;
    0 in absolute mode (the paper's knobs are the user's)."""
    if cfg.mode != "planned":
        return 0
    end = min(cfg.descent_end, cfg.descent_end_a or cfg.descent_end)
    return math.ceil(round(MIN_DESCENT_STEPS / (end - cfg.warmup), 6))  # 180 / 0.9 is 200.00000000000003


@dataclass(frozen=True)
class DescentPlan:
    """Concrete schedule constants of one run (derived in planned mode, copied in absolute mode)."""

    planned_steps: int
    init_bits: float  # the bit-width calibration starts at (planned mode may lower it for a short budget)
    warmup_steps: int
    end_step: int  # planned: the step at which every layer's penalty level reaches its target
    anneal: float
    quant_lr: float | None  # None: keep the configured optimizer LR
    planned: bool
    ease: float = 1.0  # planned: the level's progress rate c (see level_fraction)
    end_step_a: int | None = None  # planned: the activations' end step when it differs from end_step

    def progress(self, step: int) -> float:
        """Share of the descent window [warmup_steps, end_step] done at ``step`` (0 before, 1 after)."""
        return min(1.0, max(0.0, (step - self.warmup_steps) / max(1, self.end_step - self.warmup_steps)))

    def level_fraction(self, step: int, end_step: int | None = None) -> float:
        """Share of the way from the target (0) to init_bits (1) at which the penalty aims at ``step``.

        Ease-out, (1 - c·p)**2 with p the window's progress: the high bits, which cost no accuracy, go fast
        and the last bits, where the network must adapt, get the most steps. ``c`` < 1 is set so that at
        p = 1 (``end_step``) the level sits inside the band of bit-widths whose true bits already meet the
        target, so true-bit convergence, the run's "descent ended", lands on end_step; the level then goes
        on to T - ε, a few percent of the window later.
        """
        if not self.planned:
            return 0.0
        end = self.end_step if end_step is None else end_step
        p = max(0.0, (step - self.warmup_steps) / max(1, end - self.warmup_steps))
        return max(0.0, 1.0 - self.ease * p) ** 2

    def level_fraction_a(self, step: int) -> float:
        """level_fraction on the activations' window (schedule.descent_end_a)."""
        return self.level_fraction(step, self.end_step_a)

    def quant_lr_factor(self, step: int) -> float:
        """Planned mode: the quantizer LR follows the planned descent rate, ∝ (1 - progress), floored."""
        if not self.planned:
            return 1.0
        return max(1.0 - self.progress(step), _QUANT_LR_FLOOR)


def planned_steps(cfg: JobConfig, loader, max_steps: int | None = None) -> int:
    """Optimizer steps of the whole run: train.epochs epochs of this loader (capped per epoch)."""
    per_epoch = len(loader) if max_steps is None else min(len(loader), max_steps)
    return max(1, per_epoch * cfg.train.epochs)


def plan_descent(cfg: ScheduleConfig, planned_steps: int, init_bits: float, min_target: float) -> DescentPlan:
    """The run's schedule constants from its planned optimizer steps (epochs × steps per epoch)."""
    n = max(1, int(planned_steps))
    if cfg.mode == "absolute":
        return DescentPlan(n, init_bits, cfg.warmup_steps, cfg.warmup_steps, cfg.anneal, None, planned=False)
    warmup = int(round(cfg.warmup * n))
    end = max(warmup + 1, int(round(cfg.descent_end * n)))
    end_a = None if cfg.descent_end_a is None else max(warmup + 1, int(round(cfg.descent_end_a * n)))
    # The quantizer LR and the feasible span follow the faster of the two descents, so an earlier descent_end_a
    # in a short run lowers every layer's start (one reason it is off by default: docs/results.md, "Decisions").
    window = min(end, end_a or end) - warmup
    start = min(init_bits, min_target + _feasible_bits(window))
    rate = 2.0 * max(start - min_target, 0.0) / window
    anneal = cfg.final_lr_ratio ** (1.0 / max(1, n - end))
    quant_lr = _QUANT_LR_HEADROOM * rate if rate > 0 else None
    return DescentPlan(
        n, start, warmup, end, anneal, quant_lr, planned=True, ease=_ease(start, min_target), end_step_a=end_a
    )


def _feasible_bits(window: int) -> float:
    """The most bits a window can descend: the ease-out level (1 - p)**2 is fastest at its start, 2·ΔB/window
    bits per step, and the quantizer LR (Adam's per-step move of a log-parameter) is capped."""
    return _QUANT_LR_CAP * window / (2.0 * _QUANT_LR_HEADROOM)


def _ease(init_bits: float, target: float) -> float:
    """c of level_fraction: at p = 1 the level is halfway between T and log2(2**T + 1/2), the highest
    continuous bit-width whose grid still rounds to 2**T levels (so its true bits meet the target)."""
    span = init_bits - target
    if span <= 0:
        return 1.0
    inside = 0.5 * math.log2(1.0 + 0.5 / 2.0**target)
    return 1.0 - math.sqrt(min(1.0, inside / span))


def lr_factor(step: int, warmup_steps: int, annealed_steps: int, anneal: float, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step`` (0-based) after ``annealed_steps`` converged steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(anneal**annealed_steps, min_ratio)


def temperature_increment(step: int, warmup_steps: int, base_lr: float, scale_t: float) -> float:
    """Absolute mode: how much t grows after ``step``: 0 in warm-up, base LR · scale_t afterwards."""
    return 0.0 if step < warmup_steps else base_lr * scale_t


# Planned mode's multiplier: t starts at 1 (penalty on the loss's scale) after warm-up and moves by up
# to this many doublings over the descent window per bit of lag, and down by a quarter of that rate when
# no layer lags, so after the descent it settles where the penalty just holds the bits at the target.
_T_DOUBLINGS_PER_WINDOW = 32.0
_T_MIN = 1e-3
_T_MAX_RELEASED = 1e6


def temperature_update(t: float | Tensor, lag_bits: float | Tensor, window: int, t_max: float) -> float | Tensor:
    """Dual-ascent step of the planned mode's multiplier: up while some layer lags its plan, slowly down otherwise,
    within [_T_MIN, t_max] (schedule.max_temperature: a bounded dual keeps the task term in play).

    A tensor ``lag_bits`` (the engine's step: it stays on the device) gives a float64 tensor, the same maths."""
    gain = _T_DOUBLINGS_PER_WINDOW / max(1, window)
    if isinstance(lag_bits, Tensor):
        lag = lag_bits.detach().double()
        exponent = torch.where(lag > 0, lag.clamp(max=1.0) * gain, gain * -0.25)
        return (t * torch.pow(2.0, exponent)).clamp(_T_MIN, t_max)
    t = t * 2.0 ** (gain * (min(lag_bits, 1.0) if lag_bits > 0 else -0.25))
    return min(max(t, _T_MIN), t_max)


def next_noise_ratio(ratio: float, penalty: float, step: float, tol: float = 1e-12) -> float:
    """Lower the extra-noise ratio by ``step`` when the penalty vanished (never below 0)."""
    if penalty <= tol and ratio > 0:
        return max(0.0, round(ratio - step, 10))
    return ratio


@dataclass
class ScheduleState:
    step: int = 0
    temperature: float | Tensor = 0.0  # planned mode: a float64 device tensor once the engine stepped (no host read)
    converged: bool = False  # the latest true-bit check (every check_every steps)
    converged_step: int | None = None  # first step at which the true-bit check passed
    annealed_steps: int = 0  # steps taken while converged (the anneal's exponent)
    noise_ratio: float = 0.0

    def lr_factor(self, cfg: ScheduleConfig, plan: DescentPlan) -> float:
        return lr_factor(self.step, plan.warmup_steps, self.annealed_steps, plan.anneal, cfg.min_lr_ratio)

    def level_fraction(self, plan: DescentPlan) -> tuple[float, float]:
        """(weights', activations') share of the way from target to init_bits at the current step."""
        return plan.level_fraction(self.step), plan.level_fraction_a(self.step)

    def temperature_cap(self, cfg: ScheduleConfig, plan: DescentPlan) -> float:
        """schedule.max_temperature, released while the model has never converged halfway from the planned
        end of the descent to the end of the run: the cap then doubles 16 times over the remaining steps, so a
        short run still ends converged (a run that is not counts as 0). A run that converged once keeps the
        cap: released, a late excursion above the targets met a huge multiplier and ended unconverged."""
        release = (plan.end_step + plan.planned_steps) / 2
        if self.converged_step is not None or self.step < release:
            return cfg.max_temperature
        doublings = 16.0 * (self.step - release) / max(1.0, plan.planned_steps - release)
        return min(cfg.max_temperature * 2.0**doublings, _T_MAX_RELEASED)

    def advance(
        self,
        cfg: ScheduleConfig,
        plan: DescentPlan,
        base_lr: float,
        penalty: float | Tensor,
        lag_bits: float | Tensor,
        check: callable[[], bool] | None = None,
    ) -> None:
        """After an optimizer step with penalty value ``penalty``; ``lag_bits`` = max over layers of
        (bits - planned level); ``check()`` = the true-bit convergence test, called every check_every steps.
        Tensors stay on the device: the host reads ``penalty`` only while the extra noise is on (noise_ratio
        > 0) and the model only in ``check()``, every check_every steps."""
        if self.step >= plan.warmup_steps:
            if plan.planned:
                t = self.temperature
                self.temperature = temperature_update(
                    t if isinstance(t, Tensor) else (t or 1.0),
                    lag_bits,
                    plan.end_step - plan.warmup_steps,
                    self.temperature_cap(cfg, plan),
                )
            else:
                self.temperature += temperature_increment(self.step, plan.warmup_steps, base_lr, cfg.scale_t)
        if check is not None and self.step >= plan.warmup_steps and (self.step + 1) % cfg.check_every == 0:
            self.converged = bool(check())
            if self.converged and self.converged_step is None:
                self.converged_step = self.step + 1
        if self.converged:
            self.annealed_steps += 1
        if self.noise_ratio > 0:
            self.noise_ratio = next_noise_ratio(self.noise_ratio, float(penalty), cfg.noise_step)
        self.step += 1

    def state_dict(self) -> dict:
        """Plain floats (the temperature read from the device: a checkpoint's one host read of it)."""
        return {**asdict(self), "temperature": float(self.temperature)}
