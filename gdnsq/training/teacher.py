"""The in-run FP teacher: plain cross-entropy training when no FP weights are given (model.checkpoint,
model.pretrained). Imports neither Ray nor MLflow nor FFCV."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import evaluate
from .precision import Precision

# Not settings: the teacher has to be good enough to distil from, and a user who wants a better one passes
# model.checkpoint or model.pretrained.
TEACHER_LR = 1e-2  # AdamW's LR (the one-cycle's peak, the plateau rule's start): high for Adam, so a few epochs do
TEACHER_WEIGHT_DECAY = 1e-4  # light regularisation: the teacher trains a few epochs, on a small dataset at most
PLATEAU_MIN_GAIN = 0.1  # points of validation top-1: a smaller gain is noise, not progress
PLATEAU_PATIENCE = 2  # epochs without a gain before the LR drops: one flat epoch alone is noise too
PLATEAU_LR_DROP = 0.3  # the LR's factor at a plateau: two drops take it to 9 % of the start
PLATEAU_DROPS = 3  # the third plateau ends training instead: at 9 % of the start LR more epochs gain little


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
