"""The framework-free train/eval loop. Imports neither Ray nor MLflow nor FFCV.

``Engine`` owns the student (possibly DDP-wrapped), the frozen teacher, the optimizer, the
objective and the schedule state; ``state_dict()`` holds everything a resumed run needs to continue
exactly where it stopped.
"""

from __future__ import annotations

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
    within_targets,
)
from .objective import GDNSQObjective
from .runtime import Precision
from .schedules import DescentPlan, ScheduleState, plan_descent, planned_steps
from .targets import create_targets

# optim.name sgd: Nesterov momentum 0.9, the usual ImageNet CNN setting (timm's and torchvision's recipes).
SGD_MOMENTUM = 0.9

# optim.name auto: RAdam's rectification acts as a warm-up of ~1,000 steps (PITFALLS, "Small datasets"); from
# this many planned steps it is at most a tenth of the run, below it AdamW (under the schedule's own warm-up).
RADAM_MIN_STEPS = 10_000

# train/lag_bits is -inf when no quantizer has learnable bits (zoo methods); a finite floor keeps it loggable.
_LAG_LOG_FLOOR = -99.0


def unwrap(model: nn.Module) -> nn.Module:
    """The engine's core: the plain model inside torch.compile's (``_orig_mod``) and DDP's (``module``) wrappers,
    either order."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def optimizer_name(cfg: OptimConfig, planned_steps: int | None) -> str:
    """optim.name with auto resolved for the run's planned steps (None: not known, taken as a short run)."""
    if cfg.name != "auto":
        return cfg.name
    return "radam" if planned_steps is not None and planned_steps >= RADAM_MIN_STEPS else "adamw"


