"""Model factory: timm backbones (any registered name) plus gdnsq's small CNN for the bundled data."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import register_model
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that pools a CPU tensor in channels-last order: torch's NCHW CPU kernel with indices (the
    training path) is several times slower than its channels-last one, conversions included; the values are
    the same, and so are the gradients except between exactly equal maxima (the first in the window wins in
    both kernels' scan order)."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class SmallCNN(nn.Module):
    """A compact CNN for 28x28 digits: an FP stem, three quantizable convs, a hidden Linear, an FP head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.features = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(2 * w, 2 * w), nn.ReLU())
        self.head = nn.Linear(2 * w, num_classes)
        # timm's convention for locating the edge layers, read by surgery.
        self.pretrained_cfg = {"first_conv": "stem.0", "classifier": "head", "architecture": "gdnsq_smallcnn"}

    def forward(self, x):
        return self.head(self.fc(self.features(self.stem(x))))


@register_model
def gdnsq_smallcnn(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, **kwargs) -> SmallCNN:
    if pretrained:
        raise ConfigError("model.pretrained: gdnsq_smallcnn has no pretrained weights; train a teacher instead")
    # timm passes hub/cache options meant for pretrained loading; only ``width`` is ours.
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, width=kwargs.get("width", 16))


def load_state_dict_file(path: str | Path) -> dict:
    """FP weights, without unpickling code, from the files people have: a plain (timm / torchvision) state dict,
    a full checkpoint holding it under ``teacher`` (gdnsq), ``state_dict`` (timm's train.py, Lightning) or
    ``model``. Key prefixes (Lightning's ``model.``, DDP's ``module.``) are fitted to the model on loading."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - turn any load failure into one clear line
        raise ConfigError(f"model.checkpoint: cannot read {str(path)!r} ({type(e).__name__})") from None
    for key in ("teacher", "state_dict", "model"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


# Wrappers' key prefixes: a LightningModule's attribute (self.model / self.net), DDP's and torch.compile's.
_PREFIXES = ("model.", "module.", "net.", "_orig_mod.")


def fit_prefixes(state: dict, model: nn.Module) -> dict:
    """``state`` with the wrapper prefixes stripped that make its keys the model's (a Lightning checkpoint's
    ``model.``, DDP's ``module.``); other keys of the wrapper (a loss's buffers, a second network) are dropped
    only when stripping matched every key the model has."""
    wanted = set(model.state_dict())
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for _ in range(3):  # nested wrappers: module.model.conv1.weight
        if wanted <= set(state):
            return state
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not (wanted & set(stripped)):
            return state
        state = stripped
    return state


def create_model(cfg: ModelConfig, *, num_classes: int, in_chans: int, load_weights: bool = True) -> nn.Module:
    """timm.create_model with a clear error for unknown names; FP weights from timm or a file."""
    if not timm.is_model(cfg.name):
        from ..config import did_you_mean

        hint = did_you_mean(cfg.name, timm.list_models()) or "; 'timm.list_models(\"*pattern*\")' lists them"
        raise ConfigError(f"model.name: unknown timm model {cfg.name!r}{hint}")
    kwargs = dict(num_classes=cfg.num_classes or num_classes, in_chans=cfg.in_chans or in_chans)
    model = timm.create_model(cfg.name, pretrained=bool(cfg.pretrained and load_weights), **kwargs)
    if load_weights and cfg.checkpoint:
        state = fit_prefixes(load_state_dict_file(cfg.checkpoint), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(
                f"model.checkpoint: {cfg.checkpoint} does not fit {cfg.name} "
                f"(missing {len(missing)} tensors, e.g. {missing[0]})"
            )
    return model


def has_fp_weights(cfg: ModelConfig) -> bool:
    return bool(cfg.pretrained or cfg.checkpoint)
