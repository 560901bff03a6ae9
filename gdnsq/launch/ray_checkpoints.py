"""A Ray run's checkpoint folder, seen from the driver: the checkpoint the run resumes from, the epoch Ray
registered last, the run's identity checked before Ray starts, and the clean-up after an interrupt (workers ended
through Ray's controller, checkpoint folders Ray never registered removed)."""

from __future__ import annotations

import logging

from ..config import JobConfig
from .identity import run_dir, stored_summary
from .ray_worker import load_resume_checkpoint

log = logging.getLogger("gdnsq")


def latest_checkpoint(folder: str):
    """The Ray Train checkpoint that a run in ``folder`` resumes from (Ray's own snapshot), or None."""
    from ray.train import Result

    from .storage import exists

    if not exists(folder):
        return None
    try:
        return Result.from_path(folder).checkpoint
    except RuntimeError:  # a folder without Ray's checkpoint snapshot: Ray starts the run afresh
        return None


# Seconds the driver waits for Ray's controller to end the workers after an interrupt.
ABORT_TIMEOUT_S = 30.0


def stop_trainer(trainer, folder: str) -> None:
    """After an interrupt on the driver: end the run's workers through Ray's controller (bounded), then remove the
    checkpoint folders Ray never registered (:func:`remove_orphan_checkpoints`)."""
    import ray

    controller = getattr(trainer, "controller", None)
    if controller is not None:
        try:
            ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the controller ends itself in abort(): its actor error is the success
            pass
    remove_orphan_checkpoints(folder)


def remove_orphan_checkpoints(folder: str) -> list[str]:
    """Remove the ``checkpoint_*`` folders of ``folder`` that Ray's checkpoint snapshot does not list: a worker
    stopped between its upload and the controller's registration left them. Ray never resumes from them nor
    deletes them, and their epoch was neither shown nor logged (ray_worker._wait_registered). Called only where
    no live run writes the folder: after its trainer stopped, and before a run starts (the driver holds the
    run's folder, :func:`gdnsq.launch.identity.own_folder`). Returns the paths removed."""
    import pyarrow.fs
    from ray.train import Result

    from .storage import exists, fs_of

    if not exists(folder):
        return []
    fs, path = fs_of(folder)
    found = [
        i.path.rstrip("/")
        for i in fs.get_file_info(pyarrow.fs.FileSelector(path))
        if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
    ]
    if not found:
        return []
    try:
        result = Result.from_path(folder)
        registered = {c.path.rstrip("/") for c, _ in result.best_checkpoints}
    except RuntimeError:  # no snapshot: nothing was ever registered
        registered = set()
    orphans = [p for p in found if p not in registered]
    for orphan in orphans:
        fs.delete_dir(orphan)
        log.info("removed %s: a checkpoint Ray Train never registered (its epoch is trained again)", orphan)
    return orphans


def saved_epoch(cfg: JobConfig) -> int:
    """The last epoch whose checkpoint Ray registered (what the same command resumes from); 0 when none."""
    from ray.train import Result

    try:
        return int((Result.from_path(run_dir(cfg)).metrics or {}).get("epoch", 0))
    except (RuntimeError, OSError):
        return 0


def check_existing_run(cfg: JobConfig) -> dict | None:
    """On the driver, before Ray starts: :func:`gdnsq.launch.identity.stored_summary` of the run's latest Ray
    checkpoint (refuse other defining settings; a finished run returns its stored summary)."""
    folder = run_dir(cfg)
    checkpoint = latest_checkpoint(folder)
    return stored_summary(cfg, None if checkpoint is None else load_resume_checkpoint(checkpoint), folder)
