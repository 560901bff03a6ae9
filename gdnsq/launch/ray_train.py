"""Ray Train edge: one GDNSQ job as a ``TorchTrainer`` (DDP over Ray workers), resumable and tracked.

Driver (:func:`fit`): connect to Ray, check that the cluster can place the workers, run the trainer,
write ``summary.json`` next to the checkpoints, register the best converged student in MLflow.
Workers (:func:`train_loop_per_worker`): rebuild the config from a plain dict, resume from Ray's
latest checkpoint, and run :func:`gdnsq.training.job.run_job`, the same code path as a run without Ray.

Per epoch every rank calls ``ray.train.report`` once (a barrier); rank 0 alone attaches
``checkpoint.pt`` and logs to MLflow. The MLflow run id travels in the checkpoint, so a restarted
worker group reattaches to its run. Each report also carries a DDP replica check: every rank's hash
of its student state (``dist/checksum/r<rank>``), ``dist/replicas_equal`` and ``dist/num_nodes``;
and ``sys/cpu_s`` / ``sys/wall_s`` (all workers' CPU seconds, rank 0's wall seconds per epoch).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import JobConfig, config_from_dict, to_dict
from ..errors import ConfigError
from ..training.checkpoint import CHECKPOINT_FILE, load_checkpoint
from .storage import SUMMARY_FILE, storage_root

log = logging.getLogger("gdnsq")

WORKER_OPTIONS = "_worker"  # train_loop_config key for worker-only options (not part of the JobConfig)


@dataclass(frozen=True)
class KillWorker:
    """Fault injection for recovery tests: SIGKILL rank ``rank``'s worker process once it reaches
    global step ``step``, on the first attempt only (the ``marker`` file records that it happened)."""

    step: int
    marker: str
    rank: int = 0


# ------------------------------------------------------------------------------------- driver


def connect(cfg: JobConfig) -> None:
    """Join ``ray.address`` (or, when unset, the local ``ray start`` cluster / a new local instance).

    The dashboard is left to Ray's default (started when ``ray[default]`` is installed): Train V2's
    placement-group cleaner queries the state API it serves, and warns every few seconds without it.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=cfg.ray.address, logging_level="WARNING")


def place(cfg: JobConfig) -> bool:
    """Connect, resolve ``ray.use_gpu`` and check that the cluster can place the workers; returns use_gpu."""
    import ray

    connect(cfg)
    use_gpu = resolve_use_gpu(cfg, ray.cluster_resources())
    check_resources(cfg, use_gpu, ray.nodes())
    return use_gpu


def cpus_per_worker(cfg: JobConfig, use_gpu: bool, nodes: list[dict]) -> int:
    """``ray.cpus_per_worker``, or for None a node's CPUs shared by the workers it will hold.

    The workers spread over the alive nodes (GPU nodes with ``use_gpu``), ceil(workers / nodes) per
    node, sized by the smallest node. Train V2's controller actor reserves no CPU (``num_cpus=0`` in
    Ray 2.60) and the driver none either, so on a 2-core machine one worker gets both cores.
    """
    if cfg.ray.cpus_per_worker is not None:
        return cfg.ray.cpus_per_worker
    res = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    res = [r for r in res if r.get("CPU", 0) >= 1 and (not use_gpu or r.get("GPU", 0) >= 1)]
    if not res:
        return 1
    per_node = math.ceil(cfg.ray.num_workers / len(res))
    if use_gpu:  # one GPU per worker: a node holds at most its GPU count
        per_node = max(per_node, math.ceil(cfg.ray.num_workers / sum(int(r["GPU"]) for r in res)))
    return max(1, int(min(r["CPU"] for r in res) // per_node))


def with_cpu_share(cfg: JobConfig, use_gpu: bool) -> JobConfig:
    """The config with ``ray.cpus_per_worker`` resolved against the connected cluster."""
    import ray

    cpus = cpus_per_worker(cfg, use_gpu, ray.nodes())
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, cpus_per_worker=cpus))


def resolve_use_gpu(cfg: JobConfig, cluster: dict[str, float]) -> bool:
    if cfg.ray.use_gpu is not None:
        use_gpu = cfg.ray.use_gpu
    else:
        use_gpu = cluster.get("GPU", 0) > 0 and cfg.train.device != "cpu"
    if use_gpu and cfg.train.device == "cpu":
        raise ConfigError("ray.use_gpu: true contradicts train.device: cpu")
    if not use_gpu and cfg.train.device == "cuda":
        raise ConfigError("train.device: cuda needs GPU workers (ray.use_gpu) and GPUs in the cluster")
    return use_gpu


