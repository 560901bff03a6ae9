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
from ..quant import functional as QF
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
    """Device tensors, so that the step reads nothing back to the host (counts int64, lag float32)."""

    p_w: Tensor
    p_a: Tensor
    active_w: Tensor
    active_a: Tensor
    n_w: int
    n_a: int
    lag: Tensor  # max over layers of (bits - level), the largest channel's bits for weights; -inf if none


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
    activations' own (schedule.descent_end_a), else ``level_fraction``.

    All layers at once: their bits, targets and levels side by side in flat tensors (one entry per weight channel,
    one per input), so the op count does not grow with the layers (but for a range per weight, cached from the
    forward) and nothing is read back to the host."""
    frac_a = level_fraction if level_fraction_a is None else level_fraction_a
    layers = [layer for _, layer in iter_quantized(model)]
    weights = [l for l in layers if l.weight_quant.learnable_bits]
    acts = [l for l in layers if l.act_quant is not None and l.act_quant.learnable_bits]
    zero = next(model.parameters()).new_zeros(())
    p_w, active_w, lag_w = zero, zero.long(), None
    if weights:
        ranges = [l.weight_quant._range(l.weight) for l in weights]
        span = torch.cat([hi.reshape(-1) for _, hi in ranges]) - torch.cat([lo.reshape(-1) for lo, _ in ranges])
        log_s = [l.weight_quant.log_s for l in weights]
        bits = QF.weight_bits(span, torch.cat([t.reshape(-1) for t in log_s]))
        level = _level(torch.stack([l.target_w for l in weights]), level_fraction, init_bits)
        channels = [t.numel() for t in log_s]
        p_w, layer_terms, level_c = _family(bits, level, channels, eps, p)
        active_w = (bits.detach() > level_c - eps).sum() if count == "channels" else (layer_terms > 0).sum()
        lag_w = (bits.detach() - level_c).max()
    p_a, active_a, lag_a = zero, zero.long(), None
    if acts:
        log_q = torch.cat([l.act_quant.log_q.reshape(-1) for l in acts])
        bits = QF.activation_bits(log_q, torch.cat([l.act_quant.log_s.reshape(-1) for l in acts]))
        level = _level(torch.stack([l.target_a for l in acts]), frac_a, init_bits)
        p_a, layer_terms, level_c = _family(bits, level, [1] * len(acts), eps, p)
        active_a = (layer_terms > 0).sum()
        lag_a = (bits.detach() - level_c).max()
    lags = [t for t in (lag_w, lag_a) if t is not None]
    lag = torch.stack(lags).max() if lags else torch.full_like(zero, -math.inf)
    return BitTerms(p_w, p_a, active_w, active_a, len(weights), len(acts), lag)


def _family(bits: Tensor, level: Tensor, channels: list[int], eps: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(P: the mean over layers of exterior_penalty(layer's bits, its level), each layer's detached term, the
    level repeated over each layer's entries) of one family, its layers' entries side by side in ``bits``."""
    level_c = torch.cat([v.expand(n) for v, n in zip(level.unbind(), channels)])
    term = torch.clamp(bits - (level_c - eps), min=0).pow(p)
    if all(n == 1 for n in channels):
        per_layer = term
    else:  # each layer's mean: its entries' sum over its count
        segment, counts = _layout(channels, term.device)
        per_layer = term.new_zeros(len(channels)).index_add_(0, segment, term) / counts
    return per_layer.mean(), per_layer.detach(), level_c


