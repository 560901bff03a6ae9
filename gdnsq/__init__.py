"""gdnsq: GDNSQ quantization-aware training as a service (Ray Train, FFCV, timm, MLflow)."""
__version__ = "0.1.0"
