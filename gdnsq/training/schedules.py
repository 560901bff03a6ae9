"""Schedules as pure functions of the step, plus the small state the engine carries between steps.

* LR: linear warm-up over ``warmup_steps``, constant until the model converges, then an exponential
  anneal per step (floored at ``min_lr_ratio``).
* Temperature t: 0 during warm-up, then grows each step by (current LR) · scale_t.
* Noise ratio: lowered by ``noise_step`` whenever the penalty is ~0, down to 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ScheduleConfig


def lr_factor(step: int, warmup_steps: int, converged_step: int | None, anneal: float,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if converged_step is None or step <= converged_step:
        return 1.0
    return max(anneal ** (step - converged_step), min_ratio)


def temperature_increment(step: int, warmup_steps: int, lr: float, scale_t: float) -> float:
    """How much t grows after ``step``: 0 in warm-up, lr · scale_t afterwards."""
    return 0.0 if step < warmup_steps else lr * scale_t


def next_noise_ratio(ratio: float, penalty: float, step: float, tol: float = 1e-12) -> float:
    """Lower the extra-noise ratio by ``step`` when the penalty vanished (never below 0)."""
    if penalty <= tol and ratio > 0:
        return max(0.0, round(ratio - step, 10))
    return ratio


@dataclass
class ScheduleState:
    step: int = 0
    temperature: float = 0.0
    converged_step: int | None = None
    noise_ratio: float = 0.0

    def lr_factor(self, cfg: ScheduleConfig) -> float:
        return lr_factor(self.step, cfg.warmup_steps, self.converged_step, cfg.anneal, cfg.min_lr_ratio)

    def advance(self, cfg: ScheduleConfig, lr: float, penalty: float) -> None:
        """After an optimizer step taken at LR ``lr`` with penalty value ``penalty``."""
        self.temperature += temperature_increment(self.step, cfg.warmup_steps, lr, cfg.scale_t)
        if penalty <= 0.0 and self.converged_step is None and self.step >= cfg.warmup_steps:
            # P = 0 means every continuous bit-width <= target - eps, hence true bits <= target.
            self.converged_step = self.step
        self.noise_ratio = next_noise_ratio(self.noise_ratio, penalty, cfg.noise_step)
        self.step += 1

    def state_dict(self) -> dict:
        return asdict(self)
