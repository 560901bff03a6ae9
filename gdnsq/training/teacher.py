"""The FP teacher a job distils from: created with its FP weights (model.checkpoint, model.pretrained), resumed,
or trained in-run with plain cross-entropy when none are given. Imports neither Ray nor MLflow nor FFCV."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JobConfig
from ..data.loaders import Loaders
from .evaluation import evaluate
from .models import create_model, has_fp_weights
from .runtime import Precision, broadcast_module, seed_everything

logger = logging.getLogger("gdnsq")

# Not settings: the teacher has to be good enough to distil from, and a user who wants a better one passes
# model.checkpoint or model.pretrained.
TEACHER_LR = 1e-2  # AdamW's LR (the one-cycle's peak, the plateau rule's start): high for Adam, so a few epochs do
TEACHER_WEIGHT_DECAY = 1e-4  # light regularisation: the teacher trains a few epochs, on a small dataset at most
PLATEAU_MIN_GAIN = 0.1  # points of validation top-1: a smaller gain is noise, not progress
PLATEAU_PATIENCE = 2  # epochs without a gain before the LR drops: one flat epoch alone is noise too
PLATEAU_LR_DROP = 0.3  # the LR's factor at a plateau: two drops take it to 9 % of the start
PLATEAU_DROPS = 3  # the third plateau ends training instead: at 9 % of the start LR more epochs gain little
# The plateau rule counts epochs; on a small dataset its epochs are a few steps each, and max_epochs of them leave
# the LR high when it stops (1k images at batch 128: 30 epochs are 210 steps, and the teacher stalled at 84 % val
# top-1 where a one-cycle over 420 steps reached 95 %, issue 27). Below this many steps in max_epochs, the teacher
# trains this many steps under a one-cycle LR instead.
SHORT_BUDGET_STEPS = 1000


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

    ``epochs`` set: that many epochs under a one-cycle LR. ``epochs`` None and fewer than SHORT_BUDGET_STEPS steps
    in ``max_epochs``: a one-cycle over SHORT_BUDGET_STEPS steps. Otherwise: train until the validation
    top-1 plateaus (PLATEAU_PATIENCE epochs without a PLATEAU_MIN_GAIN-point gain drop the LR ×PLATEAU_LR_DROP;
    plateau number PLATEAU_DROPS ends it), at most ``max_epochs``, and keep the best validation state.
    Returns {rule, epochs, plateaued}.
    Batches come on ``device`` in the run's memory format (:meth:`Precision.prepare_loaders`); forward passes under
    ``precision`` (fp32 when None).
    """
    precision = precision or Precision(device)
    if epochs is None and len(loader) * max_epochs < SHORT_BUDGET_STEPS:
        epochs = math.ceil(SHORT_BUDGET_STEPS / max(1, len(loader)))
        log(f"teacher: {len(loader)} steps an epoch, {epochs} epochs under a one-cycle LR ({SHORT_BUDGET_STEPS} steps)")
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


def prepare_teacher(
    cfg: JobConfig,
    loaders: Loaders,
    device: torch.device,
    resume: dict | None,
    precision: Precision | None = None,
    *,
    model: nn.Module | None = None,
    fp_weights: bool | None = None,
) -> tuple[nn.Module, dict]:
    """The frozen FP teacher (in ``precision``'s memory format) and a report of how it was obtained (trained in-run:
    epochs, whether it plateaued). ``model``: the FP model to use (default: model.* of ``cfg``); ``fp_weights``:
    whether its weights are trained (default: model.checkpoint / model.pretrained)."""
    if model is None:
        model = create_model(
            cfg.model, num_classes=loaders.num_classes, in_chans=loaders.in_chans, load_weights=resume is None
        )
        fp_weights = has_fp_weights(cfg.model)
        source = "checkpoint" if cfg.model.checkpoint else "pretrained" if cfg.model.pretrained else "trained-in-run"
    else:
        source = "given" if fp_weights else "trained-in-run"
    teacher = model.to(device)
    report: dict = {"source": source}
    if resume is not None:
        teacher.load_state_dict(resume["teacher"])
        report.update(resume.get("teacher_report", {}))
    elif not fp_weights:
        epochs = cfg.train.teacher_epochs
        # Without train.teacher_epochs, train_fp picks the rule from the step budget and says which.
        logger.info(
            "no FP weights given: training the FP teacher %s",
            f"for {epochs} epochs"
            if epochs
            else f"(a one-cycle LR over {SHORT_BUDGET_STEPS} steps when {cfg.train.teacher_max_epochs} epochs are "
            f"fewer, else to a validation plateau)",
        )
        seed_everything(cfg.train.seed)
        report.update(
            train_fp(
                teacher,
                loaders.calib,
                epochs,
                device=device,
                log=logger.info,
                val_loader=loaders.val,
                max_epochs=cfg.train.teacher_max_epochs,
                precision=precision,
            )
        )
        broadcast_module(teacher)  # every rank distils from the same teacher
        if report["rule"] == "plateau" and not report["plateaued"]:
            logger.warning(
                "the FP teacher was still improving when it hit train.teacher_max_epochs=%d: raise "
                "train.teacher_max_epochs or pass model.checkpoint / model.pretrained",
                cfg.train.teacher_max_epochs,
            )
    if precision is not None:
        precision.prepare_module(teacher)
    return teacher.eval().requires_grad_(False), report
