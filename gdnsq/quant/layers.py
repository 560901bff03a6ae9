"""Quantized Conv2d / Linear: the float layer's own parameters, plus a weight and an input quantizer.

``from_float`` *shares* the float layer's Parameters (no copy), so the optimizer, DDP and checkpoints
see one weight; ``to_float`` gives back a plain layer sharing them again (optionally with the
quantized weight baked in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from .autograd import quantized_layer
from .methods import create_method_quantizers
from .quantizer import LOG2_FLOOR, Quantizer, op_dtype
from .spec import QuantSpec


def _fp32_region(t: Tensor):
    """Quantizers run in float32 outside autocast: a bf16 mantissa (8 bits) cannot hold a 10-bit grid."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


class _QuantMixin:
    weight_quant: Quantizer
    act_quant: Quantizer | None
    spec: QuantSpec

    def _init_quant(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.weight_quant, act = create_method_quantizers(self.weight.shape, spec)
        self.act_quant = act if spec.quantize_act else None
        # The layer's bit targets, the one place they live (the penalty, the level guard, the target hold and the
        # convergence check read them). They start at the spec's bounds; under a budget the allocation lowers
        # them (training.targets). Buffers, so checkpoints and packed files carry them under these names.
        self.register_buffer("target_w", torch.tensor(spec.bound_w))
        self.register_buffer("target_a", torch.tensor(spec.bound_a))

    def quantized_weight(self) -> Tensor:
        if self.weight_quant.uses_ops:  # any dtype in, the layer's compute dtype out, float32 maths inside
            return self.weight_quant(self.weight)
        # .float() is the weight itself for fp32 weights, so the quantizer's range cache still hits.
        with _fp32_region(self.weight):
            return self.weight_quant(self.weight.float())

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.act_quant is None:
            return x
        if self.act_quant.uses_ops:
            return self.act_quant(x)
        with _fp32_region(x):
            return self.act_quant(x.float())

    def _one_node(self) -> bool:
        """Whether the training forward runs as one ``autograd.QuantizedLayer`` (GDNSQ's ops on both quantizers)."""
        act = self.act_quant
        return self.weight_quant.uses_ops and (act is None or act.uses_ops)

    def _quantized_layer(self, x: Tensor, layer: tuple) -> Tensor:
        """The layer as one autograd node: saves x, not x̂ (``autograd.QuantizedLayer``); caches the weight's range
        for the penalty of the same step, as the weight quantizer's own forward does."""
        wq, aq = self.weight_quant, self.act_quant
        dtype = op_dtype(x)
        act = None if aq is None else (aq.log_s, aq.log_q, aq.grid_lo(), aq.rng_key)
        a_est, a_delta = (aq.estimator, aq.delta) if aq is not None else ("ste", 0.0)
        quant = (a_est, a_delta, wq.estimator, wq.delta, wq.noise_ratio, dtype, wq.integer_grid)
        y, lo, hi = quantized_layer(x, self.weight, self.bias, act, (wq.log_s, wq.rng_key), layer, quant)
        wq._cache = (wq._key(self.weight), (lo.reshape(wq.log_s.shape), hi.reshape(wq.log_s.shape)))
        return y

    def weight_bits(self) -> Tensor:
        return self.weight_quant.bits(self.weight)

    def act_bits(self) -> Tensor | None:
        return None if self.act_quant is None else self.act_quant.bits()

    def true_weight_bits(self) -> int:
        return self.weight_quant.true_bits(self.weight)

    def true_act_bits(self) -> int | None:
        return None if self.act_quant is None else self.act_quant.true_bits()

    def has_dead_grid(self) -> bool:
        """A learnable-bit grid with fewer than 2 levels (a constant layer or channel)."""
        if self.weight_quant.learnable_bits and self.weight_quant.min_levels(self.weight) < 2:
            return True
        act = self.act_quant
        return act is not None and act.learnable_bits and act.min_levels() < 2

    @torch.no_grad()
    def keep_levels_(self, margin: float, floor: float | None = None, floor_a: float | None = None) -> None:
        """Level guard: learnable-bit grids keep all 2**T levels (b >= log2(2**T - 1/2 + margin)); T = the
        layer's target, or ``floor`` / ``floor_a`` for weights / activations where lower (a budget's min_bits
        while its targets are still upper bounds, training.targets)."""
        from .functional import min_bits

        if self.weight_quant.learnable_bits:
            t = float(self.target_w) if floor is None else min(float(floor), float(self.target_w))
            self.weight_quant.keep_levels_(min_bits(t, margin), self.weight)
        if self.act_quant is not None and self.act_quant.learnable_bits:
            t = float(self.target_a) if floor_a is None else min(float(floor_a), float(self.target_a))
            self.act_quant.keep_levels_(min_bits(t, margin))

    @torch.no_grad()
    def cap_levels_(self, margin: float) -> None:
        """Target hold: learnable-bit grids have at most 2**T levels (b <= log2(2**T + 1/2 - margin)), T = the
        layer's target: a layer at its target cannot drift back above it."""
        from .functional import max_bits

        if self.weight_quant.learnable_bits:
            self.weight_quant.cap_levels_(max_bits(float(self.target_w), margin), self.weight)
        if self.act_quant is not None and self.act_quant.learnable_bits:
            self.act_quant.cap_levels_(max_bits(float(self.target_a), margin))


class QConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d whose weight and input go through the method's quantizers (learnable bit-widths for GDNSQ).

    ``same_pad`` reproduces timm's ``Conv2dSame`` (TF-style dynamic padding).
    """

    same_pad = False

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec) -> QConv2d:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for k in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(q, k, getattr(conv, k))
        q.weight, q.bias = conv.weight, conv.bias  # shared, not copied
        q.same_pad = type(conv).__name__ == "Conv2dSame"
        q._init_quant(spec)
        return q.to(conv.weight.device)

    def to_float(self, bake: bool = False) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        if bake:
            with torch.no_grad():
                conv.weight.copy_(self.weight_quant.eval()(self.weight))
            conv.bias = self.bias
        else:
            conv.weight, conv.bias = self.weight, self.bias
        return conv

    def forward(self, x: Tensor) -> Tensor:
        if (
            self._one_node()
            and not self.same_pad
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        ):
            return self._quantized_layer(x, ("conv", self.stride, self.padding, self.dilation, self.groups))
        x = self.quantize_input(x)
        w = self.quantized_weight()
        if self.same_pad:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
            return tF.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return self._conv_forward(x, w, self.bias)


class QLinear(_QuantMixin, nn.Linear):
    """Linear whose weight and input go through the method's quantizers."""

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> QLinear:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q._init_quant(spec)
        return q.to(linear.weight.device)

    def to_float(self, bake: bool = False) -> nn.Linear:
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        if bake:
            with torch.no_grad():
                lin.weight.copy_(self.weight_quant.eval()(self.weight))
            lin.bias = self.bias
        else:
            lin.weight, lin.bias = self.weight, self.bias
        return lin

    def forward(self, x: Tensor) -> Tensor:
        if self._one_node():
            return self._quantized_layer(x, ("linear",))
        return tF.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QConv2d, QLinear)


