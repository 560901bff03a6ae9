"""The data-kind dispatch: ``data.kind`` -> train / val (/ test) loaders for one rank.

FFCV and torchvision are imported only when their kind is asked for.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import JobConfig


@dataclass
class Loaders:
    train: Any
    val: Any
    test: Any | None
    num_classes: int
    in_chans: int
    calib: Any = None  # rank-independent batches for calibration / teacher training
    set_epoch: Callable[[int], None] = field(default=lambda epoch: None)
    bad_files: Callable[[], set[str]] = field(default=set)  # unreadable images skipped so far (bad_images: skip)


def cpu_share() -> int:
    """CPUs this rank computes on: torch's thread count (a Ray worker sets it to ``ray.cpus_per_worker``),
    at most the CPUs the process may run on."""
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))))


def create_loaders(
    cfg: JobConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None, epoch: int = 0
) -> Loaders:
    """Dispatch on ``data.kind``; FFCV and torchvision are imported only when asked for."""
    d = cfg.data
    if d.kind == "bundled":
        from .bundled import create_bundled_loaders

        train, val, test, nc, ch = create_bundled_loaders(
            d.batch_size, rank=rank, world_size=world_size, seed=cfg.train.seed, val_fraction=d.val_fraction
        )
        full, _, _, _, _ = create_bundled_loaders(d.batch_size, seed=cfg.train.seed, val_fraction=d.val_fraction)

        sampler = getattr(train, "sampler", None)

        def set_epoch(e):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(e)

        return Loaders(train, val, test, nc, ch, calib=full, set_epoch=set_epoch)
    distributed = world_size > 1
    if d.num_workers is None:  # sized to this rank's CPU share, not every CPU of the node (PITFALLS)
        d = dataclasses.replace(d, num_workers=cpu_share())
    if d.kind == "ffcv":
        from .ffcv_io import create_ffcv_loaders as factory
    else:
        from .imagefolder import create_imagefolder_loaders as factory
    train, val, nc = factory(
        d, distributed=distributed, device=device or torch.device("cpu"), seed=cfg.train.seed, epoch=epoch
    )

    def set_epoch(e):
        sampler = getattr(train, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(e)
        elif hasattr(train, "next_epoch"):  # FFCV loaders keep their own epoch counter
            train.next_epoch = e

    def bad_files() -> set[str]:
        return set().union(*(getattr(loader, "bad_files", set()) for loader in (train, val)))

    return Loaders(train, val, None, nc, 3, calib=train, set_epoch=set_epoch, bad_files=bad_files)
