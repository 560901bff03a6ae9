"""The framework-free train/eval loop. Imports neither Ray nor MLflow nor FFCV.

``Engine`` owns the student (possibly DDP-wrapped), the frozen teacher, the optimizer, the
objective and the schedule state; ``state_dict()`` holds everything a resumed run needs to continue
exactly where it stopped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
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
from .runtime import all_reduce_sum, broadcast_module, unwrap
from .schedules import DescentPlan, ScheduleState, plan_descent
from .targets import create_targets

# optim.name sgd: Nesterov momentum 0.9, the usual ImageNet CNN setting (timm's and torchvision's recipes).
SGD_MOMENTUM = 0.9

# The in-run FP teacher (train_fp), trained only when no FP weights are given. Not settings: it has to be good
# enough to distil from, and a user who wants a better one passes model.checkpoint or model.pretrained.
TEACHER_LR = 1e-2  # AdamW's LR (the one-cycle's peak, the plateau rule's start): high for Adam, so a few epochs do
TEACHER_WEIGHT_DECAY = 1e-4  # light regularisation: the teacher trains a few epochs, on a small dataset at most
PLATEAU_MIN_GAIN = 0.1  # points of validation top-1: a smaller gain is noise, not progress
PLATEAU_PATIENCE = 2  # epochs without a gain before the LR drops: one flat epoch alone is noise too
PLATEAU_LR_DROP = 0.3  # the LR's factor at a plateau: two drops take it to 9 % of the start
PLATEAU_DROPS = 3  # the third plateau ends training instead: at 9 % of the start LR more epochs gain little

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


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, precision: Precision | None = None
) -> dict[str, float]:
    """Top-1 / top-5 (%) and cross-entropy over a loader, in eval mode (exact integer grid),
    under ``precision``'s autocast and memory format (fp32 when None)."""
    precision = precision or Precision(device.type)
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = precision.prepare_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(-1).sum())
        total += y.numel()
    model.train(was_training)
    counts = torch.tensor([correct1, correct5, total, loss_sum], dtype=torch.float64, device=device)
    all_reduce_sum(counts)  # sharded val loaders: every rank must see the same metrics (early stopping)
    correct1, correct5, total, loss_sum = counts.tolist()
    if total == 0:
        raise ValueError("evaluation loader yielded no samples")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: list[torch.Tensor], precision: Precision | None = None) -> None:
    """Recompute every BatchNorm's running mean and variance as plain averages over ``batches``, through the
    eval-mode (exact grid, no dither) forward. Under DDP rank 0's statistics go to every rank (as calibration
    does), so every rank evaluates and checkpoints the same model.

    Why: the running averages are an EMA over the last few hundred training steps, each with other rounded
    weights and with the training forward's dither; at 1-2 bits that mix can be several points of top-1 away
    from the network actually evaluated (Nagel et al. 2022, "Overcoming oscillations in QAT")."""
    if not batches:
        raise ValueError("BatchNorm re-estimation got no batches")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    precision = precision or Precision(next(model.parameters()).device.type)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for x in batches:
            with precision.autocast():
                model(precision.prepare_input(x))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    for m in norms:
        broadcast_module(m)


def train_fp(
    model: nn.Module,
    loader: Iterable,
    epochs: int | None,
    *,
    device: torch.device,
    lr: float = TEACHER_LR,
    log: Callable[[str], None] = print,
    val_loader: Iterable | None = None,
    max_epochs: int = 30,
    precision: Precision | None = None,
) -> dict:
    """Plain cross-entropy training of the FP teacher (used when no FP weights are given).

    ``epochs`` set: that many epochs under a one-cycle LR. ``epochs`` None: train until the validation
    top-1 plateaus (PLATEAU_PATIENCE epochs without a PLATEAU_MIN_GAIN-point gain drop the LR ×PLATEAU_LR_DROP;
    plateau number PLATEAU_DROPS ends it), at most ``max_epochs``, and keep the best validation state.
    Returns {rule, epochs, plateaued}.
    Forward passes under ``precision`` (fp32 when None).
    """
    precision = precision or Precision(device.type)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=TEACHER_WEIGHT_DECAY)
    plateau = epochs is None and val_loader is not None
    n_epochs = max_epochs if plateau else (epochs or 1)
    sched = (
        None
        if plateau
        else torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, n_epochs * len(loader)))
    )
    best, best_state, stale, drops, done = -1.0, None, 0, 0, 0
    for epoch in range(n_epochs):
        model.train()
        for x, y in loader:
            x, y = precision.prepare_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            precision.backward_step(loss, opt)
            if sched is not None:
                sched.step()
        done = epoch + 1
        if not plateau:
            log(f"teacher epoch {done}/{n_epochs}: loss {loss.item():.4f}")
            continue
        top1 = evaluate(model, val_loader, device, precision)["top1"]
        log(f"teacher epoch {done} (cap {n_epochs}): loss {loss.item():.4f}, val top-1 {top1:.2f}")
        if top1 > best + PLATEAU_MIN_GAIN:
            best, best_state, stale = top1, copy.deepcopy(model.state_dict()), 0
            continue
        stale += 1
        if stale >= PLATEAU_PATIENCE:
            drops, stale = drops + 1, 0
            if drops == PLATEAU_DROPS:
                break
            for g in opt.param_groups:
                g["lr"] *= PLATEAU_LR_DROP
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"rule": "plateau" if plateau else "fixed", "epochs": done, "plateaued": plateau and drops == PLATEAU_DROPS}


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
