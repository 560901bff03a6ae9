"""GDNSQ objective: distillation (or task) loss + exterior-point bit-width penalty (METHOD.md section 2).

    L = l2 · D(student, teacher) + l1 · t · m̄ · (ω_w · P_w + ω_a · P_a)        (standard)
    L = l2 · t · D(student, teacher) + l1 · m̄ · (ω_w · P_w + ω_a · P_a)        (lossless)

P_w = mean over weight-quantized layers of mean_c max(0, b_c - (L_w - ε))^p (per-channel b_c);
P_a likewise over activation quantizers. The level L is the layer's target T in the paper protocol; the
planned schedule moves it from init_bits down to T along the run (L = T + (init_bits - T)·f, f: 1 → 0).
m̄ is a running mean of D (so the penalty has the loss's scale): an EMA, or the reference's cumulative mean
since step 0; ω_w, ω_a weigh the two families by their share of active (violated) constraints, counted
per layer, or as in the reference per weight channel (activations then descend after the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ObjectiveConfig
from ..quant.layers import iter_quantized, iter_quantizers


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) between the softmaxes of two (N, C) logit tensors, batch-mean."""
    log_p, log_q = F.log_softmax(p_logits, dim=-1), F.log_softmax(q_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def jeffreys_divergence(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Symmetric KL: KL(p_t || p_s) + KL(p_s || p_t) = Σ (p_t - p_s)(log p_t - log p_s), batch-mean."""
    log_s, log_t = F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
    return ((log_t.exp() - log_s.exp()) * (log_t - log_s)).sum(-1).mean()


def task_loss(kind: str, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor) -> Tensor:
    if kind == "jeffreys":
        return jeffreys_divergence(student_logits, teacher_logits)
    if kind == "kl":
        return kl_divergence(teacher_logits, student_logits)
    return F.cross_entropy(student_logits, targets)


def exterior_penalty(bits: Tensor, target: float | Tensor, eps: float, p: float) -> Tensor:
    """mean(max(0, bits - (target - eps)) ** p): zero inside the feasible set, growing outside."""
    return torch.clamp(bits - (target - eps), min=0).pow(p).mean()


@dataclass
class BitTerms:
    p_w: Tensor
    p_a: Tensor
    active_w: int
    active_a: int
    n_w: int
    n_a: int
    lag: float  # max over layers of (bits - level), the largest channel's bits for weights; -inf if none


def _level(target: Tensor, level_fraction: float, init_bits: float | None) -> Tensor | float:
    """The bit level a layer's penalty aims at: its target, raised toward init_bits by ``level_fraction``."""
    if not level_fraction or init_bits is None:
        return target
    return target + (init_bits - target).clamp_min(0) * level_fraction


def bit_penalties(
    model: nn.Module,
    eps: float,
    p: float,
    *,
    level_fraction: float = 0.0,
    init_bits: float | None = None,
    count: str = "layers",
    level_fraction_a: float | None = None,
) -> BitTerms:
    """P_w, P_a, the number of active (violated) constraints (``count``: per layer, or per weight channel)
    and the largest lag behind the levels, over every learnable-bit quantizer. ``level_fraction_a``: the
    activations' own (schedule.descent_end_a), else ``level_fraction``."""
    frac_a = level_fraction if level_fraction_a is None else level_fraction_a
    pw, pa = [], []
    active_w = active_a = 0
    lag = -math.inf
    for _, layer in iter_quantized(model):
        if layer.weight_quant.learnable_bits:
            bits, level = layer.weight_bits(), _level(layer.target_w, level_fraction, init_bits)
            term = exterior_penalty(bits, level, eps, p)
            pw.append(term)
            if count == "channels":
                active_w += int((bits.detach() > level - eps).sum())
            else:
                active_w += int(term.detach() > 0)
            lag = max(lag, float(bits.detach().max() - level))
        if layer.act_quant is not None and layer.act_quant.learnable_bits:
            bits, level = layer.act_bits(), _level(layer.target_a, frac_a, init_bits)
            term = exterior_penalty(bits, level, eps, p)
            pa.append(term)
            active_a += int(term.detach() > 0)
            lag = max(lag, float(bits.detach() - level))
    zero = next(model.parameters()).new_zeros(())
    return BitTerms(
        torch.stack(pw).mean() if pw else zero,
        torch.stack(pa).mean() if pa else zero,
        active_w,
        active_a,
        len(pw),
        len(pa),
        lag,
    )


def add_budget(terms: BitTerms, bt) -> BitTerms:
    """The per-layer terms (upper bounds) plus a budget's aggregate terms, counted as one constraint each."""
    return BitTerms(
        terms.p_w + bt.p_w,
        terms.p_a + bt.p_a,
        terms.active_w + int(float(bt.p_w.detach()) > 0),
        terms.active_a + int(float(bt.p_a.detach()) > 0),
        terms.n_w + 1,
        terms.n_a + int(bt.p_a.requires_grad),
        max(terms.lag, bt.lag),
    )


def extra_losses(model: nn.Module) -> Tensor | None:
    """Sum of the quantizers' ``extra_loss()`` terms (zoo methods: PEGE, PACT, CoDeQ), or None when none has one."""
    terms = [t for q in iter_quantizers(model) if (t := q.extra_loss()) is not None]
    return torch.stack(terms).sum() if terms else None


class GDNSQObjective:
    """Stateful only in the running loss mean m̄ (part of checkpoints via state_dict)."""

    def __init__(self, cfg: ObjectiveConfig, init_bits: float | None = None, budget=None):
        self.cfg = cfg
        self.init_bits = init_bits
        self.budget = budget  # training.budget.Budget: the penalty also acts on the model-wide aggregate
        self.loss_mean: float | None = None
        self.loss_sum, self.loss_count = 0.0, 0
        self.last_terms: BitTerms | None = None

    def state_dict(self) -> dict:
        return {"loss_mean": self.loss_mean, "loss_sum": self.loss_sum, "loss_count": self.loss_count}

    def load_state_dict(self, state: dict) -> None:
        self.loss_mean = state["loss_mean"]
        self.loss_sum, self.loss_count = state.get("loss_sum", 0.0), state.get("loss_count", 0)

    def _update_loss_mean(self, d_val: float) -> float:
        c = self.cfg
        self.loss_sum, self.loss_count = self.loss_sum + d_val, self.loss_count + 1
        if c.loss_scale == "cumulative":
            self.loss_mean = self.loss_sum / self.loss_count
        else:
            self.loss_mean = d_val if self.loss_mean is None else c.loss_ema * self.loss_mean + (1 - c.loss_ema) * d_val
        return self.loss_mean

    def __call__(
        self,
        model: nn.Module,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        targets: Tensor,
        temperature: float,
        level_fraction: float | tuple[float, float] = 0.0,
    ) -> tuple[Tensor, dict[str, float]]:
        c = self.cfg
        d = task_loss(c.distill, student_logits, teacher_logits, targets)
        d_val = float(d.detach())
        self._update_loss_mean(d_val)
        # (weights', activations') level fractions; one number is both
        frac_w, frac_a = level_fraction if isinstance(level_fraction, tuple) else (level_fraction, level_fraction)
        terms = bit_penalties(
            model,
            c.eps,
            c.p,
            level_fraction=frac_w,
            init_bits=self.init_bits,
            count=c.count_active,
            level_fraction_a=frac_a,
        )
        if self.budget is not None:
            terms = add_budget(terms, self.budget.penalties(model, c.eps, c.p, frac_w, self.init_bits, frac_a))
        self.last_terms = terms
        total_active = terms.active_w + terms.active_a
        w_w = (terms.active_w + c.eps) / (total_active + c.eps)
        w_a = (terms.active_a + c.eps) / (total_active + c.eps)
        penalty = self.loss_mean * (w_w * terms.p_w + w_a * terms.p_a)
        if c.lossless:
            loss = c.task_weight * temperature * d + c.penalty_weight * penalty
        else:
            loss = c.task_weight * d + c.penalty_weight * temperature * penalty
        parts = {
            "train/task": d_val,
            "train/penalty_w": float(terms.p_w.detach()),
            "train/penalty_a": float(terms.p_a.detach()),
            "train/active_w": terms.active_w,
            "train/active_a": terms.active_a,
            "train/loss_mean": self.loss_mean,
        }
        extra = extra_losses(model)
        if extra is not None:
            loss = loss + extra
            parts["train/extra_loss"] = float(extra.detach())
        return loss, parts


def ns_top1(top1: float, is_converged: bool) -> float:
    """Only converged models count: top-1 if converged, else 0."""
    return top1 * float(is_converged)