def create_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    quant: list[nn.Parameter],
    planned_steps: int | None = None,
    foreach: bool = True,
) -> torch.optim.Optimizer:
    """Two groups: network weights (lr, weight decay) and ``quant``, the quantizers' parameters (quant_lr, no
    decay); optim.name auto picks the optimizer for ``planned_steps`` (:func:`optimizer_name`).

    ``foreach``: the multi-tensor update on every device (torch picks it only on CUDA): on the CPU the per-parameter
    loop is Python work per tensor, and a quantized network adds 2-3 small tensors per layer (log_s, log_q, lo).
    AdamW and SGD give the same values bit for bit either way; RAdam's differ in the last bit (its rectification
    term is computed in another order). False: torch's default (the for-loop on the CPU), for comparisons."""
    quant_ids = {id(p) for p in quant}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    groups = [{"params": weights, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"}]
    if quant:
        qlr = cfg.quant_lr or cfg.lr
        groups.append({"params": quant, "lr": qlr, "base_lr": qlr, "weight_decay": 0.0, "name": "quantizers"})
    name = optimizer_name(cfg, planned_steps)
    multi = {"foreach": True} if foreach else {}
    if name == "radam":
        return torch.optim.RAdam(groups, **multi)
    if name == "adamw":
        return torch.optim.AdamW(groups, **multi)
    return torch.optim.SGD(groups, momentum=SGD_MOMENTUM, nesterov=True, **multi)


class Engine:
    """One GDNSQ fine-tuning run's moving parts, stepping and checkpointable."""

    def __init__(
        self,
        cfg: JobConfig,
        student: nn.Module,
        teacher: nn.Module | None,
        device: torch.device,
        precision: Precision,
        planned_steps: int | None = None,
    ):
        self.cfg = cfg
        # Autocast dtype and fp16 loss scaling; modules and batches come in the run's memory format
        # (Precision.prepare_module, Precision.prepare_loaders).
        self.precision = precision
        self.model = student  # may be DDP-wrapped; quantizer maths read the unwrapped core
        self.core = unwrap(student)
        self.teacher = teacher
        self.device = device
        # Every quantizer is told the training progress (a no-op except for curricula / annealing: PEGE, BNN++).
        self.quantizers = list(iter_quantizers(self.core))
        self.quant_params = quantizer_parameters(self.core)  # their own optimizer group, clipped on their own
        self.sched = ScheduleState(noise_ratio=cfg.schedule.noise_ratio)
        set_noise_ratio(self.core, self.sched.noise_ratio)
        set_fused(self.core, cfg.quant.fused)
        self.objective = GDNSQObjective(cfg.objective, init_bits=cfg.quant.init_bits)
        self.targets = create_targets(cfg.quant, self.objective)  # who sets the layers' targets, and when
        self.optimizer = create_optimizer(self.core, cfg.optim, self.quant_params, planned_steps)
        self.plan: DescentPlan | None = None  # fixed on the first epoch, from the planned steps
        self._planned_quant_lr = False
        self.epoch = 0
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------- training
    def train_epoch(
        self, loader: Iterable, max_steps: int | None = None, on_step: Callable[[int, dict], None] | None = None
    ) -> dict[str, float]:
        """One epoch (at most ``max_steps`` steps) over ``loader``, whose batches are on the device in the run's
        memory format (:meth:`Precision.prepare_loaders`); returns the epoch's train/* metrics.

        The steady-state step reads nothing back from the device: the loss parts, the finite check,
        the clip norm and the schedule's temperature stay device tensors (``on_step`` gets them as such), summed
        on the device and read once at the end of the epoch (one batched ``tolist``). Host reads happen only at
        the cadence: every schedule.check_every steps the finite check and the convergence check
        (``is_converged``), the epoch's end, checkpoints (``state_dict``), and each step while
        schedule.noise_ratio > 0."""
        cfg, opt = self.cfg, self.optimizer
        self.model.train()
        sums: dict[str, torch.Tensor] = {}  # the parts' epoch sums, float64 on the device
        finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss since the last check
        steps = 0
        t0 = time.perf_counter()
        samples = 0
        plan = self._ensure_plan(loader, max_steps)
        total = planned_steps(cfg, loader, max_steps)  # this call's: the quantizers' progress
        for x, y in loader:
            if max_steps is not None and steps >= max_steps:
                break
            self.targets.start(self.core, x, y, self.sched.step)
            factor = self.sched.lr_factor(cfg.schedule, plan)
            for q in self.quantizers:
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
            finite &= torch.isfinite(loss.detach())
            if (self.sched.step + 1) % cfg.schedule.check_every == 0:  # the cadence: a NaN raises check_every late
                self._raise_unless_finite(bool(finite))
            opt.zero_grad(set_to_none=True)
            self.precision.backward(loss)
            if cfg.optim.quant_grad_clip and self.quant_params:
                self.precision.unscale_(opt)  # clip true gradients, not fp16-scaled ones
                # Second line behind the level guard: one spike (a dead layer before a train-mode BatchNorm
                # sends ~1e7) would otherwise sit in Adam's second moment and freeze that quantizer.
                parts["train/quant_grad_norm"] = torch.nn.utils.clip_grad_norm_(
                    self.quant_params, cfg.optim.quant_grad_clip
                ).detach()
            self.precision.step(opt)
            if cfg.quant.level_guard:
                keep_levels_(self.core, cfg.quant.level_margin, *self.targets.guard_floors())
            penalty = parts["train/penalty_w"] + parts["train/penalty_a"]
            old_noise = self.sched.noise_ratio
            lag = self.objective.last_terms.lag
            self.sched.advance(
                cfg.schedule,
                plan,
                base_lr=cfg.optim.lr,
                penalty=penalty,
                lag_bits=lag,
                check=self.is_converged,
            )
            self.targets.after_step(self.core, self.sched.converged_step)
            if self.sched.noise_ratio != old_noise:
                set_noise_ratio(self.core, self.sched.noise_ratio)
            parts["train/loss"] = loss.detach()
            parts["train/lag_bits"] = lag.clamp_min(_LAG_LOG_FLOOR)
            for k, v in parts.items():
                if k not in sums:
                    sums[k] = torch.zeros((), dtype=torch.float64, device=self.device)
                sums[k].add_(v)
            # the schedule's figures for on_step; the epoch reports their last values, not means
            parts.update({"train/temperature": self.sched.temperature, "train/lr": cfg.optim.lr * factor})
            steps += 1
            samples += y.numel()
            if on_step is not None:
                on_step(self.sched.step, parts)
        if steps == 0:
            raise ValueError("training loader yielded no batches")
        # the epoch's one read of the device: the sums, the finite flag and the temperature, batched
        keys = list(sums)
        temperature = torch.as_tensor(self.sched.temperature, dtype=torch.float64, device=self.device)
        *values, all_finite, temperature = torch.stack([*sums.values(), finite.double(), temperature]).tolist()
        self._raise_unless_finite(all_finite)
        if cfg.quant.hold_targets and self.sched.converged_step is not None and not self.is_converged():
            # The descent had ended but the epoch ends outside the targets: the grids go back to them (the
            # penalty alone may not bring them back, see docs/method.md), so the epoch's checkpoint is
            # feasible and the anneal goes on. Only here: within the epoch the penalty gets its chance first.
            cap_levels_(self.core, cfg.quant.level_margin)
            self.sched.converged = self.is_converged()
        self.epoch += 1
        out = {k: v / steps for k, v in zip(keys, values)}
        # The last step's schedule values, not their epoch means, describe where the run stands.
        out.update(
            {
                "train/temperature": temperature,
                "train/lr": cfg.optim.lr * factor,
                "train/steps": float(steps),
                "train/samples_per_s": samples / (time.perf_counter() - t0),
                "train/noise_ratio": self.sched.noise_ratio,
                "train/global_step": float(self.sched.step),
            }
        )
        return out

    def _raise_unless_finite(self, all_finite: bool | float) -> None:
        if not all_finite:
            raise FloatingPointError(f"the loss was not finite at a step up to {self.sched.step}; lower optim.lr")

    def _ensure_plan(self, loader: Iterable, max_steps: int | None) -> DescentPlan:
        """The run's schedule constants, fixed on the first epoch from the planned steps of its loader, for the
        width the targets strategy plans the descent for; planned mode also sets the quantizer group's LR unless
        configured."""
        if self.plan is None:
            steps = planned_steps(self.cfg, loader, max_steps)
            target = self.targets.plan_target(self.core, self.cfg.quant.init_bits)
            self.plan = plan_descent(self.cfg.schedule, steps, self.cfg.quant.init_bits, target)
            self.objective.init_bits = self.plan.init_bits
            # Only learnable bits descend; fixed-bit (zoo) quantizers keep the configured LR.
            descends = any(q.learnable_bits for q in self.quantizers)
            if self.plan.quant_lr is not None and self.cfg.optim.quant_lr is None and descends:
                self._planned_quant_lr = True
                for g in self.optimizer.param_groups:
                    if g.get("name") == "quantizers":
                        g["base_lr"] = self.plan.quant_lr
        return self.plan

    def is_converged(self) -> bool:
        """Every layer within its target, no dead grid, and (budget) the true aggregate within the budget."""
        return within_targets(self.core) and self.targets.within(self.core)

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
