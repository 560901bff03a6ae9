"""The run path, top to bottom: identity -> pre-flight -> the executor the config names (Ray Train by default,
in-process with ``ray.enabled: false``). ``gdnsq train`` / ``quickstart`` and the public ``gdnsq.run`` call
:func:`run`."""

from __future__ import annotations

from pathlib import Path

from ..config import JobConfig, to_dict
from ..errors import RunIdentityError
from ..training.checkpoint import CHECKPOINT_FILE, check_identity, load_latest
from .identity import run_dir, set_aside, with_run_name
from .preflight import check_storage, preflight
from .storage import exists, storage_root


def run(cfg: JobConfig, *, fresh: bool = False, resume: bool = False) -> dict:
    """Run a job and return its summary. ``resume``: the named run must exist; ``fresh``: an existing one is set
    aside first (``<name>.old-<time>``). Otherwise a run of the same name resumes, or returns its stored summary
    when it had finished; a stored run with other defining settings is refused in one line."""
    cfg, _ = preflight(with_run_name(cfg))
    check_storage(cfg)
    if resume and not exists(run_dir(cfg)):
        raise RunIdentityError(f"--resume: no run {cfg.name!r} under {storage_root(cfg)}")
    if fresh:
        set_aside(cfg)
    if cfg.ray.enabled:
        from .ray_train import fit

        return fit(cfg)
    from .local import run_local

    return run_local(cfg)


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
