"""The Brevitas arm of the method harness: Brevitas's own quantizers behind gdnsq's quantizer interface.

``register()`` adds ``quant.method: brevitas``. Everything but the quantizers is shared with every other arm:
the same surgery places them (the same layers quantized: stem conv and classifier FP), the same calibration
batches, teacher, Jeffreys distillation, optimizer (the quantizers' scales in the quantizer group, as LSQ's
steps), schedule, checkpoint selection and test split. The quantizers are Brevitas's, as a user of the
library would write them with ``QuantConv2d(weight_quant=..., input_quant=...)``; their proxies are built
from a Brevitas layer of the same shape and then run on our layer's weight and input:

* weights, b >= 2: ``Int8WeightPerChannelFloatMSE`` at b bits: per output channel, learned scale
  (``PARAMETER_FROM_STATS``) initialised by Brevitas's MSE search on the weight at the first forward;
  ``narrow_range=False`` so the grid has 2**b levels like every other arm's ([-2**(b-1), 2**(b-1) - 1]; the
  stock narrow range keeps 2**b - 1, a ternary grid at 2 bits);
* weights, 1 bit: ``SignedBinaryWeightPerTensorConst`` made per channel with the same learned, MSE-initialised
  scale ({-s, +s}, MSE-optimal s = mean|w|), clamped out of place (the stock in-place clamp would rewrite
  the shared FP weight);
* inputs: ``Uint8ActPerTensorFloatMSE`` at b bits (every quantized input here follows a ReLU): a per-tensor
  learned scale initialised from MSE statistics of the calibration batches, collected and finalised the
  way ``brevitas.graph.calibrate.calibration_mode`` does (a true average, then ``finalize_collect_stats``).

Scales are learned in Brevitas's linear domain (``RestrictValueType.FP``, its default): its log domain
(``LOG_FP``) with the MSE weight init gives NaN scales in 0.13.4.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gdnsq.errors import ConfigError
from gdnsq.quant.methods import available_methods, register_method
from gdnsq.quant.zoo.common import FixedBitQuantizer, int_bits, method_args

BREVITAS_VERSION = "0.13.4"  # the pin of pyproject.toml's [bench] extra


def require_brevitas():
    """The brevitas module, or a one-line error saying how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optional-kernel notices printed at import
            import brevitas
    except ImportError as e:
        raise ConfigError(
            f"the brevitas arm needs Brevitas: pip install 'brevitas=={BREVITAS_VERSION}' (or the [bench] extra)"
        ) from e
    return brevitas


def _injectors(bits_w: int, bits_a: int):
    from brevitas.core.function_wrapper import TensorClamp
    from brevitas.inject.enum import ScalingPerOutputType, StatsOp
    from brevitas.quant import Int8WeightPerChannelFloatMSE, Uint8ActPerTensorFloatMSE
    from brevitas.quant.base import MSESymmetricScale
    from brevitas.quant.binary import SignedBinaryWeightPerTensorConst

    class BinaryWeightPerChannelMSE(MSESymmetricScale, SignedBinaryWeightPerTensorConst):
        tensor_clamp_impl = TensorClamp
        scaling_per_output_type = ScalingPerOutputType.CHANNEL
        scaling_stats_op = StatsOp.MAX  # resolved by the solver; MSESymmetricScale's search replaces it

    if bits_w == 1:
        weight = BinaryWeightPerChannelMSE
    else:
        weight = Int8WeightPerChannelFloatMSE.let(bit_width=bits_w, narrow_range=False)
    return weight, Uint8ActPerTensorFloatMSE.let(bit_width=bits_a)


