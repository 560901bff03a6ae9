"""The run path, top to bottom: identity -> pre-flight -> the executor the config names (Ray Train by default,
in-process with ``ray.enabled: false``). ``gdnsq train`` / ``quickstart`` and the public ``gdnsq.run`` call
:func:`run`."""

from __future__ import annotations

from ..config import JobConfig
from ..errors import RunIdentityError
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
