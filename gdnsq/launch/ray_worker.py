"""Ray Train worker side of a job: the per-worker loop, its checkpoints, reports and DDP wrap.

Every rank calls ``ray.train.report`` once per epoch (a barrier); rank 0 alone attaches ``checkpoint.pt``
and logs to MLflow. A user error (GdnsqError) is returned to the driver rather than raised, so Train V2
does not retry bad input ``ray.max_failures`` times. The driver is :mod:`gdnsq.launch.ray_train`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import JobConfig, config_from_dict
from ..training.checkpoint import CHECKPOINT_FILE, check_identity, load_checkpoint

log = logging.getLogger("gdnsq")

WORKER_OPTIONS = "_worker"  # train_loop_config key for worker-only options (not part of the JobConfig)


def load_ray_checkpoint(checkpoint) -> dict:
    """The gdnsq checkpoint dict inside a Ray Train ``Checkpoint`` (local or remote storage)."""
    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def load_resume_checkpoint(checkpoint) -> dict:
    """:func:`load_ray_checkpoint` of the checkpoint a run resumes from; when that one is torn or
    unreadable, the newest readable one before it in the run folder (``ray.checkpoints_to_keep`` >= 2
    keeps one), with a warning. Only when none is readable is it an error (one line)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from ..errors import ExportError

    try:
        return load_ray_checkpoint(checkpoint)
    except Exception as e:  # noqa: BLE001 - torn, truncated, missing file: all mean "not usable"
        first = e
    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent = latest.rsplit("/", 1)[0]
    infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted(
        (
            i.path
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and i.path.rstrip("/") < latest
        ),
        reverse=True,
    )
    for path in older:
        try:
            state = load_ray_checkpoint(Checkpoint(path, filesystem=fs))
        except Exception:  # noqa: BLE001
            continue
        log.warning(
            "checkpoint %s is unreadable (%s): resuming from the one before it, %s (epoch %d)",
            latest,
            type(first).__name__,
            path,
            state["engine"]["epoch"],
        )
        return state
    raise ExportError(
        f"{latest}: the run's latest checkpoint is unreadable ({type(first).__name__}) and no "
        "earlier one is; pass --fresh to set the run aside"
    ) from None


# ------------------------------------------------------------------------------------- worker


def state_checksum(state: dict[str, torch.Tensor]) -> float:
    """A 48-bit hash of a state dict's names and exact bytes, as a float (exact in float64)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return float(int.from_bytes(h.digest()[:6], "big"))


def rank_metrics(model_state: dict, node_id: str, cpu_s: float, world_size: int) -> dict[str, float]:
    """Gathered from every rank: state checksums (equal = identical DDP replicas), nodes, CPU time.

    ``sys/cpu_s`` is the CPU time all workers spent since the previous report: samples per CPU
    second compare runs fairly on a machine that other work keeps busy.
    """
    import torch.distributed as dist

    mine = (state_checksum(model_state), node_id, cpu_s)
    gathered = [mine]
    if world_size > 1 and dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
    out = {f"dist/checksum/r{r}": c for r, (c, _, _) in enumerate(gathered)}
    out["dist/replicas_equal"] = float(len({c for c, _, _ in gathered}) == 1)
    out["dist/num_nodes"] = float(len({n for _, n, _ in gathered}))
    out["sys/cpu_s"] = float(sum(t for _, _, t in gathered))
    return out


def _load_resume() -> dict | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else load_resume_checkpoint(checkpoint)


def _wait_report_taken(timeout: float = 60.0) -> None:
    """Block (bounded) until Ray's controller has taken this rank's last report.

    ``ray.train.report`` returns once the result is queued in this process; the controller takes it
    at its next poll (every ~2 s) and registers the checkpoint only when every rank's report is in.
    A worker that died in between lost that checkpoint: the restart resumed from the one before and
    left an orphan checkpoint folder and MLflow run. Reads Ray's internal result queue; if that is
    not there (another Ray version), it does not wait.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        result_queue = get_train_context().get_result_queue()
    except Exception:  # noqa: BLE001 - internal API: degrade to Ray's own behaviour
        return
    deadline = time.monotonic() + timeout
    while getattr(result_queue, "unfinished_tasks", 0) and time.monotonic() < deadline:
        time.sleep(0.05)


class _LazyTracker:
    """Rank 0's MLflow run, started at its first use (so a worker that dies before its first
    checkpoint leaves no run behind), or reattached to the run named in the resumed checkpoint."""

    def __init__(self, cfg: JobConfig, resume: dict | None, parent_run_id: str | None = None):
        self.cfg, self.resume, self.tracker = cfg, resume or {}, None
        self.parent_run_id = parent_run_id
        self.reachable = True

    def get(self):
        if self.tracker is None:
            from ..tracking.run import create_tracker

            run_id = self.resume.get("mlflow_run_id")
            self.tracker = create_tracker(
                self.cfg, run_id=run_id, parent_run_id=self.parent_run_id, state=self.resume.get("tracker")
            )
            if run_id is None:
                self.tracker.log_config(self.cfg)
        return self.tracker

    def sync(self, timeout: float = 30.0) -> None:
        """Wait until the epoch's metrics are in the store before a checkpoint claims that epoch:
        a worker killed right after the report would otherwise lose them from its outbox. While the
        store is unreachable, do not wait again (the outbox keeps retrying in the background)."""
        self.reachable = self.tracker.flush(timeout if self.reachable else 0.0)


