"""One model-wide budget shared by the layers (learned mixed precision, ``quant.budget``).

Instead of a bit target per layer, the exterior-point penalty acts on an aggregate A of every layer's bits,
so layers trade bits and the optimizer decides which keep precision:

    avg_bits_w   A = Σ_l n_l·b_l / Σ_l n_l                         (n_l: weight elements of quantized layer l)
    bytes        A = F + Σ_l n_l·b_l / 8                (F: the packed file's fixed payload, bits.packed_size_parts)
    bops         A = Σ_l M_l·b_w,l·b_a,l + Σ_FP M·32·32            (M_l: MACs per sample, bits.measure_macs)

    P = max(0, (A - L)/D)**p,   D = ∂A/∂(every b_w raised by one bit), so P is in bits like the per-layer P_w.

The optional activation budget (``value_a``) bounds A_a = Σ_l e_l·b_a,l / Σ_l e_l, the quantized inputs' bits per
element (e_l: input elements per sample of layer l, measured once): the activation memory a sample's quantized
inputs take. Weighted by elements, not a plain mean over layers, so a small input (a hidden Linear's 32 features)
can keep 8 bits for almost nothing while a large early feature map pays for every bit.

No ε margin: A counts whole bits, so a budget met exactly (e.g. uniform W2's bytes) must switch the penalty
off; with a margin it would push every channel on into fewer levels than its storage width holds.

b_l is a layer's storage width: its widest channel (a soft max, τ·logsumexp(b_c/τ) ≥ max_c b_c) mapped to whole
bits with a straight-through round-up, w(b) = ceil(log2(2**b - 1/2 + m)) (the grid of b has round(2**b - 1) + 1
levels; m = quant.level_margin levels of pessimism), forward integer, gradient 1. The aggregate so reaches
the budget in whole bits, as the true check counts them. The planned level L moves from A at init_bits (all
layers) to the budget V like the per-layer levels do; ``converged`` = the aggregate of the true integer bits
is within budget (bytes: exactly :func:`bits.packed_bytes`), every layer within its upper bound, no dead grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import BudgetConfig
from ..quant.layers import iter_quantized
from .bits import FP_BITS, compute_layers, measure_shapes, packed_bytes, packed_size_parts

_TAU = 0.05  # soft max over channels, in bits: overestimates the widest channel by at most τ·ln(channels)
_BISECTION_STEPS = 40  # halves [min_bits, max_bits] (at most 15 bits wide) to under 1e-10 bit
_MEAN_TOL = 1e-9  # float rounding of a weighted mean: inputs at exactly value_a bits per element are within it


def whole_bits(b: Tensor, margin: float = 0.1) -> Tensor:
    """Straight-through storage width: forward ceil(log2(2**b - 1/2 + margin)) (at least 1), gradient 1."""
    w = torch.ceil(torch.log2((torch.exp2(b.detach()) - 0.5 + margin).clamp_min(1.0))).clamp_min(1.0)
    return b + (w - b).detach()


def soft_max_bits(b: Tensor) -> Tensor:
    """τ·logsumexp(b/τ) over channels (≥ max, within τ·ln C): the layer's storage width, gradient on its widest
    channels."""
    b = b.reshape(-1)
    return b[0] if b.numel() == 1 else _TAU * torch.logsumexp(b / _TAU, dim=0)


def aggregate(kind: str, bw: Tensor, ba: Tensor, n: Tensor, macs: Tensor, fixed: float) -> Tensor:
    """The budget's aggregate of per-layer weight bits ``bw`` and input bits ``ba`` (all (L,) tensors).

    avg_bits_w: Σ n·bw / Σ n;  bytes: fixed + Σ n·bw / 8;  bops: fixed + Σ macs·bw·ba (fixed: FP layers' BOPs).
    """
    if kind == "avg_bits_w":
        return (n * bw).sum() / n.sum()
    if kind == "bytes":
        return fixed + (n * bw).sum() / 8.0
    if kind == "bops":
        return fixed + (macs * bw * ba).sum()
    raise ValueError(f"unknown budget kind {kind!r}")


def scale(kind: str, ba: Tensor, n: Tensor, macs: Tensor) -> float:
    """D = how much the aggregate grows when every layer's weight bits grow by one (turns A - V into bits)."""
    if kind == "avg_bits_w":
        return 1.0
    if kind == "bytes":
        return float(n.sum()) / 8.0
    return float((macs * ba.detach()).sum())


@dataclass
class BudgetTerms:
    p_w: Tensor  # the aggregate's penalty (weights, and activations through BOPs)
    p_a: Tensor  # the activation budget's penalty (value_a), 0 without one
    lag: float  # (A - L)/D in bits, the largest of the two
    value: float  # A of the storage widths (forward value)


class Budget:
    """The model's constants (weight elements, MACs, fixed bytes/BOPs), fixed once, and the penalty."""

    def __init__(self, cfg: BudgetConfig, model: nn.Module, example_input: Tensor | None, margin: float = 0.1):
        if cfg.kind == "bops" and example_input is None:
            raise ValueError("quant.budget.kind bops needs an example input to count MACs")
        self.cfg, self.margin = cfg, margin
        layers = list(iter_quantized(model))
        self.names = [n for n, _ in layers]
        ref = next(model.parameters())
        self.n = torch.tensor([float(l.weight.numel()) for _, l in layers], device=ref.device)
        self.macs = torch.zeros_like(self.n)
        self.fixed = 0.0
        has_act = torch.tensor([float(l.act_quant is not None) for _, l in layers], device=ref.device)
        self.elems = has_act  # input elements per sample (quantized inputs only); 1 each until measured
        if example_input is not None and (cfg.kind == "bops" or cfg.value_a is not None):
            shapes = measure_shapes(model, example_input)
            self.macs = torch.tensor([float(shapes.get(n, (0, 0))[0]) for n in self.names], device=ref.device)
            self.elems = has_act * torch.tensor(
                [float(shapes.get(n, (0, 0))[1]) for n in self.names], device=ref.device
            )
            if cfg.kind == "bops":
                self.fixed = float(
                    sum(
                        shapes[n][0] * FP_BITS * FP_BITS
                        for n, _ in compute_layers(model)
                        if n not in set(self.names) and n in shapes
                    )
                )
        if cfg.kind == "bytes":
            self.fixed = float(packed_size_parts(model)[0])

    def _bits(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        bw, ba = [], []
        for _, layer in iter_quantized(model):
            bw.append(whole_bits(soft_max_bits(layer.weight_bits()), self.margin))
            b = layer.act_bits()
            ba.append(self.n.new_tensor(float(FP_BITS)) if b is None else whole_bits(b.reshape(()), self.margin))
        return torch.stack(bw), torch.stack(ba)

    def act_mean(self, ba: Tensor) -> Tensor:
        """A_a: the quantized inputs' bits per element (``ba``: (L,) per-layer input bits; FP inputs weigh 0)."""
        return (self.elems * ba).sum() / self.elems.sum().clamp_min(1.0)

    def at_bits(self, bits: float, bits_a: float | None = None) -> float:
        """The aggregate with every quantized layer's weights at ``bits`` and inputs at ``bits_a`` (default: the
        same): at init_bits, the descent's start."""
        b = torch.full_like(self.n, float(bits))
        a = b if bits_a is None else torch.full_like(self.n, float(bits_a))
        return float(aggregate(self.cfg.kind, b, a, self.n, self.macs, self.fixed))

    def equivalent_bits(self, bits_a: float | None = None) -> float:
        """The uniform weight width whose aggregate equals the budget (bisection; clipped to [min_bits, max_bits]):
        the descent is planned as for that uniform target."""
        lo, hi = float(self.cfg.min_bits), float(self.cfg.max_bits)
        if self.at_bits(lo, bits_a) >= self.cfg.value:
            return lo
        if self.at_bits(hi, bits_a) <= self.cfg.value:
            return hi
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.at_bits(mid, bits_a) <= self.cfg.value else (lo, mid)
        return lo

    def penalties(
        self,
        model: nn.Module,
        eps: float,
        p: float,
        level_fraction: float = 0.0,
        init_bits: float | None = None,
        level_fraction_a: float | None = None,
    ) -> BudgetTerms:
        c = self.cfg
        bw, ba = self._bits(model)
        a = aggregate(c.kind, bw, ba, self.n, self.macs, self.fixed)
        level = c.value
        if level_fraction and init_bits is not None:
            level = c.value + max(self.at_bits(init_bits) - c.value, 0.0) * level_fraction
        x = (a - level) / scale(c.kind, ba, self.n, self.macs)
        p_w = torch.clamp(x, min=0).pow(p)  # eps unused: see the module docstring
        lag, p_a = float(x.detach()), torch.zeros_like(p_w)
        if c.allocate == "probe":  # the probe made the widths per-layer targets: their own penalties descend
            return BudgetTerms(torch.zeros_like(p_w), p_a, -math.inf, float(a.detach()))
        if c.value_a is not None and bool((self.elems > 0).any()):
            frac_a = level_fraction if level_fraction_a is None else level_fraction_a
            level_a = c.value_a + max((init_bits or c.value_a) - c.value_a, 0.0) * frac_a
            xa = self.act_mean(ba) - level_a
            p_a = torch.clamp(xa, min=0).pow(p)
            lag = max(lag, float(xa.detach()))
        return BudgetTerms(p_w, p_a, lag, float(a.detach()))

    def true_value(self, model: nn.Module) -> float:
        """The aggregate of the true integer bits (bytes: exactly the packed payload, bits.packed_bytes)."""
        layers = list(iter_quantized(model))
        tw = {n: max(1, l.true_weight_bits()) for n, l in layers}
        if self.cfg.kind == "bytes":
            return float(packed_bytes(model, {n: tw[n] for n, l in layers if l.weight_quant.enabled}))
        bw = self.n.new_tensor([float(tw[n]) for n in self.names])
        ba = self.n.new_tensor([float(FP_BITS if l.true_act_bits() is None else l.true_act_bits()) for _, l in layers])
        return float(aggregate(self.cfg.kind, bw, ba, self.n, self.macs, self.fixed))

    def within(self, model: nn.Module) -> bool:
        """True aggregate within the budget, and the true activation bits per element within value_a if set."""
        if self.true_value(model) > self.cfg.value:
            return False
        if self.cfg.value_a is not None and bool((self.elems > 0).any()):
            ta = self.n.new_tensor([float(l.true_act_bits() or 0) for _, l in iter_quantized(model)])
            if float(self.act_mean(ta)) > self.cfg.value_a + _MEAN_TOL:
                return False
        return True


def uniform_value(kind: str, model: nn.Module, bits_w: int, bits_a: int, example_input: Tensor | None) -> float:
    """The budget a uniform W{bits_w}A{bits_a} model of this structure takes (e.g. bytes of uniform W2)."""
    cfg = BudgetConfig(kind=kind, value=1.0)
    b = Budget(cfg, model, example_input)
    if kind == "bytes":
        return float(packed_bytes(model, {n: bits_w for n, l in iter_quantized(model) if l.weight_quant.enabled}))
    bw, ba = torch.full_like(b.n, float(bits_w)), torch.full_like(b.n, float(bits_a))
    return float(aggregate(kind, bw, ba, b.n, b.macs, b.fixed))
