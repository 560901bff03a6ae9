"""The framework-free train/eval loop. Imports neither Ray nor MLflow nor FFCV.

``Engine`` owns the student (possibly DDP-wrapped), the frozen teacher, the optimizer, the
objective and the schedule state; ``state_dict()`` holds everything a resumed run needs to continue
exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..config import JobConfig, OptimConfig
from ..quant.layers import (
    cap_levels_,
    iter_quantizers,
    keep_levels_,
    quantizer_parameters,
    set_fused,
    set_noise_ratio,
)
from .objective import GDNSQObjective, converged
from .precision import Precision
from .runtime import unwrap
from .schedules import DescentPlan, ScheduleState, plan_descent
from .targets import create_targets

# optim.name sgd: Nesterov momentum 0.9, the usual ImageNet CNN setting (timm's and torchvision's recipes).
SGD_MOMENTUM = 0.9

# train/lag_bits is -inf when no quantizer has learnable bits (zoo methods); a finite floor keeps it loggable.
_LAG_LOG_FLOOR = -99.0


def planned_steps(cfg: JobConfig, loader, max_steps: int | None = None) -> int:
    """Optimizer steps of the whole run: train.epochs epochs of this loader (capped per epoch)."""
    per_epoch = len(loader) if max_steps is None else min(len(loader), max_steps)
    return max(1, per_epoch * cfg.train.epochs)


def create_plan(cfg: JobConfig, model: nn.Module, steps: int) -> DescentPlan:
    """The run's schedule constants (schedules.plan_descent) for the target the run's targets strategy plans
    for (training.targets: the smallest layer target, or a budget's uniform width)."""
    target = create_targets(cfg.quant).plan_target(unwrap(model), cfg.quant.init_bits)
    return plan_descent(cfg.schedule, steps, cfg.quant.init_bits, target)


def create_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Two groups: network weights (lr, weight decay) and quantizer parameters (quant_lr, no decay)."""
    quant = quantizer_parameters(model)
    quant_ids = {id(p) for p in quant}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    groups = [{"params": weights, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"}]
    if quant:
        qlr = cfg.quant_lr or cfg.lr
        groups.append({"params": quant, "lr": qlr, "base_lr": qlr, "weight_decay": 0.0, "name": "quantizers"})
    if cfg.name == "radam":
        return torch.optim.RAdam(groups)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=SGD_MOMENTUM, nesterov=True)


class Engine:
    """One GDNSQ fine-tuning run's moving parts, stepping and checkpointable."""

    def __init__(
        self,
        cfg: JobConfig,
        student: nn.Module,
        teacher: nn.Module | None,
        device: torch.device,
        precision: Precision | None = None,
    ):
        self.cfg = cfg
        # Autocast dtype, memory format, fp16 loss scaling (modules are put in their format by the caller).
        self.precision = precision or Precision.create(cfg.train, device)
        self.model = student  # may be DDP-wrapped; quantizer maths read the unwrapped core
        self.core = unwrap(student)
        self.teacher = teacher
        self.device = device
        self.optimizer = create_optimizer(self.core, cfg.optim)
        self.objective = GDNSQObjective(cfg.objective, init_bits=cfg.quant.init_bits)
        self.sched = ScheduleState(noise_ratio=cfg.schedule.noise_ratio)
        self.plan: DescentPlan | None = None  # fixed on the first epoch, from the planned steps
        self._planned_quant_lr = False
        self.targets = create_targets(cfg.quant, self.objective)  # who sets the layers' targets, and when
        set_noise_ratio(self.core, self.sched.noise_ratio)
        set_fused(self.core, cfg.quant.fused)
        # Quantizers are told the training progress (a no-op except for curricula / annealing: PEGE, BNN++).
        self._progress_hooks = list(iter_quantizers(self.core))
        self.epoch = 0
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------- training
    def train_epoch(
        self, loader: Iterable, max_steps: int | None = None, on_step: Callable[[int, dict], None] | None = None
    ) -> dict[str, float]:
        cfg, opt = self.cfg, self.optimizer
        self.model.train()
        sums: dict[str, float] = {}
        steps = 0
        t0 = time.perf_counter()
        samples = 0
        total = self._planned_steps(loader, max_steps)
        plan = self._ensure_plan(total)
        quant_params = quantizer_parameters(self.core)
        for x, y in loader:
            if max_steps is not None and steps >= max_steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = self.precision.prepare_input(x)
            self.targets.start(self.core, x, y, self.sched.step)
            factor = self.sched.lr_factor(cfg.schedule, plan)
            for q in self._progress_hooks:
                q.set_progress(min(1.0, self.sched.step / total))
            quant_factor = plan.quant_lr_factor(self.sched.step) if self._planned_quant_lr else 1.0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor * (quant_factor if g.get("name") == "quantizers" else 1.0)
            teacher_logits = None
            with self.precision.autocast():  # convs and matmuls only: quantizers run in fp32 (quant.layers)
                if cfg.objective.distill != "ce":
                    with torch.no_grad():
                        teacher_logits = self.teacher(x).float()
                logits = self.model(x).float()
            loss, parts = self.objective(
                self.core,
                logits,
                teacher_logits,
                y,
                self.sched.temperature,
                level_fraction=self.sched.level_fraction(plan),
            )
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {float(loss)} at step {self.sched.step}; lower optim.lr")
            opt.zero_grad(set_to_none=True)
            self.precision.backward(loss)
            if cfg.optim.quant_grad_clip and quant_params:
                self.precision.unscale_(opt)  # clip true gradients, not fp16-scaled ones
                # Second line behind the level guard: one spike (a dead layer before a train-mode BatchNorm
                # sends ~1e7) would otherwise sit in Adam's second moment and freeze that quantizer.
                parts["train/quant_grad_norm"] = float(
                    torch.nn.utils.clip_grad_norm_(quant_params, cfg.optim.quant_grad_clip)
                )
            self.precision.step(opt)
            if cfg.quant.level_guard:
                keep_levels_(self.core, cfg.quant.level_margin, *self.targets.guard_floors())
            penalty = parts["train/penalty_w"] + parts["train/penalty_a"]
            old_noise = self.sched.noise_ratio
            self.sched.advance(
                cfg.schedule,
                plan,
                base_lr=cfg.optim.lr,
                penalty=penalty,
                lag_bits=self.objective.last_terms.lag,
                check=self.is_converged,
            )
            self.targets.after_step(self.core, self.sched.converged_step)
            if self.sched.noise_ratio != old_noise:
                set_noise_ratio(self.core, self.sched.noise_ratio)
            parts.update(
                {
                    "train/loss": loss.item(),
                    "train/temperature": self.sched.temperature,
                    "train/lr": cfg.optim.lr * factor,
                    "train/lag_bits": max(_LAG_LOG_FLOOR, self.objective.last_terms.lag),
                }
            )
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
            samples += y.numel()
            if on_step is not None:
                on_step(self.sched.step, parts)
        if steps == 0:
            raise ValueError("training loader yielded no batches")
        if cfg.quant.hold_targets and self.sched.converged_step is not None and not self.is_converged():
            # The descent had ended but the epoch ends outside the targets: the grids go back to them (the
            # penalty alone may not bring them back, see docs/method.md), so the epoch's checkpoint is
            # feasible and the anneal goes on. Only here: within the epoch the penalty gets its chance first.
            cap_levels_(self.core, cfg.quant.level_margin)
            self.sched.converged = self.is_converged()
        self.epoch += 1
        out = {k: v / steps for k, v in sums.items()}
        # The last step's schedule values, not their epoch means, describe where the run stands.
        out.update(
            {
                "train/temperature": self.sched.temperature,
                "train/lr": cfg.optim.lr * factor,
                "train/steps": float(steps),
                "train/samples_per_s": samples / (time.perf_counter() - t0),
                "train/noise_ratio": self.sched.noise_ratio,
                "train/global_step": float(self.sched.step),
            }
        )
        return out

    def _planned_steps(self, loader, max_steps: int | None) -> int:
        return planned_steps(self.cfg, loader, max_steps)

    def _ensure_plan(self, planned_steps: int) -> DescentPlan:
        """The run's schedule constants; planned mode also sets the quantizer group's LR unless configured."""
        if self.plan is None:
            self.plan = create_plan(self.cfg, self.core, planned_steps)
            self.objective.init_bits = self.plan.init_bits
            # Only learnable bits descend; fixed-bit (zoo) quantizers keep the configured LR.
            descends = any(q.learnable_bits for q in iter_quantizers(self.core))
            if self.plan.quant_lr is not None and self.cfg.optim.quant_lr is None and descends:
                self._planned_quant_lr = True
                for g in self.optimizer.param_groups:
                    if g.get("name") == "quantizers":
                        g["base_lr"] = self.plan.quant_lr
        return self.plan

    def is_converged(self) -> bool:
        """Every layer within its target, no dead grid, and (budget) the true aggregate within the budget."""
        return converged(self.core) and self.targets.within(self.core)

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.sched.state_dict(),
            "objective": self.objective.state_dict(),
            "epoch": self.epoch,
            "rng": {"torch": torch.get_rng_state()},
            **self.precision.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sched = ScheduleState(**state["schedule"])
        self.targets.resume(self.sched.converged_step)
        set_noise_ratio(self.core, self.sched.noise_ratio)
        self.objective.load_state_dict(state["objective"])
        self.epoch = state["epoch"]
        self.precision.load_state_dict(state)
        torch.set_rng_state(state["rng"]["torch"])
