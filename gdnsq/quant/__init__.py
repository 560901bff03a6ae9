"""Pure-torch quantization core: functional maths, quantizer modules, quantized layers.

Importing this package never imports Ray, MLflow or FFCV.
"""
from .layers import (
           QConv2d,
           QLinear,
           QuantSpec,
           iter_quantized,
           iter_quantizers,
           quantizer_parameters,
           set_noise_ratio,
)
from .methods import available_methods, register_method
from .quantizer import ActivationQuantizer, WeightQuantizer

__all__ = ["QConv2d", "QLinear", "QuantSpec", "ActivationQuantizer", "WeightQuantizer", "iter_quantized",
           "iter_quantizers", "quantizer_parameters", "set_noise_ratio", "available_methods", "register_method"]
