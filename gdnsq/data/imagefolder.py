"""torchvision fallback: ImageFolder + DataLoader with the same crops as the FFCV loaders.

Used where FFCV is not installed or the data is not converted yet. The listing follows directory links but
never into a loop (:func:`list_images`), and an image that cannot be decoded follows ``data.bad_images``
(:class:`EpochLoader`). The returned loaders
behave like FFCV's where the training loop can tell: ``len()``, ``(images, labels)`` batches
already on ``device``, and a ``next_epoch`` attribute that the next pass shuffles for and then
advances (so a resumed run passes ``epoch`` and continues the shuffle sequence).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from gdnsq.config import DataConfig, path_kind
from gdnsq.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WARN_BAD_FILES = 3  # unreadable files named on the console under bad_images: skip; the summary counts them all

log = logging.getLogger("gdnsq")


def train_transform(img_size: int):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(img_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def val_transform(img_size: int, val_resize: int):
    from torchvision import transforms as T

    return T.Compose(
        [T.Resize(val_resize), T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def list_images(class_dir: str, extensions: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(image files, directory links skipped) under ``class_dir``, in torchvision's order (by folder path, then by
    name). Directory links are followed, as torchvision does, but never into a loop: a link to a folder already
    walked, or to one that holds the link (its own folder, the dataset root, ``/``), is skipped and returned, where
    ``os.walk(followlinks=True)`` reads the same tree over and over until the path is too long."""
    start = os.path.realpath(class_dir)
    seen, skipped, folders = {start}, [], {}
    stack = [(class_dir, start)]
    while stack:
        path, real = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:  # an unreadable folder: skipped, as os.walk does
            continue
        names = folders.setdefault(path, [])
        for entry in entries:
            if entry.is_dir():  # follows links; False for a dangling one
                target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if target in seen or (real + os.sep).startswith(target.rstrip(os.sep) + os.sep):
                    skipped.append(entry.path)
                    continue
                seen.add(target)
                stack.append((entry.path, target))
            elif entry.name.lower().endswith(extensions):
                names.append(entry.name)
    files = [os.path.join(folder, name) for folder in sorted(folders) for name in sorted(folders[folder])]
    return files, skipped


@functools.cache
def _image_folder_class():
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    class SafeImageFolder(ImageFolder):
        """torchvision's ImageFolder with :func:`list_images`'s listing (no link loops) and an image that cannot be
        decoded handled by the ``bad_images`` policy: a sample is ``(image, label, bad)``, where ``bad`` names the
        unreadable files met on the way and the image is the next readable one (:class:`EpochLoader` applies the
        policy in the main process, where its error is one line rather than a worker's traceback)."""

        def __init__(self, root: str, transform=None):
            self.skipped_links: list[str] = []
            super().__init__(root, transform=transform)

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            instances, empty = [], []
            for name in sorted(class_to_idx):
                files, skipped = list_images(os.path.join(directory, name), tuple(extensions or IMG_EXTENSIONS))
                self.skipped_links += skipped
                instances += [(f, class_to_idx[name]) for f in files]
                if not files:
                    empty.append(name)
            if empty and not allow_empty:  # torchvision's own error, which open_imagefolder turns into one line
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
            return instances

        def __getitem__(self, index: int):
            bad = []
            for attempt in range(min(len(self.samples), MAX_BAD_IN_A_ROW)):
                path, label = self.samples[(index + attempt) % len(self.samples)]
                try:
                    image = self.loader(path)
                    return (self.transform(image) if self.transform else image), label, bad
                except Exception as e:  # noqa: BLE001 - any decode failure is the policy's to handle
                    bad.append(f"{path} ({decode_problem(e)})")
            from PIL import Image

            blank = Image.new("RGB", (8, 8))  # collated like any image; the loader stops on the marker
            return (self.transform(blank) if self.transform else blank), label, [*bad, HOPELESS]

    SafeImageFolder.__module__, SafeImageFolder.__qualname__ = __name__, "SafeImageFolder"
    return SafeImageFolder


def __getattr__(name: str):
    # The class is built on first use (torchvision loads then, not on import) and pickles by this name, so a
    # DataLoader worker started with spawn or forkserver finds it too.
    if name == "SafeImageFolder":
        return _image_folder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def decode_problem(e: Exception) -> str:
    """Why an image did not decode, in a few words (PIL repeats the file object, which the message names)."""
    text = re.sub(r"\s*<_io\.\w+ name=.*?>", "", (str(e).splitlines() or [""])[0]).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


