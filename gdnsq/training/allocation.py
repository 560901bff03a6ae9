"""Mixed precision by measured sensitivity: which layer gets how many weight bits under one budget
(``quant.budget.allocate: probe``, the default).

Why not let the aggregate penalty alone decide: its gradient reaches layer l in proportion to the layer's
share of the budget (n_l/Σn for bytes), but Adam divides every parameter's step by its own gradient scale,
so each layer's bit-width falls at the same rate whatever its size. Every layer reaches the budget's uniform
width at the same time, the penalty switches off, and the "learned" allocation is the uniform one (measured:
all four layers of the digits CNN at 2/2 bits under uniform W2's bytes, in every run).

The probe instead prices, once at the start of the descent on the first training batch, every layer at
every width in its bounds: the Fisher-weighted error of its weights on that width's best clipped grid, the second-order
growth of the loss when that layer alone is quantized (as HAWQ and FIT do). It picks the widths with the least
summed price whose aggregate fits the budget (a multiple-choice knapsack, solved exactly on a fine grid of
the capacity).
Those widths become the layers' targets; the planned descent then takes every layer gradually from
init_bits to its own target, as with hand-set per-layer targets.

With an activation budget (``value_a``, bits per quantized input element) the inputs are priced the same way,
Σ (∂L/∂x)² ⊙ (Q(x) - x)² over the probe batch on each width's best clipped grid, and share their own budget
first (their widths enter the weights' BOPs). Measured why: on the digits CNN at 2,160 steps W2A8 is at W4A4's
accuracy and W8A2 0.8 under it, so at 2-bit inputs the inputs, not the weights, hold what is left.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant.layers import fp_eval, iter_quantized
from .bits import FP_BITS, code_bytes
from .runtime import all_reduce_sum

log = logging.getLogger("gdnsq")

_CAPACITY_STEPS = 1 << 16  # the knapsack's capacity grid: each item's cost is rounded UP to it, so a choice always fits
_ROUNDING_SLACK = 1e-9  # a cost that is a whole number of units up to float rounding is not rounded up a unit more
# E[g**2] over this many slices of the probe batch: the empirical Fisher needs per-slice gradients (the squared
# gradient of the whole batch would drop their variance), and 8 backward passes keep the probe cheap.
PROBE_CHUNKS = 8
_MIN_SPAN = 1e-12  # a constant channel or input has no span: a tiny grid step keeps its error finite (zero)


def choose_widths(losses: Tensor, costs: Tensor, capacity: float) -> list[int] | None:
    """Indices (one per row) minimising Σ losses[l, i_l] subject to Σ costs[l, i_l] <= capacity.

    ``losses``, ``costs``: (L, W) with +inf marking a width a layer may not take. Exact multiple-choice
    knapsack by dynamic programming over the capacity in ``_CAPACITY_STEPS`` units, every cost rounded up
    (so the answer always fits; it may miss a choice that fits only within one unit per layer). Integer costs
    (bytes, bit counts) are counted in units of their greatest common divisor, exactly when the capacity
    is under ``_CAPACITY_STEPS`` of those. None when even the cheapest choice per layer does not fit.
    """
    n_layers, _ = losses.shape
    if capacity <= 0:
        return None
    finite = costs[torch.isfinite(costs)]
    unit, k = capacity / _CAPACITY_STEPS, _CAPACITY_STEPS
    if bool((finite == finite.round()).all()):
        g = 0  # integer costs (bytes, bit counts): in units of their gcd the grid is exact when it is small enough
        for c in finite.long().tolist():
            g = math.gcd(g, c)
        if g and capacity // g <= _CAPACITY_STEPS:
            unit, k = float(g), int(capacity // g)
    units = torch.where(
        torch.isfinite(costs), torch.ceil(costs / unit - _ROUNDING_SLACK), torch.full_like(costs, math.inf)
    )
    inf = torch.tensor(math.inf, dtype=torch.float64)
    best = torch.full((k + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # best[c]: least loss of the layers so far using exactly c units
    picks = []
    for layer in range(n_layers):
        new = torch.full_like(best, math.inf)
        pick = torch.full((k + 1,), -1, dtype=torch.long)
        for i in range(losses.shape[1]):
            u, loss = units[layer, i], float(losses[layer, i])
            if not (math.isfinite(float(u)) and math.isfinite(loss)) or u > k:
                continue
            u = int(u)
            cand = torch.cat([inf.expand(u), best[: k + 1 - u] + loss])
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, i), pick)
        best = new
        picks.append(pick)
    if not torch.isfinite(best).any():
        return None
    c = int(torch.argmin(best))
    chosen = []
    for layer in reversed(range(n_layers)):
        i = int(picks[layer][c])
        chosen.append(i)
        c -= int(units[layer, i])
    return chosen[::-1]


def item_costs(kind: str, n: list[int], macs: list[float], act_bits: list[float], widths: list[int]) -> Tensor:
    """(L, W) budget cost of layer l at weight width ``widths[j]``: code bytes, bit count (avg_bits_w) or BOPs."""
    rows = []
    for n_l, m_l, a_l in zip(n, macs, act_bits):
        if kind == "bytes":
            rows.append([float(code_bytes(n_l, b)) for b in widths])
        elif kind == "avg_bits_w":
            rows.append([float(n_l * b) for b in widths])
        elif kind == "bops":
            rows.append([float(m_l * b * a_l) for b in widths])
        else:
            raise ValueError(f"unknown budget kind {kind!r}")
    return torch.tensor(rows, dtype=torch.float64)


@torch.enable_grad()
def fisher_diagonal(model: nn.Module, x: Tensor, y: Tensor, chunks: int = PROBE_CHUNKS) -> list[Tensor]:
    """Diagonal empirical Fisher of every quantized layer's weights, E[g**2] over ``chunks`` slices of the
    batch, with the quantizers off (the FP network at its current weights) and BatchNorm in eval mode.
    Cross-entropy on the labels: at the start of distillation the student equals its teacher and the
    distillation gradient is zero. Summed over data-parallel ranks."""
    layers = [layer for _, layer in iter_quantized(model)]
    fisher = [torch.zeros_like(l.weight, dtype=torch.float32) for l in layers]
    with fp_eval(model):
        for xs, ys in zip(torch.chunk(x, chunks), torch.chunk(y, chunks)):
            loss = torch.nn.functional.cross_entropy(model(xs).float(), ys)
            grads = torch.autograd.grad(loss, [l.weight for l in layers], allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.detach().float() ** 2
    for f in fisher:
        all_reduce_sum(f)
    return fisher


_SHRINK = torch.linspace(1.0, 0.2, 17)  # clip ranges tried per channel, as shares of the min/max range


@torch.no_grad()
def grid_error(w: Tensor, fisher: Tensor, bits: int, per_channel: bool = True) -> Tensor:
    """Least Fisher-weighted error Σ F ⊙ (Q(w) - w)**2 of a uniform ``bits``-bit grid (2**bits levels) over a
    clip range shrunk about each channel's mid-range (per tensor with ``per_channel`` False).

    Why a clipped grid and not the min/max grid calibration starts from: training moves the weights and the
    grid together, so what a layer can reach at b bits is closer to the best clipped grid; the min/max grid
    overstates 1-bit error ~10x more than 3-bit error (Gaussian weights), which would rule out ever trading
    one large layer's last bit for finer grids elsewhere."""
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    f = fisher.reshape(rows.shape)
    lo, hi = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    mid, levels = 0.5 * (lo + hi), 2 ** int(bits) - 1
    best = torch.full_like(lo, math.inf)
    for a in _SHRINK.tolist():
        clo, chi = mid - a * (mid - lo), mid + a * (hi - mid)
        step = ((chi - clo) / levels).clamp_min(_MIN_SPAN)
        q = torch.clamp(torch.round((rows - clo) / step), 0, levels) * step + clo
        best = torch.minimum(best, (f * (q - rows) ** 2).sum(1, keepdim=True))
    return best.sum()


