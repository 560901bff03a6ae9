"""The run path, top to bottom: identity -> pre-flight -> the executor the config names (Ray Train by default,
in-process with ``ray.enabled: false``). ``gdnsq train`` / ``quickstart`` and the public ``gdnsq.run`` call
:func:`run`.

What both executors share around training lives here: the run's folder is held for the run's life (a second live
run of the same name is refused), and Ctrl-C (SIGINT) or SIGTERM on the driver ends the run with one line, a
:class:`RunInterrupted` naming the last saved epoch, from which the same command resumes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from ..config import JobConfig, to_dict
from ..errors import RunIdentityError
from ..training.checkpoint import CHECKPOINT_FILE, check_identity, load_latest
from .identity import own_folder, run_dir, with_run_name
from .preflight import check_storage, preflight
from .storage import exists, storage_root


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; ``signum`` is the signal, the message the one line for the user.

    A KeyboardInterrupt, so nothing that catches ``Exception`` on the way up swallows it; the CLI prints it and
    exits with 128 + ``signum`` (130, 143): the shell's and schedulers' code for "ended by that signal", which
    a script tells apart from bad input (2).
    """

    def __init__(self, signum: int, line: str = ""):
        super().__init__(line)
        self.signum = signum


def run(cfg: JobConfig, *, fresh: bool = False, resume: bool = False) -> dict:
    """Run a job and return its summary. ``resume``: the named run must exist; ``fresh``: an existing one is set
    aside first (``<name>.old-<time>``). Otherwise a run of the same name resumes, or returns its stored summary
    when it had finished; a stored run with other defining settings is refused in one line, and so is a second
    live run of the same name (the first holds the run's folder, :func:`gdnsq.launch.identity.own_folder`).
    SIGINT / SIGTERM raise :class:`RunInterrupted`."""
    cfg, _ = preflight(with_run_name(cfg))
    check_storage(cfg)
    if resume and not exists(run_dir(cfg)):
        raise RunIdentityError(f"--resume: no run {cfg.name!r} under {storage_root(cfg)}")
    if cfg.ray.enabled:
        from .ray_checkpoints import check_existing_run, saved_epoch
        from .ray_train import fit as execute
    else:
        from .local import check_existing_run, saved_epoch
        from .local import run_local as execute
    if not fresh:
        # Before the folder is held (which writes its lock file): a refusal or a finished run writes nothing.
        stored = check_existing_run(cfg)
        if stored is not None:
            return stored
    with own_folder(cfg, fresh=fresh):
        received: list[int] = []
        try:
            with signals_interrupt(received):
                return execute(cfg)  # checks the stored run again, now that no other run can write it
        except KeyboardInterrupt as e:
            epoch = saved_epoch(cfg)
            again = "the same command without --fresh" if fresh else "the same command"
            line = (
                f"interrupted after epoch {epoch} of {cfg.train.epochs}; {again} resumes"
                if epoch
                else f"interrupted before epoch 1 of {cfg.train.epochs} ended; {again} starts it again"
            )
            # The signal as received: what reaches here may be another KeyboardInterrupt (Ray's get raises its own)
            signum = received[-1] if received else getattr(e, "signum", signal.SIGINT)
            raise RunInterrupted(signum, line) from None


@contextlib.contextmanager
def signals_interrupt(received: list[int] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`RunInterrupted` in the main thread (SIGTERM's default would end the process
    without cleanup: no lock released in order, no MLflow run ended, Ray's workers left to die on their own);
    ``received`` gets each signal's number. Elsewhere than the main thread (a sweep trial) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        if received is not None:
            received.append(signum)
        raise RunInterrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_run(cfg: JobConfig, *, fresh: bool = False, resume: bool = False) -> tuple[JobConfig, list[str]]:
    """``--dry-run``: every check :func:`run` makes before its executor starts (name, pre-flight, storage, the stored
    run's identity), with nothing trained, moved or left behind. Returns the config the run would use and what
    was found, one line each; a problem raises as it would in :func:`run`."""
    cfg, facts = preflight(with_run_name(cfg))
    found = []
    if facts is not None:
        found.append(
            f"data: {facts.train.size:,} training / {facts.val.size:,} validation samples, {facts.num_classes} classes"
        )
    folder = run_dir(cfg)
    if "://" in folder:
        found.append(f"storage: {folder} (remote: not checked without the cluster)")
        return cfg, found
    check_storage(cfg)
    stored = Path(folder).exists()
    if resume and not stored:
        raise RunIdentityError(f"--resume: no run {cfg.name!r} under {storage_root(cfg)}")
    if stored and not fresh and (Path(folder) / CHECKPOINT_FILE).is_file():
        ckpt = load_latest(Path(folder) / CHECKPOINT_FILE)
        if ckpt is not None:
            check_identity(to_dict(cfg), ckpt, folder)
    state = "set aside by --fresh, then new" if stored and fresh else "resumed" if stored else "new"
    found.append(f"storage: {folder} ({state})")
    return cfg, found
