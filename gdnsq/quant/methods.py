"""Method registry: a method name -> factory of (weight quantizer, activation quantizer).

A plain registry that imports no method: each method module registers its factory here on import
(GDNSQ, the default, in ``quantizer``; the zoo's in ``zoo/``), and ``gdnsq.quant`` imports them all
once, so importing any part of ``gdnsq.quant`` makes every method selectable. Every method shares
surgery, objective, schedules, training, tracking and export.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .spec import QuantSpec

# A factory returns (weight quantizer, activation quantizer or None), both gdnsq.quant.quantizer.Quantizer.
MethodFactory = Callable[[torch.Size, QuantSpec], tuple[nn.Module, nn.Module | None]]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: ``@register_method("lsq")`` makes ``quant.method: lsq`` build quantizers with the factory.

    A second factory under a taken name replaces the first, with a warning: a user's method may deliberately
    override a built-in one, but never silently (a typo'd name or a double import would otherwise hide)."""

    def deco(fn: MethodFactory) -> MethodFactory:
        old = _METHODS.get(name)
        if old is not None and old is not fn:
            warnings.warn(
                f"gdnsq: quant.method {name!r} was registered by {old.__module__}.{old.__qualname__}; "
                f"{fn.__module__}.{fn.__qualname__} replaces it",
                RuntimeWarning,
                stacklevel=2,
            )
        _METHODS[name] = fn
        return fn

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def create_method_quantizers(weight_shape: torch.Size, spec: QuantSpec) -> tuple[nn.Module, nn.Module | None]:
    if spec.method not in _METHODS:
        raise ConfigError(f"quant.method: unknown method {spec.method!r}; choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[spec.method](weight_shape, spec)