MAX_BAD_IN_A_ROW = 50  # a folder this broken is not a dataset: stop, whatever the policy
HOPELESS = ""  # the marker of MAX_BAD_IN_A_ROW failures in a row among a sample's bad files


def open_imagefolder(path: str | Path, transform=None):
    """An ImageFolder listing (no image decoded) that follows no link into a loop, or DataError naming the folder
    when it is missing or empty."""
    path = Path(path)
    if path_kind(path) not in (None, "dir"):
        raise DataError(f"{path} is a file, not an ImageFolder directory (data.kind=ffcv reads .beton files)")
    if path_kind(path) != "dir":
        raise DataError(f"no such ImageFolder directory: {path}")
    try:
        return _image_folder_class()(str(path), transform=transform)
    except FileNotFoundError as e:  # no class folders, or no image files in them
        raise DataError(f"ImageFolder {path} has no images ({str(e).splitlines()[0]})") from None
    except OSError as e:  # an unreadable root or class folder
        raise DataError(f"ImageFolder {path} cannot be listed ({e.strerror or type(e).__name__})") from None


def collate_with_bad(batch):
    """default_collate for ``(image, label, bad)`` samples: ``(images, labels, every bad file of the batch)``."""
    from torch.utils.data import default_collate

    images, labels, bad = zip(*batch)
    return default_collate(images), default_collate(labels), [b for files in bad for b in files]


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

    def __init__(
        self,
        loader: DataLoader,
        sampler: DistributedSampler,
        device: torch.device,
        epoch: int,
        *,
        setting: str = "data.train_path",
        bad_images: str = "error",
    ):
        self.loader, self._sampler, self.device = loader, sampler, device
        self.next_epoch = epoch
        self.setting, self.policy = setting, bad_images
        self.bad_files: set[str] = set()  # unreadable files met so far (bad_images: skip)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self._sampler.set_epoch(self.next_epoch)
        self.next_epoch += 1
        for images, labels, bad in self.loader:
            if bad:
                self._handle_bad(bad)
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _handle_bad(self, bad: list[str]) -> None:
        """The ``data.bad_images`` policy, in the main process: one line naming the file, or a count."""
        files = [b for b in bad if b != HOPELESS]
        if HOPELESS in bad:
            raise DataError(
                f"{self.setting}: {len(set(files))} unreadable images in a row (e.g. {files[0]}); "
                "is it an image folder?"
            )
        if self.policy == "error":
            raise DataError(
                f"{self.setting}: unreadable image {files[0]}; replace or remove it, or set data.bad_images: skip"
            )
        for f in files:
            if f not in self.bad_files and len(self.bad_files) < WARN_BAD_FILES:
                log.warning("%s: skipped unreadable image %s", self.setting, f)
            self.bad_files.add(f)


def create_imagefolder_loaders(cfg: DataConfig, *, distributed: bool, device: torch.device, seed: int, epoch: int = 0):
    """Train and val loaders over ImageFolder directories ``cfg.train_path`` / ``cfg.val_path``.

    Returns ``(train_loader, val_loader, num_classes)`` with the same batches as
    :func:`gdnsq.data.ffcv_io.create_ffcv_loaders`: float32 NCHW normalised images and int64
    labels on ``device``; train drops the last partial batch, val keeps it.
    """
    if cfg.img_size > cfg.val_resize:
        raise DataError(f"data.img_size ({cfg.img_size}) must be <= data.val_resize ({cfg.val_resize})")
    train_ds = open_imagefolder(cfg.train_path, train_transform(cfg.img_size))
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

    def loader(ds, shuffle, drop_last, setting):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        dl = DataLoader(
            ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=pin,
            drop_last=drop_last,
            persistent_workers=cfg.num_workers > 0,
            collate_fn=collate_with_bad,
        )
        return EpochLoader(dl, sampler, device, epoch if shuffle else 0, setting=setting, bad_images=cfg.bad_images)

    train = loader(train_ds, True, True, "data.train_path")
    return train, loader(val_ds, False, False, "data.val_path"), len(train_ds.classes)