@torch.no_grad()
def input_grid_error(x: Tensor, g2: Tensor, bits: int, signed: bool) -> Tensor:
    """Least Σ g2 ⊙ (Q(x) - x)**2 of a ``bits``-bit activation grid (2**bits levels from 0, or from min(x) when
    ``signed``) over clip ranges shrunk from the batch's maximum: the activation quantizer's grid family."""
    x, g2 = x.detach().float().reshape(-1), g2.float().reshape(-1)
    lo = x.min() if signed else x.new_zeros(())
    span, levels = (x.max() - lo).clamp_min(_MIN_SPAN), 2 ** int(bits) - 1
    best = x.new_tensor(math.inf)
    for a in _SHRINK.tolist():
        step = a * span / levels
        q = torch.clamp(torch.round((x - lo) / step), 0, levels) * step + lo
        best = torch.minimum(best, (g2 * (q - x) ** 2).sum())
    return best


@torch.enable_grad()
def input_prices(model: nn.Module, x: Tensor, y: Tensor, widths: list[int], chunks: int = PROBE_CHUNKS) -> Tensor:
    """(Q, W) price of the q-th quantized input (layers with an input quantizer, in module order) at ``widths[j]``
    bits: Σ (∂CE/∂x)² ⊙ (Q(x) - x)² over ``chunks`` slices of the batch (the second-order loss growth when that
    input alone is quantized), on the FP network in eval mode as in :func:`fisher_diagonal`. Summed over
    data-parallel ranks."""
    layers = [l for _, l in iter_quantized(model) if l.act_quant is not None]
    prices = torch.zeros((len(layers), len(widths)), dtype=torch.float64)
    captured: list[Tensor | None] = [None] * len(layers)

    def capture(i):
        def pre_hook(mod, inp):  # the input itself, as a graph node to differentiate the loss by
            t = inp[0] if inp[0].requires_grad else inp[0].detach().requires_grad_(True)
            captured[i] = t
            return (t,) + tuple(inp[1:])

        return pre_hook

    hooks = [l.register_forward_pre_hook(capture(i)) for i, l in enumerate(layers)]
    try:
        with fp_eval(model):
            for xs, ys in zip(torch.chunk(x, chunks), torch.chunk(y, chunks)):
                loss = torch.nn.functional.cross_entropy(model(xs).float(), ys)
                for i, (t, g) in enumerate(zip(captured, torch.autograd.grad(loss, captured))):
                    signed = bool(layers[i].act_quant.signed)
                    for j, b in enumerate(widths):
                        prices[i, j] += float(input_grid_error(t, g.detach() ** 2, b, signed))
    finally:
        for h in hooks:
            h.remove()
    all_reduce_sum(prices)
    return prices


