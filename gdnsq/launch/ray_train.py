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
from ..training.checkpoint import CHECKPOINT_FILE, check_identity, load_checkpoint
from .local import finished, ray_address, run_dir, with_run_name
from .storage import SUMMARY_FILE, read_json, storage_root

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

    from .console import worker_env

    if ray.is_initialized():
        return
    address = ray_address(cfg)
    # Our console settings reach every worker; a submitted job already has its runtime env (and ours in it).
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    try:
        ray.init(address=address, logging_level="WARNING",
                 runtime_env=None if in_job else {"env_vars": worker_env()})
    except ConnectionError as e:  # something answers there, but not a Ray GCS (Ray gives up after ~20 s)
        from ..errors import ClusterError

        raise ClusterError(f"{'ray.address' if cfg.ray.address else 'RAY_ADDRESS'}: no Ray cluster at {address} "
                           f"({str(e).splitlines()[-1]})") from None


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
                   parent_run_id: str | None = None, controller_failure_limit: int = -1, console: bool = False):
    """The TorchTrainer for a (driver-resolved) config; a run with an existing name resumes.

    For a Tune trial (gdnsq.launch.ray_tune): ``callbacks`` go to the RunConfig (``TuneReportCallback``),
    rank 0's MLflow run is nested under ``parent_run_id``, and ``controller_failure_limit`` caps the
    controller's retries (-1 = Ray's default, unlimited). ``console``: rank 0 draws progress and epoch lines
    (a single run's console; a sweep's trials leave the console to Tune).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .console import train_log_level

    loop_config = to_dict(cfg)
    loop_config[WORKER_OPTIONS] = {"kill": dataclasses.asdict(kill) if kill else None, "parent_run_id": parent_run_id,
                                   "console": console}
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
                             # Ray Train's per-report result and checkpoint lines only with -v
                             logging_config=LoggingConfig(log_level=train_log_level()),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep)),
    )


def fit(cfg: JobConfig, *, kill: KillWorker | None = None, callbacks: list | None = None,
        parent_run_id: str | None = None, controller_failure_limit: int = -1) -> dict:
    """Run (or resume, same name + storage) a job on Ray Train; returns the job summary.

    The summary is :func:`gdnsq.training.job.run_job`'s, plus ``checkpoint`` (the final checkpoint's
    path), ``mlflow_run_id`` and ``registered_model`` when tracking is on. The other keywords are
    :func:`create_trainer`'s (a Tune trial's hooks).
    """
    cfg = with_run_name(cfg)
    stored = check_existing_run(cfg)
    if stored is not None:
        return stored
    use_gpu = place(cfg)
    cfg = _driver_config(with_cpu_share(cfg, use_gpu))
    single = callbacks is None  # a Tune trial passes its callbacks; its console is Tune's
    if single:
        from .console import header

        header(cfg, devices=_devices(cfg, use_gpu))
    result = create_trainer(cfg, use_gpu=use_gpu, kill=kill, callbacks=callbacks, parent_run_id=parent_run_id,
                            controller_failure_limit=controller_failure_limit, console=single).fit()
    if result.error:  # Train V2 raises from fit() already; kept for a result that carries it
        raise result.error
    out = result.return_value
    raise_user_error(out)
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


def _devices(cfg: JobConfig, use_gpu: bool) -> str:
    import ray

    each = f"{cfg.ray.cpus_per_worker} CPU" + (" + 1 GPU" if use_gpu else "")
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    text = (f"Ray Train, {cfg.ray.num_workers} worker(s) x ({each}), {'nccl' if use_gpu else 'gloo'}, "
            f"{nodes} node(s)")
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # noqa: BLE001 - the dashboard is optional (ray[default])
        url = None
    return text + (f"; dashboard http://{url.removeprefix('http://')}" if url else "")
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


def check_existing_run(cfg: JobConfig) -> dict | None:
    """On the driver, before Ray starts: refuse (one line) to resume a run trained with other defining
    settings; return the stored summary of a finished run with the same ones (nothing is trained)."""
    folder = run_dir(cfg)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return None
    ckpt = load_resume_checkpoint(checkpoint)
    check_identity(to_dict(cfg), ckpt, folder)
    summary = read_json(f"{folder}/{SUMMARY_FILE}")
    if finished(cfg, ckpt) and summary is not None:
        log.info("run %s already finished (epoch %d): its stored summary, nothing trained",
                 cfg.name, ckpt["engine"]["epoch"])
        return summary
    return None


def _write_summary(result, summary: dict) -> None:
    """summary.json in the run's storage folder (local path or remote URI alike)."""
    with result.filesystem.open_output_stream(f"{result.path.rstrip('/')}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(summary, indent=1, default=str).encode())


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
    older = sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") < latest), reverse=True)
    for path in older:
        try:
            state = load_ray_checkpoint(Checkpoint(path, filesystem=fs))
        except Exception:  # noqa: BLE001
            continue
        log.warning("checkpoint %s is unreadable (%s): resuming from the one before it, %s (epoch %d)",
                    latest, type(first).__name__, path, state["engine"]["epoch"])
        return state
    raise ExportError(f"{latest}: the run's latest checkpoint is unreadable ({type(first).__name__}) and no "
                      "earlier one is; pass --fresh to set the run aside") from None


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
    mlflow_run = (_LazyTracker(cfg, resume, options.get("parent_run_id"))
                  if rank == 0 and cfg.tracking.enabled else None)
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
        summary = run_job(cfg, rank=rank, world_size=world_size, device=device, resume=resume, wrap_ddp=wrap,
                          on_epoch=on_epoch, on_step=on_step,
                          on_epoch_start=progress.epoch_start if progress is not None else None)
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

