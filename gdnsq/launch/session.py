"""What a run records, written once for both executors (nanoGPT's ``master_process`` block).

A :class:`RunSession` lives in the process that trains: in-process, or inside every Ray Train worker, where only
rank 0's session records anything. Its MLflow run starts at the first epoch (a worker that dies before its first
checkpoint leaves no run behind) or reattaches to the run its resumed checkpoint names; each epoch gets the console
line, the metrics and bits table once its checkpoint is saved, and leaves in the checkpoint what a restart needs to
reattach and to deliver that epoch's metrics again. After the run,
:func:`register_run` registers the best converged student (in-process: here; Ray: on the driver, which holds the
final checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..config import JobConfig

# Seconds an epoch waits, once its checkpoint is saved, for its metrics to reach the store (an outbox left by a
# killed process is delivered again by the resumed run, from the checkpoint). A store that does not answer costs
# each wait one delivery attempt at most (gdnsq.tracking.outbox), not these seconds.
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
        self.record: dict | None = None  # the epoch recorded in the checkpoint being saved, logged once it is

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
        """One finished epoch, before its checkpoint is saved: the MLflow run's id, its outbox state and the epoch's
        metrics and bits table (timestamped, not logged yet) put into ``state``, the epoch's checkpoint. Returns
        ``state``; :meth:`epoch_saved` shows and logs the epoch once the checkpoint holds it."""
        if not self.is_main:
            return state
        if self.tracking:
            tracker = self._get_tracker()
            if tracker.run_id is None:  # the checkpoint should name the run a restart reattaches to
                tracker.outbox.wait_run_id(EPOCH_FLUSH_S)
            self.record = tracker.epoch_record(int(metrics["epoch"]), {k: float(v) for k, v in metrics.items()}, table)
            state.update(mlflow_run_id=tracker.run_id, tracker=tracker.state_dict())
        return state

    def epoch_saved(self, metrics: dict) -> None:
        """The epoch's checkpoint is saved (Ray: registered, the one a restart resumes from): its console line and
        its metrics in MLflow (waited for, boundedly). An epoch shown or logged is never redone after a restart,
        and an epoch redone was never logged (no metric twice in the store)."""
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.epoch_end(metrics)
        if self.tracking and self.record is not None:
            self.tracker.log_record(self.record)
            self.record = None
            self.tracker.flush(EPOCH_FLUSH_S)

    def abort(self, *, interrupted: bool = False) -> None:
        """The run failed: deliver what was logged (bounded), leave the MLflow run RUNNING for a restart to
        reattach. ``interrupted`` (Ctrl-C, SIGTERM): the MLflow run ends KILLED (a restart sets it RUNNING
        again)."""
        if self.tracker is None:
            return
        if interrupted:
            self.tracker.finish("KILLED", timeout=ABORT_FLUSH_S)
        else:
            self.tracker.flush(ABORT_FLUSH_S)

    def finish(self, summary: dict) -> str | None:
        """Log the summary and end the MLflow run; returns its id (None without tracking or off rank 0)."""
        if not self.tracking:
            return None
        tracker = self._get_tracker()
        tracker.log_summary(summary)
        tracker.finish("FINISHED")
        return tracker.run_id  # after finish's bounded wait: known unless the store never answered


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