def _proxies(weight_shape: torch.Size, bits_w: int, bits_a: int):
    """(weight proxy, input proxy) of a Brevitas layer shaped like ours (the layer itself is not kept)."""
    import brevitas.nn as qnn

    weight, act = _injectors(bits_w, bits_a)
    if len(weight_shape) == 4:
        out_ch, in_ch, kh, kw = weight_shape
        layer = qnn.QuantConv2d(in_ch, out_ch, (kh, kw), bias=False, weight_quant=weight, input_quant=act)
    else:
        layer = qnn.QuantLinear(weight_shape[1], weight_shape[0], bias=False, weight_quant=weight, input_quant=act)
    return layer.weight_quant, layer.input_quant


class _BrevitasQuantizer(FixedBitQuantizer):
    """Runs a Brevitas proxy; its learned scales count as quantizer parameters (own LR group, no decay)."""

    def parameters(self, recurse: bool = True):
        # The engine takes a quantizer's parameters with recurse=False; Brevitas keeps them in nested modules.
        return super().parameters(recurse=True)

    def _value(self, x: Tensor) -> Tensor:
        out = self.proxy(x)
        return out.value if hasattr(out, "value") else out

    def _grid_of(self, out) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = out.scale.detach()
        if self.binary:
            return -s, s, -s, 2 * s
        lo = -(2 ** (self.n_bits - 1)) * s if out.signed else torch.zeros_like(s)
        hi = (2 ** (self.n_bits - 1) - 1) * s if out.signed else (2**self.n_bits - 1) * s
        return lo, hi, out.zero_point.detach() * s, s


class BrevitasWeightQuantizer(_BrevitasQuantizer):
    def __init__(self, weight_shape: torch.Size, bits: int, proxy):
        super().__init__(bits)
        self.proxy = proxy
        self.binary = bits == 1
        self.param_shape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)

    @torch.no_grad()
    def calibrate_(self, w: Tensor, init_bits: float) -> None:
        self.proxy(w)  # Brevitas initialises a PARAMETER_FROM_STATS scale (its MSE search) at the first call
        self.calibrated.fill_(True)

    def forward(self, w: Tensor) -> Tensor:
        return self._value(w) if self.enabled else w

    @torch.no_grad()
    def grid(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(t.reshape(self.param_shape) for t in self._grid_of(self.proxy(w)))


class BrevitasActQuantizer(_BrevitasQuantizer):
    def __init__(self, bits: int, proxy):
        super().__init__(bits)
        self.proxy = proxy
        self.binary = False
        self.register_buffer("is_signed", torch.tensor(False))
        from brevitas.graph.calibrate import set_collect_stats_to_average

        self.proxy.apply(set_collect_stats_to_average)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:  # calibration: Brevitas collects its statistics in training mode
            if bool((x < 0).any()):
                raise ConfigError(
                    "quant.method brevitas: a quantized layer's input is signed; the arm's inputs are unsigned"
                )
            was = self.proxy.training
            self.proxy.train()
            with torch.no_grad():
                self.proxy(x)
            self.proxy.train(was)
            return x
        return self._value(x) if self.enabled else x

    @torch.no_grad()
    def calibrate_(self, init_bits: float) -> None:
        from brevitas.graph.calibrate import finalize_collect_stats

        self.proxy.apply(finalize_collect_stats)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        was = self.proxy.training
        self.proxy.eval()
        out = self.proxy(torch.zeros(1, device=self.calibrated.device))
        self.proxy.train(was)
        return self._grid_of(out)


def register() -> None:
    """Make ``quant.method: brevitas`` selectable (once per process)."""
    require_brevitas()
    if "brevitas" in available_methods():
        return

    @register_method("brevitas")
    def create_brevitas(weight_shape, spec):
        method_args(spec, "brevitas", {})
        if spec.act_signed == "signed":
            raise ConfigError("quant.method brevitas: the arm quantizes unsigned (post-ReLU) inputs only")
        bw, ba = int_bits(spec.bound_w), int_bits(spec.bound_a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_proxy, a_proxy = _proxies(weight_shape, bw, ba)
        return BrevitasWeightQuantizer(weight_shape, bw, w_proxy), BrevitasActQuantizer(ba, a_proxy)
