"""gdnsq: GDNSQ quantization-aware training as a service (Ray Train, FFCV, timm, MLflow).

The public API. Each name is imported on first use, so ``import gdnsq`` (and ``gdnsq --help``) stays
cheap: torch, Ray and MLflow load only with the part that needs them.

    from gdnsq import QuantConfig, quantize_model, calibrate_model   # quantize a model in place
    from gdnsq import load_config, run                                # run a job file
    from gdnsq import load_model                                      # a registered student
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# public name -> module that defines it
_API = {
    "JobConfig": ".config",
    "QuantConfig": ".config",
    "load_config": ".config",
    "GdnsqError": ".errors",
    "ConfigError": ".errors",
    "Quantizer": ".quant",
    "available_methods": ".quant",
    "register_method": ".quant",
    "quantize_model": ".training.surgery",
    "calibrate_model": ".training.surgery",
    "run": ".launch.run",
    "load_model": ".tracking.registry",
    "export_packed": ".export",
    "load_packed": ".export",
    "export_onnx": ".export",
}

__all__ = [
    "ConfigError",
    "GdnsqError",
    "JobConfig",
    "QuantConfig",
    "Quantizer",
    "__version__",
    "available_methods",
    "calibrate_model",
    "export_onnx",
    "export_packed",
    "load_config",
    "load_model",
    "load_packed",
    "quantize_model",
    "register_method",
    "run",
]

if TYPE_CHECKING:
    from .config import JobConfig as JobConfig
    from .config import QuantConfig as QuantConfig
    from .config import load_config as load_config
    from .errors import ConfigError as ConfigError
    from .errors import GdnsqError as GdnsqError
    from .export import export_onnx as export_onnx
    from .export import export_packed as export_packed
    from .export import load_packed as load_packed
    from .launch.run import run as run
    from .quant import Quantizer as Quantizer
    from .quant import available_methods as available_methods
    from .quant import register_method as register_method
    from .tracking.registry import load_model as load_model
    from .training.surgery import calibrate_model as calibrate_model
    from .training.surgery import quantize_model as quantize_model


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'gdnsq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
