"""torchvision fallback: ImageFolder + DataLoader with the same crops as the FFCV loaders.

Used where FFCV is not installed or the data is not converted yet. The returned loaders
behave like FFCV's where the training loop can tell: ``len()``, ``(images, labels)`` batches
already on ``device``, and a ``next_epoch`` attribute that the next pass shuffles for and then
advances (so a resumed run passes ``epoch`` and continues the shuffle sequence).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from gdnsq.config import AugmentConfig, DataConfig
from gdnsq.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(img_size: int, augment: AugmentConfig):
    """timm's training transform with data.augment's settings (RandomResizedCrop, flips, colour jitter,
    auto-augment, random erasing), normalised with the ImageNet statistics as the FFCV pipeline is."""
    from timm.data import create_transform

    return create_transform(
        img_size,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        vflip=augment.vflip,
        color_jitter=augment.color_jitter or None,
        auto_augment=augment.auto_augment,
        re_prob=augment.re_prob,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def val_transform(img_size: int, val_resize: int):
    from torchvision import transforms as T

    return T.Compose(
        [T.Resize(val_resize), T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def open_imagefolder(path: str | Path, transform=None):
    """torchvision ImageFolder, or DataError naming the folder when it is missing or empty."""
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"no such ImageFolder directory: {path}")
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as e:  # no class folders, or no image files in them
        raise DataError(f"ImageFolder {path} has no images ({str(e).splitlines()[0]})") from None


def world_and_rank(distributed: bool) -> tuple[int, int]:
    """(world size, rank) of the torch.distributed group, or (1, 0) when not distributed."""
    if not distributed:
        return 1, 0
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


class EpochLoader:
    """A DataLoader whose sampler epoch advances on every pass, and whose batches land on ``device``.

    ``next_epoch`` is the only epoch control, as on FFCV's Loader; the sampler is private so
    callers cannot set an epoch that the next pass would overwrite.
    """

    def __init__(self, loader: DataLoader, sampler: DistributedSampler, device: torch.device, epoch: int):
        self.loader, self._sampler, self.device = loader, sampler, device
        self.next_epoch = epoch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self._sampler.set_epoch(self.next_epoch)
        self.next_epoch += 1
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def create_imagefolder_loaders(cfg: DataConfig, *, distributed: bool, device: torch.device, seed: int, epoch: int = 0):
    """Train and val loaders over ImageFolder directories ``cfg.train_path`` / ``cfg.val_path``.

    Returns ``(train_loader, val_loader, num_classes)`` with the same batches as
    :func:`gdnsq.data.ffcv_io.create_ffcv_loaders`: float32 NCHW normalised images and int64
    labels on ``device``; train drops the last partial batch, val keeps it.
    """
    if cfg.img_size > cfg.val_resize:
        raise DataError(f"data.img_size ({cfg.img_size}) must be <= data.val_resize ({cfg.val_resize})")
    train_ds = open_imagefolder(cfg.train_path, train_transform(cfg.img_size, cfg.augment))
    val_ds = open_imagefolder(cfg.val_path, val_transform(cfg.img_size, cfg.val_resize))
    if val_ds.classes != train_ds.classes:
        # ImageFolder numbers classes by sorted folder name: different sets would shift labels.
        raise DataError(f"{cfg.val_path} and {cfg.train_path} have different class folders")

    # A one-replica DistributedSampler is a seeded, epoch-aware shuffle without a process group.
    world, rank = world_and_rank(distributed)
    if len(train_ds) // world < cfg.batch_size:
        raise DataError(
            f"{cfg.train_path} has {len(train_ds)} images for {world} rank(s), "
            f"fewer than one batch of data.batch_size={cfg.batch_size} per rank"
        )
    pin = device.type == "cuda"

    def loader(ds, shuffle, drop_last):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        dl = DataLoader(
            ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=pin,
            drop_last=drop_last,
            persistent_workers=cfg.num_workers > 0,
        )
        return EpochLoader(dl, sampler, device, epoch if shuffle else 0)

    return loader(train_ds, True, True), loader(val_ds, False, False), len(train_ds.classes)
