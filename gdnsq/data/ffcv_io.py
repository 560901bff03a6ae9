"""FFCV edge: ImageFolder → ``.beton`` writer, and the ImageNet train/val loaders.

FFCV is imported only inside the functions here, so ``import gdnsq`` works without it.

Choices worth knowing (see shared PITFALLS.md, FFCV section):

* CPU device: ``NormalizeImage`` runs *before* ``ToTensor`` (a jitted op after ``ToTensor`` makes
  ``Loader()`` spin forever). CUDA device: decode and augment on the CPU, then ``ToTensor`` ->
  ``ToDevice`` (uint8, non-blocking) -> ``ToTorchImage`` -> ``NormalizeOnDevice`` (torch ops on the GPU;
  FFCV's own GPU normalisation needs cupy): a quarter of the PCIe bytes and no CPU time spent normalising.
* Order: ``RANDOM`` when ``os_cache`` (the page cache holds the file, shared by all ranks of a
  node). ``QUASI_RANDOM`` when not ``os_cache`` and not distributed. ``QUASI_RANDOM`` raises with
  ``distributed=True``, and ``RANDOM`` with FFCV's process cache keeps nearly every page resident,
  so distributed runs always use ``RANDOM`` over the OS cache (a warning says so): for data larger
  than memory that degrades to disk reads instead of an out-of-memory kill.
* The loaders' ``next_epoch`` attribute is the epoch their next pass shuffles for; it starts at
  ``epoch`` so a resumed run continues the shuffle sequence, and every pass advances it.
* Batches live in buffers FFCV reuses a few batches later: ``.clone()`` any batch you keep.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from gdnsq.config import DataConfig
from gdnsq.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_problem,
    open_imagefolder,
    world_and_rank,
)
from gdnsq.errors import DataError

# FFCV normalises uint8 pixels, so the ImageNet statistics are scaled to [0, 255].
_MEAN_255 = np.array(IMAGENET_MEAN) * 255
_STD_255 = np.array(IMAGENET_STD) * 255

_IMAGE, _LABEL = "image", "label"

log = logging.getLogger("gdnsq")


def available_cpus() -> int:
    """CPUs this process may run on (respects cgroups/affinity, unlike ``os.cpu_count``)."""
    return len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------- writing


class _SafeSamples:
    """ImageFolder samples as (RGB uint8 array, label); an unreadable image is recorded, not raised.

    FFCV's writer waits for a sample counter that a crashed worker process never reaches, so an
    exception in a worker would hang the conversion forever. Instead the bad sample is flagged in shared
    memory (the first one's path and reason too), a 1x1 placeholder is written, and the parent applies the
    ``bad_images`` policy afterwards: a DataError naming the file, or the file written again without them.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.bad_path = mp.Array("c", 4096)  # shared with the forked writer processes
        self.bad = mp.RawArray("b", len(dataset))  # 1 where a sample could not be decoded (each index one writer)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        path, label = self.dataset.samples[i]
        try:
            image = np.asarray(self.dataset.loader(path), dtype=np.uint8)
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"shape {image.shape}")
        except Exception as e:  # any decode failure, named in the parent's one-line error
            self.bad[i] = 1
            with self.bad_path.get_lock():
                if not self.bad_path.value:
                    self.bad_path.value = f"{path} ({decode_problem(e)})".encode()[:4000]
            return np.zeros((1, 1, 3), np.uint8), label
        return image, label


