"""Pure-torch quantization core: functional maths, quantizer modules, quantized layers, method registry.

Importing this package registers every method (GDNSQ and the zoo) and never imports Ray, MLflow or FFCV.
"""

from . import zoo  # noqa: F401  (registers the zoo's methods; GDNSQ registers in .quantizer)
from .layers import QConv2d, QLinear, iter_quantized, iter_quantizers, quantizer_parameters, set_noise_ratio
from .methods import available_methods, create_method_quantizers, register_method
from .quantizer import ActivationQuantizer, Quantizer, WeightQuantizer
from .spec import QuantSpec

__all__ = [
    "ActivationQuantizer",
    "QConv2d",
    "QLinear",
    "QuantSpec",
    "Quantizer",
    "WeightQuantizer",
    "available_methods",
    "create_method_quantizers",
    "iter_quantized",
    "iter_quantizers",
    "quantizer_parameters",
    "register_method",
    "set_noise_ratio",
]