def check_resources(cfg: JobConfig, use_gpu: bool, nodes: list[dict]) -> None:
    """One-line ConfigError when the alive nodes cannot place every worker (before any training).

    Each worker's bundle (``ray.cpus_per_worker`` CPUs, one GPU with ``use_gpu``) must fit on one
    node, so the count is per node, not over the cluster's total.
    """
    need_cpu, need_gpu = cpus_per_worker(cfg, use_gpu, nodes), 1 if use_gpu else 0
    slots, total_cpu, total_gpu = 0, 0.0, 0.0
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cpu, gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
        total_cpu, total_gpu = total_cpu + cpu, total_gpu + gpu
        fits = int(cpu // need_cpu)
        if need_gpu:
            fits = min(fits, int(gpu // need_gpu))
        slots += fits
    if slots < cfg.ray.num_workers:
        want = f"{cfg.ray.num_workers} x ({need_cpu} CPU{f' + {need_gpu} GPU' if need_gpu else ''})"
        have = f"{total_cpu:g} CPUs{f' / {total_gpu:g} GPUs' if need_gpu else ''} on {len(nodes)} node(s)"
        raise ConfigError(f"ray.num_workers: {want} cannot be placed on this cluster ({have}, room for "
                          f"{slots} worker(s)); lower ray.num_workers or ray.cpus_per_worker")


def _driver_config(cfg: JobConfig) -> JobConfig:
    """Paths the workers must see as the driver means them (their cwd is elsewhere)."""
    storage = storage_root(cfg)
    tracking = cfg.tracking
    if tracking.enabled:
        from ..tracking.store import resolve_tracking_uri

        tracking = dataclasses.replace(tracking, uri=resolve_tracking_uri(tracking.uri))
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, storage_path=storage), tracking=tracking)


def create_trainer(cfg: JobConfig, *, use_gpu: bool, kill: KillWorker | None = None, callbacks: list | None = None,
                   parent_run_id: str | None = None, controller_failure_limit: int = -1):
    """The TorchTrainer for a (driver-resolved) config; a run with an existing name resumes.

    For a Tune trial (gdnsq.launch.ray_tune): ``callbacks`` go to the RunConfig (``TuneReportCallback``),
    rank 0's MLflow run is nested under ``parent_run_id``, and ``controller_failure_limit`` caps the
    controller's retries (-1 = Ray's default, unlimited).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    loop_config = to_dict(cfg)
    loop_config[WORKER_OPTIONS] = {"kill": dataclasses.asdict(kill) if kill else None, "parent_run_id": parent_run_id}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.ray.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                                          controller_failure_limit=controller_failure_limit),
                             callbacks=list(callbacks or []),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep)),
    )


def fit(cfg: JobConfig, *, kill: KillWorker | None = None, callbacks: list | None = None,
        parent_run_id: str | None = None, controller_failure_limit: int = -1) -> dict:
    """Run (or resume, same name + storage) a job on Ray Train; returns the job summary.

    The summary is :func:`gdnsq.training.job.run_job`'s, plus ``checkpoint`` (the final checkpoint's
    path), ``mlflow_run_id`` and ``registered_model`` when tracking is on. The other keywords are
    :func:`create_trainer`'s (a Tune trial's hooks).
    """
    use_gpu = place(cfg)
    cfg = _driver_config(with_cpu_share(cfg, use_gpu))
    result = create_trainer(cfg, use_gpu=use_gpu, kill=kill, callbacks=callbacks, parent_run_id=parent_run_id,
                            controller_failure_limit=controller_failure_limit).fit()
    if result.error:  # Train V2 raises from fit() already; kept for a result that carries it
        raise result.error
    out = result.return_value
    if not isinstance(out, dict) or "summary" not in out:
        raise RuntimeError(f"Ray Train run {cfg.name}: rank 0 returned no summary (got {type(out).__name__})")
    summary = dict(out["summary"])
    summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    if out.get("mlflow_run_id"):
        summary["mlflow_run_id"] = out["mlflow_run_id"]
        from .register import register_checkpoint, registrable

        if cfg.tracking.register and registrable(summary, cfg.name):
            summary["registered_model"] = register_checkpoint(
                cfg, load_ray_checkpoint(result.checkpoint), summary, out["mlflow_run_id"], what=cfg.name,
                checkpoint_path=result.checkpoint.path)
    _write_summary(result, summary)
    return summary


def _write_summary(result, summary: dict) -> None:
    """summary.json in the run's storage folder (local path or remote URI alike)."""
    with result.filesystem.open_output_stream(f"{result.path.rstrip('/')}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(summary, indent=1, default=str).encode())


def load_ray_checkpoint(checkpoint) -> dict:
    """The gdnsq checkpoint dict inside a Ray Train ``Checkpoint`` (local or remote storage)."""
    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


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
    return None if checkpoint is None else load_ray_checkpoint(checkpoint)


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
            self.tracker = create_tracker(self.cfg, run_id=run_id, parent_run_id=self.parent_run_id,
                                          state=self.resume.get("tracker"))
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


def train_loop_per_worker(config: dict) -> dict | None:
    """One Ray Train worker: ``run_job`` with Ray's rank, device, checkpoint and report hooks."""
    import ray
    import ray.train
    import ray.train.torch

    from ..training.job import run_job

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
    start_epoch = float(resume["engine"]["epoch"]) if resume else 0.0
    if resume and rank == 0:
        log.info("%s: resuming from the checkpoint of epoch %d", cfg.name, int(start_epoch))
    mlflow_run = (_LazyTracker(cfg, resume, options.get("parent_run_id"))
                  if rank == 0 and cfg.tracking.enabled else None)
    wrap = _DDPWrap(world_size, device, cfg.train.sync_batchnorm)
    if resume is not None:
        wrap.io = resume.get("io", {})

    clock = {"cpu": time.process_time(), "wall": time.perf_counter()}

    def on_epoch(metrics: dict, table: list[dict], get_checkpoint) -> None:
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

    try:
        summary = run_job(cfg, rank=rank, world_size=world_size, device=device, resume=resume, wrap_ddp=wrap,
                          on_epoch=on_epoch, on_step=on_step)
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