_LAYOUTS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _layout(channels: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(each entry's layer index, each layer's entry count) on ``device``, made once per model layout: a copy
    from the host each step would wait for the device."""
    key = (tuple(channels), str(device))
    if key not in _LAYOUTS:
        counts = torch.tensor(channels)
        segment = torch.repeat_interleave(torch.arange(len(channels)), counts)
        _LAYOUTS[key] = (segment.to(device), counts.float().to(device))
    return _LAYOUTS[key]


def add_budget(terms: BitTerms, bt) -> BitTerms:
    """The per-layer terms (upper bounds) plus a budget's aggregate terms, counted as one constraint each."""
    return BitTerms(
        terms.p_w + bt.p_w,
        terms.p_a + bt.p_a,
        terms.active_w + (bt.p_w.detach() > 0),
        terms.active_a + (bt.p_a.detach() > 0),
        terms.n_w + 1,
        terms.n_a + int(bt.p_a.requires_grad),
        torch.maximum(terms.lag, torch.as_tensor(bt.lag, dtype=terms.lag.dtype, device=terms.lag.device)),
    )


def extra_losses(model: nn.Module) -> Tensor | None:
    """Sum of the quantizers' ``extra_loss()`` terms (zoo methods: PEGE, PACT, CoDeQ), or None when none has one."""
    terms = [t for q in iter_quantizers(model) if (t := q.extra_loss()) is not None]
    return torch.stack(terms).sum() if terms else None


class GDNSQObjective:
    """Stateful only in the running loss mean m̄ (part of checkpoints via state_dict). m̄ lives on the device
    (float64, the maths the host did before, op for op), so a step reads nothing back; ``loss_mean`` and
    ``state_dict`` read it (a host sync: tests, checkpoints)."""

    def __init__(self, cfg: ObjectiveConfig, init_bits: float | None = None, budget=None):
        self.cfg = cfg
        self.init_bits = init_bits
        self.budget = budget  # training.budget.Budget: the penalty also acts on the model-wide aggregate
        self._mean: Tensor | float | None = None  # m̄, a float64 device tensor once a step ran
        self._sum: Tensor | float = 0.0
        self.loss_count = 0
        self.last_terms: BitTerms | None = None

    @property
    def loss_mean(self) -> float | None:
        return None if self._mean is None else float(self._mean)

    @property
    def loss_sum(self) -> float:
        return float(self._sum)

    def state_dict(self) -> dict:
        return {"loss_mean": self.loss_mean, "loss_sum": self.loss_sum, "loss_count": self.loss_count}

    def load_state_dict(self, state: dict) -> None:
        self._mean = state["loss_mean"]
        self._sum, self.loss_count = state.get("loss_sum", 0.0), state.get("loss_count", 0)

    def _update_loss_mean(self, d: Tensor) -> Tensor:
        """m̄ after this step's task loss ``d`` (float64 on d's device; a float from a checkpoint joins as is)."""
        c = self.cfg
        d = d.detach().double()
        self._sum, self.loss_count = d + self._sum, self.loss_count + 1
        if c.loss_scale == "cumulative":
            self._mean = self._sum / self.loss_count
        elif self._mean is None:
            self._mean = d
        else:
            self._mean = c.loss_ema * self._mean + (1 - c.loss_ema) * d
        return self._mean

    def __call__(
        self,
        model: nn.Module,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        targets: Tensor,
        temperature: float | Tensor,
        level_fraction: float | tuple[float, float] = 0.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, parts): parts are detached device tensors (reading one is a host sync; the engine reads them
        once per logging interval). ``temperature``: a float, or the schedule's float64 device tensor."""
        c = self.cfg
        d = task_loss(c.distill, student_logits, teacher_logits, targets)
        loss_mean = self._update_loss_mean(d)
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
        # the shares in float64 and each factor rounded once to the loss's dtype: the host's float maths before
        active_w, active_a = terms.active_w.double(), terms.active_a.double()
        total_active = active_w + active_a
        w_w = ((active_w + c.eps) / (total_active + c.eps)).to(d.dtype)
        w_a = ((active_a + c.eps) / (total_active + c.eps)).to(d.dtype)
        penalty = _as(loss_mean, d) * (w_w * terms.p_w + w_a * terms.p_a)
        if c.lossless:
            loss = _as(c.task_weight * temperature, d) * d + c.penalty_weight * penalty
        else:
            loss = c.task_weight * d + _as(c.penalty_weight * temperature, d) * penalty
        parts = {
            "train/task": d.detach(),
            "train/penalty_w": terms.p_w.detach(),
            "train/penalty_a": terms.p_a.detach(),
            "train/active_w": terms.active_w,
            "train/active_a": terms.active_a,
            "train/loss_mean": loss_mean,
        }
        extra = extra_losses(model)
        if extra is not None:
            loss = loss + extra
            parts["train/extra_loss"] = extra.detach()
        return loss, parts


def _as(factor: float | Tensor, like: Tensor) -> float | Tensor:
    """A float64 device factor rounded to ``like``'s dtype, as a Python float multiplying ``like`` is."""
    return factor.to(like.dtype) if isinstance(factor, Tensor) else factor


def ns_top1(top1: float, is_converged: bool) -> float:
    """Only converged models count: top-1 if converged, else 0."""
    return top1 * float(is_converged)