def write_beton(
    src_dir: str | Path,
    out_path: str | Path,
    *,
    max_resolution: int = 256,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    num_workers: int | None = None,
    progress: bool = True,
    bad_images: str = "error",
) -> Path:
    """Convert one ImageFolder split (a folder per class) into ``out_path`` (.beton).

    Images are resized so their longer side is at most ``max_resolution`` and stored as JPEG
    with probability ``compress_probability`` (else raw pixels: faster to decode, bigger file).
    The file appears under its final name only when complete. An image that cannot be decoded is a
    DataError naming it (``bad_images="error"``, as ``data.bad_images``), or is left out (``"skip"``: the
    split is written a second time without it, and a warning counts what was left out).
    """
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    src_dir, out_path = Path(src_dir), Path(out_path)
    samples = _SafeSamples(open_imagefolder(src_dir))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    workers = max(1, min(num_workers or available_cpus(), len(samples)))

    def write(indices: np.ndarray) -> None:
        writer = ffcv.writer.DatasetWriter(
            str(tmp),
            {
                _IMAGE: RGBImageField(
                    write_mode="proportion",
                    max_resolution=max_resolution,
                    jpeg_quality=jpeg_quality,
                    compress_probability=compress_probability,
                ),
                _LABEL: IntField(),
            },
            num_workers=workers,
        )
        # Small chunks keep every writer process busy on small datasets.
        writer.from_indexed_dataset(samples, indices, chunksize=max(1, min(100, len(indices) // (4 * workers))))

    # FFCV's writer has no switch for its tqdm bar; swap the module's name for the call.
    real_tqdm = ffcv.writer.tqdm
    if not progress:
        ffcv.writer.tqdm = lambda *a, **k: real_tqdm(*a, **{**k, "disable": True})
    try:
        write(np.arange(len(samples)))
        bad = np.flatnonzero(np.frombuffer(samples.bad, dtype=np.int8))
        if bad.size:
            first = samples.bad_path.value.decode(errors="replace")
            if bad_images != "skip" or bad.size == len(samples):
                more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
                raise DataError(
                    f"unreadable image {first}{more}; replace or remove it, or pass --bad-images skip"
                    if bad_images != "skip"
                    else f"{src_dir}: no readable image (e.g. {first})"
                )
            write(np.setdiff1d(np.arange(len(samples)), bad))
            log.warning("%s: left out %d unreadable image(s), e.g. %s", src_dir, bad.size, first)
        open_beton(tmp)  # the file we just wrote must pass the loader's own checks
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        ffcv.writer.tqdm = real_tqdm
    return out_path


def write_imagenet(src_root: str | Path, out_dir: str | Path, **opts) -> tuple[Path, Path]:
    """Convert ``src_root/train`` and ``src_root/val`` into ``out_dir/{train,val}.beton``.

    Both splits are checked (present, non-empty, same class folders) before anything is
    written, so a bad val split does not leave a lone train.beton. ``opts`` go to write_beton.
    """
    src_root, out_dir = Path(src_root), Path(out_dir)
    train = open_imagefolder(src_root / "train")
    val = open_imagefolder(src_root / "val")
    if val.classes != train.classes:
        # ImageFolder numbers classes by sorted folder name: different sets would shift labels.
        missing = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise DataError(f"{src_root}: train/ and val/ class folders differ (e.g. {', '.join(missing)})")
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out = []
    try:
        for name in ("train", "val"):
            path = out_dir / f"{name}.beton"
            write_beton(src_root / name, path, **opts)
            out.append(path)
    except BaseException:  # a failed write leaves nothing: no lone train.beton, no empty folders
        for path in out:
            path.unlink(missing_ok=True)
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return out[0], out[1]


# ------------------------------------------------------------------------------------- reading


def open_beton(path: str | Path):
    """Open a .beton with FFCV's Reader after checking it is complete; DataError otherwise.

    FFCV's Reader reads with ``np.fromfile(count=...)``, which silently returns short arrays
    on a truncated file, so the sizes are checked against the header here.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a .beton file (data.kind=imagefolder reads folders)")
    if not path.is_file():
        raise DataError(f"no such .beton file: {path}")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise DataError(f"{path} is not a .beton file (only {size} bytes)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise DataError(f"{path} is not a .beton file of version {CURRENT_VERSION} (header says {header['version']})")
    table_ptr, table_bytes = int(header["alloc_table_ptr"]), size - int(header["alloc_table_ptr"])
    if table_bytes <= 0 or table_bytes % ALLOC_TABLE_TYPE.itemsize:
        raise DataError(f"{path} is truncated or corrupt (allocation table at byte {table_ptr}, file has {size})")
    try:
        reader = Reader(str(path))
    except Exception as e:  # unknown field type ids, bad descriptors
        raise DataError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    n, table = int(reader.num_samples), reader.alloc_table
    if len(reader.metadata) != n or n == 0:
        raise DataError(f"{path} is truncated or empty ({len(reader.metadata)} of {n} samples)")
    if np.unique(table["sample_id"]).size != n or int((table["ptr"] + table["size"]).max()) > table_ptr:
        raise DataError(f"{path} is truncated or corrupt (allocation table does not cover its {n} samples)")
    kinds = {name: type(h) for name, h in reader.handlers.items()}
    if kinds.get(_IMAGE) is not RGBImageField or kinds.get(_LABEL) is not IntField:
        raise DataError(f"{path} needs fields image (RGBImageField) and label (IntField), has {list(kinds)}")
    return reader


def _labels(reader) -> np.ndarray:
    # Labels sit in the per-sample metadata (no data pages touched): fields are named f0, f1, ...
    return reader.metadata[f"f{reader.field_names.index(_LABEL)}"]


def beton_num_classes(path: str | Path) -> int:
    """Class count of a .beton: the largest label + 1."""
    return int(_labels(open_beton(path)).max()) + 1


def _order(cfg: DataConfig, distributed: bool):
    from ffcv.loader import OrderOption

    if cfg.os_cache:
        return OrderOption.RANDOM, True
    if distributed:
        warnings.warn(
            "data.os_cache=False is not supported with distributed FFCV loading "
            "(QUASI_RANDOM raises); using RANDOM over the OS page cache",
            stacklevel=3,
        )
        return OrderOption.RANDOM, True
    return OrderOption.QUASI_RANDOM, False


def create_ffcv_loaders(
    cfg: DataConfig,
    *,
    distributed: bool,
    device: torch.device,
    seed: int,
    epoch: int = 0,
    normalize_on_device: bool | None = None,
):
    """Train and val FFCV loaders for ``cfg.train_path`` / ``cfg.val_path``.

    Returns ``(train_loader, val_loader, num_classes)``. Batches are ``(images, labels)``:
    images float32 NCHW normalised with the ImageNet mean/std (channels_last memory), labels
    int64 ``(B,)``, both on ``device``. With ``distributed`` (torch.distributed initialised)
    each rank reads its own share. Train drops the last partial batch; val keeps it.
    ``normalize_on_device`` (default: on CUDA) selects the GPU pipeline order of the module docstring;
    it runs on a CPU ``device`` too (tests). ``cfg.num_workers`` None means the CPUs this process may use.
    """
    from ffcv.fields.decoders import (
        CenterCropRGBImageDecoder,
        IntDecoder,
        RandomResizedCropRGBImageDecoder,
    )
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import (
        NormalizeImage,
        RandomHorizontalFlip,
        Squeeze,
        ToDevice,
        ToTensor,
        ToTorchImage,
    )

    if cfg.img_size > cfg.val_resize:
        raise DataError(f"data.img_size ({cfg.img_size}) must be <= data.val_resize ({cfg.val_resize})")
    train_reader, val_reader = open_beton(cfg.train_path), open_beton(cfg.val_path)
    num_classes = int(_labels(train_reader).max()) + 1
    if int(_labels(val_reader).max()) >= num_classes:
        raise DataError(
            f"{cfg.val_path} has labels up to {int(_labels(val_reader).max())}, "
            f"but {cfg.train_path} has only {num_classes} classes"
        )
    world, _ = world_and_rank(distributed)
    if train_reader.num_samples // world < cfg.batch_size:
        raise DataError(
            f"{cfg.train_path} has {train_reader.num_samples} samples for {world} rank(s), "
            f"fewer than one batch of data.batch_size={cfg.batch_size} per rank"
        )

    on_gpu = device.type == "cuda"
    to_device = [ToDevice(device, non_blocking=True)] if on_gpu else []
    if normalize_on_device is None:
        normalize_on_device = on_gpu

    def image_pipeline(decoder, *augment):
        if normalize_on_device:
            from .ffcv_ops import NormalizeOnDevice

            # uint8 to the device, permute there, normalise there (not jitted: may follow ToTensor).
            return [
                decoder,
                *augment,
                ToTensor(),
                ToDevice(device, non_blocking=True),
                ToTorchImage(),
                NormalizeOnDevice(_MEAN_255, _STD_255),
            ]
        # NormalizeImage before ToTensor: a jitted op after ToTensor hangs Loader() (PITFALLS).
        return [
            decoder,
            *augment,
            NormalizeImage(_MEAN_255, _STD_255, np.float32),
            ToTensor(),
            *to_device,
            ToTorchImage(),
        ]

    def label_pipeline():
        return [IntDecoder(), ToTensor(), Squeeze(), *to_device]

    order, os_cache = _order(cfg, distributed)
    workers = cfg.num_workers if cfg.num_workers is not None else available_cpus()
    common = dict(batch_size=cfg.batch_size, num_workers=workers, distributed=distributed, seed=seed)
    train = Loader(
        str(cfg.train_path),
        order=order,
        os_cache=os_cache,
        drop_last=True,
        **common,
        pipelines={
            _IMAGE: image_pipeline(
                RandomResizedCropRGBImageDecoder((cfg.img_size, cfg.img_size)), RandomHorizontalFlip()
            ),
            _LABEL: label_pipeline(),
        },
    )
    val = Loader(
        str(cfg.val_path),
        order=OrderOption.SEQUENTIAL,
        os_cache=True,
        drop_last=False,
        **common,
        pipelines={
            _IMAGE: image_pipeline(
                CenterCropRGBImageDecoder((cfg.img_size, cfg.img_size), ratio=cfg.img_size / cfg.val_resize)
            ),
            _LABEL: label_pipeline(),
        },
    )
    train.next_epoch = epoch  # FFCV shuffles for `next_epoch` on the next pass, then advances it
    return train, val, num_classes
