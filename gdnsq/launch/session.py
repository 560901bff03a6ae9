"""What a run records, written once for both executors (nanoGPT's ``master_process`` block).

A :class:`RunSession` lives in the process that trains: in-process, or inside every Ray Train worker, where only
rank 0's session records anything. Its MLflow run starts at the first epoch (a worker that dies before its first
checkpoint leaves no run behind) or reattaches to the run its resumed checkpoint names; each epoch gets the console
line, the metrics and bits table, and leaves in the checkpoint what a restart needs to reattach. After the run,
:func:`register_run` registers the best converged student (in-process: here; Ray: on the driver, which holds the
final checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..config import JobConfig

# Seconds an epoch waits for its metrics to reach the store before its checkpoint claims the epoch (a process
# killed right after would otherwise lose them from its outbox); once the store proved unreachable, no wait.
EPOCH_FLUSH_S = 30.0
# Seconds a failing run spends delivering what it logged; its MLflow run stays RUNNING for a restart to reattach.
ABORT_FLUSH_S = 10.0


def with_tracking_uri(cfg: JobConfig) -> JobConfig:
    """``cfg`` with ``tracking.uri`` resolved as this process means it (explicit, else $MLFLOW_TRACKING_URI, else
    the default sqlite store under this working directory), for a session in a process whose cwd differs."""
    if not cfg.tracking.enabled:
        return cfg
    from ..tracking.store import resolve_tracking_uri

    return dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, uri=resolve_tracking_uri(cfg.tracking.uri))
    )


class RunSession:
    """Rank 0's record of one run: console progress, the MLflow run and what a checkpoint keeps to reattach.
    ``cfg.tracking.uri`` must be resolved (:func:`with_tracking_uri`).

    ``progress`` (a :class:`gdnsq.launch.console.Progress`, or None) draws the epoch lines; ``parent_run_id``
    nests the MLflow run under a sweep's. A session of another rank records nothing.
    """

    def __init__(
        self,
        cfg: JobConfig,
        resume: dict | None,
        *,
        rank: int = 0,
        parent_run_id: str | None = None,
        progress=None,
    ):
        self.cfg, self.resume = cfg, resume or {}
        self.is_main = rank == 0
        self.tracking = self.is_main and cfg.tracking.enabled
        self.parent_run_id = parent_run_id
        self.progress = progress if self.is_main else None
        self.tracker = None
        self.reachable = True

    def _get_tracker(self):
        if self.tracker is None:
            from ..tracking.run import create_tracker

            run_id = self.resume.get("mlflow_run_id")
            self.tracker = create_tracker(
                self.cfg, run_id=run_id, parent_run_id=self.parent_run_id, state=self.resume.get("tracker")
            )
            if run_id is None:
                self.tracker.log_config(self.cfg)
        return self.tracker

    def on_epoch_start(self, epoch: int, steps: int | None) -> None:
        if self.progress is not None:
            self.progress.epoch_start(epoch, steps)

    def on_step(self, step: int, parts: dict) -> None:
        if self.progress is not None:
            self.progress.step(step, parts)

    def record_epoch(self, metrics: dict, table: list[dict], state: dict) -> dict:
        """One finished epoch: its console line, its metrics and bits table in MLflow (waited for, boundedly),
        and the MLflow run's id and outbox state put into ``state``, the epoch's checkpoint. Returns ``state``."""
        if not self.is_main:
            return state
        if self.progress is not None:
            self.progress.epoch_end(metrics)
        if self.tracking:
            tracker = self._get_tracker()
            tracker.log_epoch(int(metrics["epoch"]), {k: float(v) for k, v in metrics.items()}, table)
            self.reachable = tracker.flush(EPOCH_FLUSH_S if self.reachable else 0.0)
            state.update(mlflow_run_id=tracker.run_id, tracker=tracker.state_dict())
        return state

    def abort(self) -> None:
        """The run failed: deliver what was logged (bounded), leave the MLflow run RUNNING for a restart."""
        if self.tracker is not None:
            self.tracker.flush(ABORT_FLUSH_S)

    def finish(self, summary: dict) -> str | None:
        """Log the summary and end the MLflow run; returns its id (None without tracking or off rank 0)."""
        if not self.tracking:
            return None
        tracker = self._get_tracker()
        tracker.log_summary(summary)
        run_id = tracker.run_id
        tracker.finish("FINISHED")
        return run_id


def register_run(
    cfg: JobConfig, summary: dict, run_id: str | None, load_state: Callable[[], dict], checkpoint_path: str
) -> dict:
    """After a run, on either executor: ``{mlflow_run_id, registered_model}`` for the summary. The best converged
    student of the final checkpoint (``load_state()``, read only when it will be registered) is registered under
    the champion rule when ``tracking.register`` is on."""
    if not run_id:
        return {}
    out = {"mlflow_run_id": run_id}
    from .register import register_checkpoint, registrable

    if cfg.tracking.register and registrable(summary, cfg.name):
        out["registered_model"] = register_checkpoint(
            cfg, load_state(), summary, run_id, what=cfg.name, checkpoint_path=checkpoint_path
        )
    return out