def iter_quantized(model: nn.Module):
    """(dotted name, layer) for every quantized layer, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            yield name, m


def iter_quantizers(model: nn.Module) -> Iterator[Quantizer]:
    """Every weight / activation quantizer module inside ``model``."""
    for _, layer in iter_quantized(model):
        yield layer.weight_quant
        if layer.act_quant is not None:
            yield layer.act_quant


@contextlib.contextmanager
def fp_eval(model: nn.Module) -> Iterator[nn.Module]:
    """The FP network at its current weights: every enabled quantizer off and the model in eval mode (BatchNorm
    on its running statistics) inside the block; both restored after it, also on an error."""
    switched = [q for q in iter_quantizers(model) if q.enabled]
    was_training = model.training
    try:
        for q in switched:
            q.enabled = False
        model.eval()
        yield model
    finally:
        for q in switched:
            q.enabled = True
        model.train(was_training)


def set_fused(model: nn.Module, fused: bool) -> None:
    """``quant.fused`` on every quantizer that has a fused path (GDNSQ's)."""
    for q in iter_quantizers(model):
        if hasattr(q, "fused"):
            q.fused = bool(fused)


def set_noise_ratio(model: nn.Module, ratio: float) -> None:
    for q in iter_quantizers(model):
        q.noise_ratio = float(ratio)


@torch.no_grad()
def keep_levels_(model: nn.Module, margin: float, floor: float | None = None, floor_a: float | None = None) -> None:
    """The level guard of every quantized layer at once (after each optimizer step; floors: see the layer's
    ``keep_levels_``, the same projection): the targets are read on the device and the projections are
    ``torch._foreach_*`` over all layers, so the step reads nothing back and its op count does not grow with the
    layers (but for one range per weight)."""
    layers = [layer for _, layer in iter_quantized(model)]
    acts = [l for l in layers if l.act_quant is not None and l.act_quant.learnable_bits]
    if acts:
        quant = [l.act_quant for l in acts]
        bits = _min_bits(torch.stack([l.target_a for l in acts]), margin, floor_a)
        log_q, log_s = [q.log_q for q in quant], [q.log_s for q in quant]

        def each(v: Tensor) -> list[Tensor]:  # rounded once to the parameters' dtype, as a float operand is
            return [x.view_as(t) for x, t in zip(v.to(log_q[0].dtype).unbind(), log_q)]

        # b_a = log_q - log_s >= min_bits (quantizer.ActivationQuantizer.keep_levels_)
        torch._foreach_clamp_min_(log_q, each(bits + LOG2_FLOOR))
        torch._foreach_clamp_max_(log_s, torch._foreach_sub(log_q, each(bits)))
        torch._foreach_clamp_min_(log_s, LOG2_FLOOR)
    weights = [l for l in layers if l.weight_quant.learnable_bits]
    if weights:
        quant = [l.weight_quant for l in weights]
        # The floors come first (they depend on the targets alone), then the weights' ranges they cap the step by.
        bits = _min_bits(torch.stack([l.target_w for l in weights]), margin, floor)
        log2_steps = _per_channel(torch.log2(torch.exp2(bits) - 1.0), [q.log_s.numel() for q in quant])
        ranges = [q._range(l.weight) for q, l in zip(quant, weights)]
        lo = torch.cat([r[0].reshape(-1) for r in ranges])
        hi = torch.cat([r[1].reshape(-1) for r in ranges])
        # s <= range / (2**min_bits - 1), per channel (quantizer.WeightQuantizer.keep_levels_)
        cap = torch.log2((hi - lo).clamp_min(1e-12)) - log2_steps.to(lo.dtype)
        log_s = [q.log_s for q in quant]
        torch._foreach_clamp_max_(log_s, [c.view_as(t) for c, t in zip(cap.split([t.numel() for t in log_s]), log_s)])
        torch._foreach_clamp_min_(log_s, LOG2_FLOOR)


def _min_bits(targets: Tensor, margin: float, floor: float | None) -> Tensor:
    """``functional.min_bits`` of each target (float64, on the device), the target lowered to ``floor``."""
    t = targets.double() if floor is None else targets.double().clamp(max=float(floor))
    return torch.minimum(torch.log2(torch.exp2(t) - 0.5 + margin), t - 2e-3)


def _per_channel(per_layer: Tensor, channels: list[int]) -> Tensor:
    """Each layer's value repeated over its channels (views, then one cat)."""
    return torch.cat([v.expand(n) for v, n in zip(per_layer.unbind(), channels)])


def cap_levels_(model: nn.Module, margin: float) -> None:
    """Apply the target hold to every quantized layer (after each optimizer step, once the descent has ended)."""
    for _, layer in iter_quantized(model):
        layer.cap_levels_(margin)


def within_targets(model: nn.Module) -> bool:
    """Every quantized layer's true bit-width is at most its target (weights and activations), and no
    grid is dead (fewer than 2 levels, which includes a clamp with hi < lo): a constant layer never counts."""
    for _, layer in iter_quantized(model):
        if layer.has_dead_grid():
            return False
        if layer.true_weight_bits() > float(layer.target_w):
            return False
        ta = layer.true_act_bits()
        if ta is not None and ta > float(layer.target_a):
            return False
    return True


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that belong to quantizers (their own optimizer group: own LR, no weight decay)."""
    return [p for q in iter_quantizers(model) for p in q.parameters(recurse=False) if p.requires_grad]
