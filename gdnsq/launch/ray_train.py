"""Ray Train edge: one GDNSQ job as a ``TorchTrainer`` (DDP over Ray workers), resumable and tracked.

Driver (:func:`fit`, this module): connect to Ray, check that the cluster can place the workers, run the
trainer, write ``summary.json`` next to the checkpoints, register the best converged student in MLflow.
Workers (:func:`gdnsq.launch.ray_worker.train_loop_per_worker`): rebuild the config from a plain dict,
resume from Ray's latest checkpoint, and run :func:`gdnsq.training.job.run_job`, the same code path as a
run without Ray.

Per epoch every rank calls ``ray.train.report`` once (a barrier); rank 0 alone attaches
``checkpoint.pt`` and logs to MLflow. The MLflow run id travels in the checkpoint, so a restarted
worker group reattaches to its run. Each report also carries a DDP replica check: every rank's hash
of its student state (``dist/checksum/r<rank>``), ``dist/replicas_equal`` and ``dist/num_nodes``;
and ``sys/cpu_s`` / ``sys/wall_s`` (all workers' CPU seconds, rank 0's wall seconds per epoch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os

from ..config import JobConfig, to_dict
from ..errors import ConfigError
from .faults import KillWorker
from .identity import run_dir, stored_summary, with_run_name
from .preflight import ray_address
from .ray_worker import load_ray_checkpoint, load_resume_checkpoint, raise_user_error, train_loop_per_worker
from .session import register_run, with_tracking_uri
from .storage import SUMMARY_FILE, storage_root

log = logging.getLogger("gdnsq")


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
        ray.init(address=address, logging_level="WARNING", runtime_env=None if in_job else {"env_vars": worker_env()})
    except ConnectionError as e:  # something answers there, but not a Ray GCS (Ray gives up after ~20 s)
        from ..errors import ClusterError

        raise ClusterError(
            f"{'ray.address' if cfg.ray.address else 'RAY_ADDRESS'}: no Ray cluster at {address} "
            f"({str(e).splitlines()[-1]})"
        ) from None


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
        raise ConfigError(
            f"ray.num_workers: {want} cannot be placed on this cluster ({have}, room for "
            f"{slots} worker(s)); lower ray.num_workers or ray.cpus_per_worker"
        )


def _driver_config(cfg: JobConfig) -> JobConfig:
    """Paths the workers must see as the driver means them (their cwd is elsewhere): the storage root, and the
    tracking URI (the default sqlite store lives under the driver's cwd)."""
    cfg = with_tracking_uri(cfg)
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, storage_path=storage_root(cfg)))


def create_trainer(
    cfg: JobConfig,
    *,
    use_gpu: bool,
    kill: KillWorker | None = None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    controller_failure_limit: int = -1,
    console: bool = False,
):
    """The TorchTrainer for a (driver-resolved) config; a run with an existing name resumes.

    For a Tune trial (gdnsq.launch.sweep.tune): ``callbacks`` go to the RunConfig (``TuneReportCallback``),
    rank 0's MLflow run is nested under ``parent_run_id``, and ``controller_failure_limit`` caps the
    controller's retries (-1 = Ray's default, unlimited). ``console``: rank 0 draws progress and epoch lines
    (a single run's console; a sweep's trials leave the console to Tune).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .console import train_log_level

    # Worker-only options are bound to the loop function (the Ray Train examples' way); the config stays the
    # JobConfig alone.
    loop = functools.partial(train_loop_per_worker, parent_run_id=parent_run_id, console=console, kill=kill)
    return TorchTrainer(
        loop,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.ray.storage_path,
            failure_config=FailureConfig(
                max_failures=cfg.ray.max_failures, controller_failure_limit=controller_failure_limit
            ),
            callbacks=list(callbacks or []),
            # Ray Train's per-report result and checkpoint lines only with -v
            logging_config=LoggingConfig(log_level=train_log_level()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
        ),
    )


def fit(
    cfg: JobConfig,
    *,
    kill: KillWorker | None = None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    controller_failure_limit: int = -1,
) -> dict:
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
    result = create_trainer(
        cfg,
        use_gpu=use_gpu,
        kill=kill,
        callbacks=callbacks,
        parent_run_id=parent_run_id,
        controller_failure_limit=controller_failure_limit,
        console=single,
    ).fit()
    if result.error:  # Train V2 raises from fit() already; kept for a result that carries it
        raise result.error
    out = result.return_value
    raise_user_error(out)
    if not isinstance(out, dict) or "summary" not in out:
        raise RuntimeError(f"Ray Train run {cfg.name}: rank 0 returned no summary (got {type(out).__name__})")
    summary = dict(out["summary"])
    summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    summary.update(
        register_run(
            cfg,
            summary,
            out.get("mlflow_run_id"),
            lambda: load_ray_checkpoint(result.checkpoint),
            summary["checkpoint"],
        )
    )
    _write_summary(result, summary)
    return summary


def _devices(cfg: JobConfig, use_gpu: bool) -> str:
    import ray

    each = f"{cfg.ray.cpus_per_worker} CPU" + (" + 1 GPU" if use_gpu else "")
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    text = f"Ray Train, {cfg.ray.num_workers} worker(s) x ({each}), {'nccl' if use_gpu else 'gloo'}, {nodes} node(s)"
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
    """On the driver, before Ray starts: :func:`gdnsq.launch.identity.stored_summary` of the run's latest Ray
    checkpoint (refuse other defining settings; a finished run returns its stored summary)."""
    folder = run_dir(cfg)
    checkpoint = latest_checkpoint(folder)
    return stored_summary(cfg, None if checkpoint is None else load_resume_checkpoint(checkpoint), folder)


def _write_summary(result, summary: dict) -> None:
    """summary.json in the run's storage folder (local path or remote URI alike)."""
    with result.filesystem.open_output_stream(f"{result.path.rstrip('/')}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(summary, indent=1, default=str).encode())
