"""Rank 0's checkpoint staged for ``ray.train.report``: written into a temporary folder that Ray copies to the run's
storage, a failed write turned into the same one line on every rank, and folders left by killed workers removed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..training.checkpoint import CHECKPOINT_FILE, save_checkpoint

STAGING_PREFIX = "gdnsq-ckpt-"


@contextlib.contextmanager
def staged_checkpoint(state: dict) -> Iterator[str]:
    """Rank 0's checkpoint written into a temporary folder for ``ray.train.report`` (which copies it to the run's
    storage). A failed write (full disk, a file-size limit) is one StorageError line and leaves no file behind:
    :func:`save_checkpoint` removes its temporary file, and the folder goes with the ``with``. A worker killed
    while its folder existed (Ctrl-C on the driver ends workers with SIGKILL) left it behind: the next staging on
    that machine removes the folders of processes that no longer exist."""
    _remove_stale_staging()
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-") as folder:
        save_checkpoint(state, Path(folder) / CHECKPOINT_FILE, where=f"TMPDIR ({tempfile.gettempdir()})")
        yield folder


def _remove_stale_staging() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive (another user's): not ours to touch
            pass


def raise_on_every_rank(error: Exception | None, world_size: int) -> None:
    """Rank 0's failure (its checkpoint could not be staged) raised on every rank, so all of them return the same
    one line to the driver; a rank that went on alone would wait forever in the next collective."""
    import torch.distributed as dist

    from .. import errors

    message = [None if error is None else (type(error).__name__, str(error))]
    if world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        name, line = message[0]
        cls = getattr(errors, name, errors.StorageError)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.GdnsqError) else errors.StorageError)(line)
