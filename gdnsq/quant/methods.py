"""Method registry: a method name -> factory of (weight quantizer, activation quantizer).

A plain registry that imports no method: each method module registers its factory here on import
(GDNSQ, the default, in ``quantizer``; the zoo's in ``zoo/``), and ``gdnsq.quant`` imports them all
once, so importing any part of ``gdnsq.quant`` makes every method selectable. Every method shares
surgery, objective, schedules, training, tracking and export.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .layers import QuantSpec
    from .quantizer import Quantizer

MethodFactory = Callable[[torch.Size, "QuantSpec"], "tuple[Quantizer, Quantizer]"]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: ``@register_method("lsq")`` makes ``quant.method: lsq`` build quantizers with the factory."""
    def deco(fn: MethodFactory) -> MethodFactory:
        _METHODS[name] = fn
        return fn

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def create_method_quantizers(weight_shape: torch.Size, spec: QuantSpec) -> tuple[Quantizer, Quantizer]:
    if spec.method not in _METHODS:
        raise ConfigError(f"quant.method: unknown method {spec.method!r}; choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[spec.method](weight_shape, spec)
