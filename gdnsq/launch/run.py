"""The run path, top to bottom: identity -> pre-flight -> the executor the config names (Ray Train by default,
in-process with ``ray.enabled: false``). ``gdnsq train`` / ``quickstart`` and the public ``gdnsq.run`` call
:func:`run`."""

from __future__ import annotations

from ..config import JobConfig
from ..errors import RunIdentityError
from .identity import own_folder, run_dir, with_run_name
from .preflight import check_storage, preflight
from .storage import exists, storage_root


def run(cfg: JobConfig, *, fresh: bool = False, resume: bool = False) -> dict:
    """Run a job and return its summary. ``resume``: the named run must exist; ``fresh``: an existing one is set
    aside first (``<name>.old-<time>``). Otherwise a run of the same name resumes, or returns its stored summary
    when it had finished; a stored run with other defining settings is refused in one line, and so is a second
    live run of the same name (the first holds the run's folder, :func:`gdnsq.launch.identity.own_folder`)."""
    cfg, _ = preflight(with_run_name(cfg))
    check_storage(cfg)
    if resume and not exists(run_dir(cfg)):
        raise RunIdentityError(f"--resume: no run {cfg.name!r} under {storage_root(cfg)}")
    if cfg.ray.enabled:
        from .ray_train import check_existing_run
        from .ray_train import fit as execute
    else:
        from .local import check_existing_run
        from .local import run_local as execute
    if not fresh:
        # Before the folder is held (which writes its lock file): a refusal or a finished run writes nothing.
        stored = check_existing_run(cfg)
        if stored is not None:
            return stored
    with own_folder(cfg, fresh=fresh):
        return execute(cfg)  # checks the stored run again, now that no other run can write it
