"""The in-process executor (``ray.enabled: false``, ``--no-ray``): what differs from Ray is where the checkpoint
goes — one file, ``<storage>/<name>/checkpoint.pt`` (the previous one kept beside it) — and that registration runs
here, next to it. What the run records is :class:`gdnsq.launch.session.RunSession`'s, as on Ray."""

from __future__ import annotations

from pathlib import Path

from ..config import JobConfig
from ..training.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_latest, save_checkpoint
from ..training.job import run_job
from ..training.runtime import resolve_device
from . import console
from .identity import run_dir, stored_summary
from .session import RunSession, register_run, with_tracking_uri
from .storage import SUMMARY_FILE, write_json_atomic


def run_local(cfg: JobConfig) -> dict:
    """Train (or resume, or return the stored summary of a finished run) in this process; returns the summary."""
    folder = Path(run_dir(cfg))
    ckpt_path = folder / CHECKPOINT_FILE
    resume = load_latest(ckpt_path)
    stored = stored_summary(cfg, resume, str(folder))
    if stored is not None:
        return stored
    console.header(cfg, devices=f"in-process (no Ray), {resolve_device(cfg.train.device)}")
    # The session's store is resolved here, the checkpoint's config keeps what the user gave (no environment value
    # reaches a file).
    session = RunSession(with_tracking_uri(cfg), resume, progress=console.Progress(cfg))

    def on_epoch(metrics: dict, table: list[dict], get_checkpoint) -> None:
        save_checkpoint(session.record_epoch(metrics, table, get_checkpoint()), ckpt_path, keep_previous=True)

    try:
        summary = run_job(
            cfg, resume=resume, on_epoch=on_epoch, on_step=session.on_step, on_epoch_start=session.on_epoch_start
        )
    except BaseException:
        session.abort()
        raise
    summary["checkpoint"] = str(ckpt_path)
    run_id = session.finish(summary)
    summary.update(register_run(session.cfg, summary, run_id, lambda: load_checkpoint(ckpt_path), str(ckpt_path)))
    write_json_atomic(folder / SUMMARY_FILE, summary)
    return summary