class _DDPWrap:
    """The DDP wrapper for ``run_job``; also notes the student's input shape and class count."""

    def __init__(self, world_size: int, device: torch.device, sync_batchnorm: bool = True):
        self.world_size, self.device, self.sync_batchnorm = world_size, device, sync_batchnorm
        self.io: dict[str, Any] = {}

    def __call__(self, student: nn.Module) -> nn.Module:
        def note(module, args, output):
            self.io = {"input_shape": list(args[0].shape[1:]), "num_classes": int(output.shape[-1])}
            handle.remove()

        handle = student.register_forward_hook(note)
        if self.world_size == 1:
            return student
        from torch.nn.parallel import DistributedDataParallel

        # The frozen teacher is never wrapped; only the student's gradients are averaged.
        if self.sync_batchnorm and self.device.type == "cuda":
            # Batch statistics over the global batch, as the reference trainer does (torch's SyncBatchNorm
            # runs on GPUs only; CPU ranks keep per-rank statistics).
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=device_ids)


def _both(first, second):
    if second is None:
        return first

    def hook(step: int, parts: dict) -> None:
        first(step, parts)
        second(step, parts)

    return hook


USER_ERROR = "user_error"  # a worker's return key: [GdnsqError class name, its one line]


def train_loop_per_worker(config: dict) -> dict | None:
    """One Ray Train worker; a user error (GdnsqError: bad data, a checkpoint that does not fit) is
    returned instead of raised. Train V2 retries every worker-group error ``ray.max_failures`` times
    (its DefaultFailurePolicy has no non-retryable class for user code), and the same bad input fails
    the same way each time; returned, it ends the run at once and the driver raises it as one line."""
    from ..errors import GdnsqError

    try:
        return _train_loop(config)
    except GdnsqError as e:
        return {USER_ERROR: [type(e).__name__, str(e)]}


def raise_user_error(out) -> None:
    """On the driver: raise the GdnsqError a worker returned (same class and line), if it did."""
    from .. import errors

    if isinstance(out, dict) and out.get(USER_ERROR):
        name, message = out[USER_ERROR]
        cls = getattr(errors, name, errors.GdnsqError)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.GdnsqError) else errors.GdnsqError)(message)


def _train_loop(config: dict) -> dict | None:
    """One Ray Train worker: ``run_job`` with Ray's rank, device, checkpoint and report hooks."""
    import ray
    import ray.train
    import ray.train.torch

    from ..training.job import run_job
    from .console import Progress, setup_worker_logging

    setup_worker_logging()
    config = dict(config)
    options = config.pop(WORKER_OPTIONS, None) or {}
    cfg = config_from_dict(config)
    # A worker computes on its CPU share; torch's default (every core of the node) oversubscribes.
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    node_id = ray.get_runtime_context().get_node_id()
    resume = _load_resume()
    if resume is not None:  # the driver checked already; this guards a checkpoint that changed since
        check_identity(config, resume, cfg.name)
    start_epoch = float(resume["engine"]["epoch"]) if resume else 0.0
    if resume and rank == 0:
        log.info("%s: resuming from the checkpoint of epoch %d", cfg.name, int(start_epoch))
    mlflow_run = _LazyTracker(cfg, resume, options.get("parent_run_id")) if rank == 0 and cfg.tracking.enabled else None
    wrap = _DDPWrap(world_size, device, cfg.train.sync_batchnorm)
    if resume is not None:
        wrap.io = resume.get("io", {})

    clock = {"cpu": time.process_time(), "wall": time.perf_counter()}
    progress = Progress(cfg, world_size=world_size, in_ray=True) if rank == 0 and options.get("console") else None

    def on_epoch(metrics: dict, table: list[dict], get_checkpoint) -> None:
        if progress is not None:
            progress.epoch_end(metrics)
        state = get_checkpoint()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["run/resumed_from_epoch"] = start_epoch
        cpu_s = time.process_time() - clock["cpu"]
        metrics["sys/wall_s"] = time.perf_counter() - clock["wall"]
        metrics.update(rank_metrics(state["engine"]["model"], node_id, cpu_s, world_size))
        if rank != 0:
            ray.train.report(metrics)  # a barrier: every rank reports once per epoch
            _wait_report_taken()
            clock.update(cpu=time.process_time(), wall=time.perf_counter())
            return
        if mlflow_run is not None:
            tracker = mlflow_run.get()
            tracker.log_epoch(int(metrics["epoch"]), metrics, table)
            mlflow_run.sync()
            state.update(mlflow_run_id=tracker.run_id, tracker=tracker.state_dict())
        state["io"] = wrap.io
        with tempfile.TemporaryDirectory(prefix="gdnsq-ckpt-") as d:
            torch.save(state, Path(d) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        _wait_report_taken()
        clock.update(cpu=time.process_time(), wall=time.perf_counter())

    on_step = None
    kill = options.get("kill")
    if kill and kill["rank"] == rank:

        def on_step(step: int, parts: dict) -> None:
            if step >= kill["step"]:
                try:
                    Path(kill["marker"]).open("x").close()
                except FileExistsError:
                    return  # killed once already: this is the restarted attempt
                os.kill(os.getpid(), signal.SIGKILL)

    if progress is not None:
        on_step = _both(progress.step, on_step)
    try:
        summary = run_job(
            cfg,
            rank=rank,
            world_size=world_size,
            device=device,
            resume=resume,
            wrap_ddp=wrap,
            on_epoch=on_epoch,
            on_step=on_step,
            on_epoch_start=progress.epoch_start if progress is not None else None,
        )
    except BaseException:
        if mlflow_run is not None and mlflow_run.tracker is not None:
            mlflow_run.tracker.flush(10.0)  # leave the run RUNNING: a restarted worker group reattaches
        raise
    if rank != 0:
        return None
    run_id = None
    if mlflow_run is not None:
        tracker = mlflow_run.get()
        tracker.log_summary(summary)
        run_id = tracker.run_id
        tracker.finish("FINISHED")
    return {"summary": summary, "mlflow_run_id": run_id}
