"""A run's identity: its name, its folder (held by one live run at a time), and whether a stored run can be
resumed or is already finished.

Shared by both executors (in-process and Ray Train) and by sweeps; imports no Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import JobConfig, to_dict
from ..errors import RunIdentityError
from ..training.checkpoint import check_identity, fingerprint
from .storage import SUMMARY_FILE, read_json, storage_root

log = logging.getLogger("gdnsq")

# A default name keeps this much of the model name: enough to recognise it, short enough for a path component.
MODEL_NAME_CHARS = 40


def with_run_name(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its run name: the given one, else '<model>-w<W>a<A>-<8 hex digits of the fingerprint>'.

    The same defining settings give the same name (running them again resumes or returns the finished
    run); any other defining setting gives another name, so default-named runs never collide.
    """
    if cfg.name:
        return cfg
    # One safe folder name whatever the model is called (an hf-hub path, a leading dot): see run_name_problem.
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.name.rsplit("/", 1)[-1]).lstrip(".")[:MODEL_NAME_CHARS]
    model = model or "model"
    name = f"{model}-w{cfg.quant.target_w:g}a{cfg.quant.target_a:g}-{fingerprint(to_dict(cfg))[:8]}"
    return dataclasses.replace(cfg, name=name)


def run_dir(cfg: JobConfig) -> str:
    return f"{storage_root(cfg).rstrip('/')}/{cfg.name}"


def finished(cfg: JobConfig, ckpt: dict) -> bool:
    """Whether the checkpointed run has nothing left to train under ``cfg`` (epochs done or stopped early)."""
    done = int(ckpt["engine"]["epoch"]) >= cfg.train.epochs
    return done or bool(cfg.train.patience and ckpt.get("stale", 0) >= cfg.train.patience)


def stored_summary(cfg: JobConfig, ckpt: dict | None, folder: str) -> dict | None:
    """The "already finished" rule, one place for both executors: a stored checkpoint trained with other
    defining settings is refused (one line); a finished one with a stored summary returns that summary (nothing
    is trained); otherwise None (train, resuming from ``ckpt`` when there is one)."""
    if ckpt is None:
        return None
    check_identity(to_dict(cfg), ckpt, folder)
    summary = read_json(f"{folder.rstrip('/')}/{SUMMARY_FILE}")
    if finished(cfg, ckpt) and summary is not None:
        log.info(
            "run %s already finished (epoch %d): its stored summary, nothing trained", cfg.name, ckpt["engine"]["epoch"]
        )
        return summary
    log.info("%s: resuming from the checkpoint of epoch %d", cfg.name, ckpt["engine"]["epoch"])
    return None


def set_aside(cfg: JobConfig) -> str | None:
    """``--fresh``: move an existing run folder to '<name>.old-<time>' (nothing trained is deleted)."""
    folder = run_dir(cfg)
    if "://" in folder:
        raise RunIdentityError(f"--fresh: cannot move the remote run {folder}; pass --name NEW instead")
    if not Path(folder).exists():
        return None
    aside = f"{folder}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(folder).rename(aside)
    log.warning("--fresh: the earlier run %s was moved to %s", cfg.name, aside)
    return aside


# The lock a live run holds in its folder. An fcntl lock (filelock's UnixFileLock): the kernel releases it when the
# holding process ends in any way, SIGKILL included, so a killed run never blocks the next one.
LOCK_FILE = ".gdnsq.lock"


@contextlib.contextmanager
def own_folder(cfg: JobConfig, *, fresh: bool = False) -> Iterator[None]:
    """Hold the run's folder for the run's life (on the driver, for Ray): a second live run of the same name is
    refused in one line. ``fresh``: the existing folder is set aside (:func:`set_aside`) while held, and the new
    folder is held in its place. Remote storage (``s3://``) takes no lock: filelock needs a local or mounted
    file system."""
    folder = run_dir(cfg)
    if "://" in folder:
        if fresh:
            set_aside(cfg)
        yield
        return
    lock = _lock(cfg, folder)  # makes the folder when there was none: a folder holding only a lock is no earlier run
    try:
        earlier = any(p.name != LOCK_FILE for p in Path(folder).iterdir())
        if fresh and earlier and set_aside(cfg) is not None:  # the lock file moved with the old folder: hold the new
            old, lock = lock, _lock(cfg, folder)
            old.release()
        yield
    finally:
        lock.release()


def _lock(cfg: JobConfig, folder: str):
    from filelock import FileLock, Timeout

    from ..errors import StorageError

    path = Path(folder) / LOCK_FILE

    def note_owner(fd: int) -> None:  # who holds it, for the refusal's line
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=0, on_acquired=note_owner)
        lock.acquire()
    except Timeout:
        try:
            owner = path.read_text().strip() or "another process"
        except OSError:
            owner = "another process"
        raise RunIdentityError(
            f"name: run {cfg.name!r} is already running ({owner} holds {path}); wait for it to end, "
            "or pass --name NEW for another run"
        ) from None
    except OSError as e:
        raise StorageError(f"ray.storage_path: cannot lock {path} ({e.strerror or type(e).__name__})") from None
    return lock
