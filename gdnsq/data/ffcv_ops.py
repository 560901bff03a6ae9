"""FFCV pipeline operations of our own (imports FFCV: load only from inside the FFCV loaders)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation


class NormalizeOnDevice(Operation):
    """uint8 images (B, C, H, W), channels_last, to ``(x - mean) / std`` in float32, with torch ops on the
    device the batch is on: the GPU stage of the FFCV pipeline (``ToDevice`` -> ``ToTorchImage`` -> this).

    FFCV's ``NormalizeImage`` needs cupy on a GPU. This op is not jitted, so it may follow ``ToTensor``
    (a jitted op there hangs ``Loader()``); it writes into a buffer FFCV allocates and recycles, on the
    CUDA stream FFCV runs the batch on. ``mean`` and ``std`` are in pixel units ([0, 255]).
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = 1.0 / torch.as_tensor(np.asarray(std), dtype=torch.float32).view(1, -1, 1, 1)

    def generate_code(self):
        mean, scale = self.mean, self.scale

        def normalize(images: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            out = dst[: images.shape[0]].permute(0, 3, 1, 2)  # NHWC buffer seen as channels_last NCHW
            out.copy_(images)
            return out.sub_(mean).mul_(scale)

        return normalize

    def declare_state_and_memory(self, previous_state):
        channels, height, width = previous_state.shape
        self.mean = self.mean.to(previous_state.device)
        self.scale = self.scale.to(previous_state.device)
        return (
            replace(previous_state, dtype=torch.float32, jit_mode=False),
            AllocationQuery((height, width, channels), dtype=torch.float32, device=previous_state.device),
        )
