"""Method registry: a method name -> factory of (weight quantizer, activation quantizer).

GDNSQ is the default; the method zoo (LSQ, DoReFa, PACT, ...) registers its own factories here,
and every method shares surgery, objective, schedules, training, tracking and export.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .quantizer import ActivationQuantizer, WeightQuantizer

MethodFactory = Callable[[torch.Size, "QuantSpec"], tuple[nn.Module, nn.Module]]  # noqa: F821
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str):
    def deco(fn: MethodFactory) -> MethodFactory:
        _METHODS[name] = fn
        return fn

    return deco


def available_methods() -> list[str]:
    _load_zoo()
    return sorted(_METHODS)


def create_method_quantizers(weight_shape: torch.Size, spec) -> tuple[nn.Module, nn.Module]:
    _load_zoo()
    if spec.method not in _METHODS:
        raise ValueError(f"quant.method: unknown method {spec.method!r}; choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[spec.method](weight_shape, spec)


def _load_zoo() -> None:
    try:  # the zoo is optional: GDNSQ alone must work without it
        from . import zoo  # noqa: F401
    except ImportError:
        pass


@register_method("gdnsq")
def _gdnsq(weight_shape, spec):
    kw = dict(estimator=spec.estimator, delta=spec.delta)
    return (WeightQuantizer(weight_shape, per_channel=spec.per_channel, **kw),
            ActivationQuantizer(signed=spec.act_signed, **kw))
