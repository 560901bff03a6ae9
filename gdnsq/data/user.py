"""A user's own DataLoaders (or datasets) as a job's loaders, for the Python API (``gdnsq.quantize``).

Batches must be ``(images, labels)``: images a float tensor (N, C, H, W), labels an integer tensor (N,). The
first batch of each loader is checked before anything trains, and every batch as it comes, so a wrong shape is a
one-line DataError naming the loader and what it yielded, not an error from deep inside torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .loaders import Loaders


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    if isinstance(v, dict):
        return f"a dict (keys {', '.join(map(str, list(v)[:4]))})"
    if isinstance(v, (list, tuple)):
        return f"a {type(v).__name__} of {len(v)}"
    return f"a {type(v).__name__}"


def check_batch(batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` as (images, labels), or a one-line DataError naming ``name`` and what is wrong."""
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise DataError(f"{name}: a batch must be (images, labels), got {_describe(batch)}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        hint = "; add the channel axis (x.unsqueeze(1))" if isinstance(x, torch.Tensor) and x.dim() == 3 else ""
        raise DataError(f"{name}: images must be a float tensor (N, C, H, W), got {_describe(x)}{hint}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{name}: labels must be an integer tensor (N,) of class indices, got {_describe(y)}")
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} images but {len(y)} labels in one batch")
    return x, y


class CheckedLoader:
    """A user's loader whose batches are checked (check_batch); ``len`` and the sampler are the loader's."""

    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        try:
            return len(self.loader)
        except TypeError:
            raise DataError(f"{self.name}: the loader has no length (an IterableDataset); gdnsq plans steps") from None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            yield check_batch(batch, self.name)


def as_loader(data, name: str, *, batch_size: int, train: bool):
    """A DataLoader as given, or a Dataset in one (shuffled, last partial batch dropped for training)."""
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=train, drop_last=train)
    if not hasattr(data, "__iter__"):
        raise DataError(f"{name}: expected a DataLoader or a Dataset of (images, labels), got {_describe(data)}")
    return data


def user_loaders(train, val, *, num_classes: int, batch_size: int = 64) -> Loaders:
    """The job's Loaders over a user's train/val DataLoaders (or datasets); the first batches checked here."""
    train_l = CheckedLoader(as_loader(train, "train", batch_size=batch_size, train=True), "train")
    val_l = CheckedLoader(as_loader(val, "val", batch_size=batch_size, train=False), "val")
    if len(train_l) == 0:
        raise DataError("train: the loader yields no batches")
    x, _ = first_batch(train_l)
    first_batch(val_l)

    def set_epoch(epoch: int) -> None:
        if hasattr(train_l.sampler, "set_epoch"):
            train_l.sampler.set_epoch(epoch)

    return Loaders(train_l, val_l, None, num_classes, int(x.shape[1]), calib=train_l, set_epoch=set_epoch)


def first_batch(loader: CheckedLoader) -> tuple[torch.Tensor, torch.Tensor]:
    for batch in loader:
        return batch
    raise DataError(f"{loader.name}: the loader yields no batches")