def allocate_input_widths(model: nn.Module, x: Tensor, y: Tensor, budget) -> dict[str, int]:
    """Every quantized input's width under ``quant.budget.value_a`` (bits per input element), from the probe.

    Widths run over [min_bits, max_bits] and each layer's own target_a (before allocation its bound: max_bits, or a
    rule's); the cost of layer l at b bits is e_l·b (its input elements per sample, ``budget.elems``), the
    capacity value_a·Σ e_l."""
    cfg = budget.cfg
    layers = list(iter_quantized(model))
    rows = [i for i, (_, l) in enumerate(layers) if l.act_quant is not None]  # input_prices' rows
    widths = list(range(int(cfg.min_bits), int(cfg.max_bits) + 1))
    prices = torch.cummin(input_prices(model, x, y, widths), dim=1).values
    elems = [float(budget.elems[i]) for i in rows]
    costs = torch.tensor([[e * b for b in widths] for e in elems], dtype=torch.float64)
    for r, i in enumerate(rows):
        costs[r, [j for j, b in enumerate(widths) if b > float(layers[i][1].target_a)]] = math.inf
    chosen = choose_widths(prices, costs, float(cfg.value_a) * sum(elems))
    if chosen is None:
        raise ConfigError(
            f"quant.budget.value_a: {cfg.value_a:g} bits per input element is below every input at "
            f"{cfg.min_bits} bit(s); raise it or lower quant.budget.min_bits"
        )
    result = {layers[i][0]: widths[c] for i, c in zip(rows, chosen)}
    log.info("mixed precision (probe), inputs: %s", " ".join(f"{n}={b}" for n, b in result.items()))
    log.debug("input prices (rows: quantized inputs, columns: %s bits):\n%s", widths, prices)
    return result


def sensitivities(model: nn.Module, x: Tensor, y: Tensor, widths: list[int]) -> Tensor:
    """(L, W) price of layer l at ``widths[j]`` bits: the Fisher-weighted error of its best clipped grid
    (:func:`grid_error`), the second-order growth of the loss when that layer alone is quantized (HAWQ, FIT).

    Why not the measured loss: one layer on a min/max 1-bit grid before any training wrecks the network
    (distillation loss ~30 for every conv of the digits CNN, against 1e-3 at 8 bits), which says nothing
    about how well training recovers; the Fisher-weighted error stays a per-weight price, small where a large
    layer's weights are redundant."""
    fisher = fisher_diagonal(model, x, y)
    out = torch.full((len(fisher), len(widths)), math.inf, dtype=torch.float64)
    for li, ((_, layer), f) in enumerate(zip(iter_quantized(model), fisher)):
        per_channel = bool(getattr(layer.weight_quant, "per_channel", True))
        for wi, b in enumerate(widths):
            out[li, wi] = float(grid_error(layer.weight.detach().float(), f, b, per_channel))
    return out


def allocate_widths(
    model: nn.Module, x: Tensor, y: Tensor, budget, input_widths: dict[str, int] | None = None
) -> dict[str, int]:
    """Every quantized layer's weight width under ``budget`` (training.budget.Budget), from the probe
    (``input_widths``: the inputs' allocated widths, which BOPs count; else value_a or each layer's target_a).

    Widths run over [min_bits, max_bits] and each layer's own target_w (before allocation its bound: max_bits,
    or a rule's). More bits never cost more (a grid can say otherwise: the price is made non-increasing in the width).
    Raises ConfigError when even every layer at min_bits exceeds the budget.
    """
    cfg = budget.cfg
    layers = list(iter_quantized(model))
    widths = list(range(int(cfg.min_bits), int(cfg.max_bits) + 1))
    losses = sensitivities(model, x, y, widths)
    losses = torch.cummin(losses, dim=1).values  # non-increasing: a width never looks worse than a narrower one
    act = [
        float(FP_BITS)
        if l.act_quant is None
        else float(input_widths[n])
        if input_widths is not None
        else float(cfg.value_a)
        if cfg.value_a is not None
        else float(l.target_a)
        for n, l in layers
    ]
    costs = item_costs(cfg.kind, [int(v) for v in budget.n.tolist()], budget.macs.tolist(), act, widths)
    for li, (_, layer) in enumerate(layers):  # a layer's own bound (rules) caps its widths
        costs[li, [j for j, b in enumerate(widths) if b > float(layer.target_w)]] = math.inf
    capacity = float(cfg.value) - budget.fixed
    if cfg.kind == "avg_bits_w":
        capacity = float(cfg.value) * float(budget.n.sum())
    chosen = choose_widths(losses, costs, capacity)
    if chosen is None:
        raise ConfigError(
            f"quant.budget.value: {cfg.value:g} is below the model at {cfg.min_bits} bit(s) in every "
            f"layer ({budget.at_bits(cfg.min_bits):.0f}); raise it or lower quant.budget.min_bits"
        )
    result = {name: widths[i] for (name, _), i in zip(layers, chosen)}
    log.info("mixed precision (probe): %s", " ".join(f"{n}={b}" for n, b in result.items()))
    log.debug("probe prices (rows: layers, columns: %s bits):\n%s", widths, losses)
    return result
