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
import os

from ..config import JobConfig, to_dict
from .faults import KillWorker
from .identity import run_dir, with_run_name
from .placement import check_resources, resolve_use_gpu, with_cpu_share
from .preflight import ray_address
from .ray_checkpoints import check_existing_run, remove_orphan_checkpoints, stop_trainer
from .ray_worker import load_ray_checkpoint, raise_user_error, train_loop_per_worker
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
    from ray.job_config import JobConfig

    from .console import ray_job_logging, worker_env

    if ray.is_initialized():
        return
    address = ray_address(cfg)
    # Our console settings reach every worker; a submitted job already has its runtime env (and ours in it).
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    # The job's processes are told which cluster they belong to: Train V2's controller asks the state API, which
    # otherwise looks the cluster up and fails ("Found multiple active Ray instances") on a machine with several.
    gcs = address and "://" not in address and ":" in address  # HOST:PORT, not "auto"/"local"/a client URL
    env = {**worker_env(), **({"RAY_ADDRESS": address} if gcs else {})}
    # The job's tasks and actors log at ERROR (Ray's own actors' warnings), the driver's logging stays ours: a
    # JobConfig's logging config reaches the workers only, where ray.init(logging_config=) would also reset ours.
    job_config = JobConfig()
    job_config.set_py_logging_config(ray_job_logging())
    handlers = _signal_handlers()
    try:
        ray.init(
            address=address,
            logging_level="WARNING",
            runtime_env=None if in_job else {"env_vars": env},
            job_config=job_config,
        )
    except ConnectionError as e:  # something answers there, but not a Ray GCS (Ray gives up after ~20 s)
        from ..errors import ClusterError

        raise ClusterError(
            f"{'ray.address' if cfg.ray.address else 'RAY_ADDRESS'}: no Ray cluster at {address} "
            f"({str(e).splitlines()[-1]})"
        ) from None
    _restore(handlers)


def _signal_handlers() -> dict:
    """The SIGINT and SIGTERM handlers this process holds (in the main thread; none elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore(handlers: dict) -> None:
    """Put back the handlers ``ray.init`` replaced: it installs a Python SIGTERM handler that exits at once
    (``sys.exit``), and its core worker a failure handler at the OS level (a stack dump, then SIGABRT). The run
    path's (gdnsq.launch.run) turns SIGTERM into one line, the same command resuming; only a Python function
    the process held is put back, so a caller without one keeps Ray's."""
    import signal

    for signum, handler in handlers.items():
        if callable(handler):
            signal.signal(signum, handler)


def place(cfg: JobConfig) -> bool:
    """Connect, resolve ``ray.use_gpu`` and check that the cluster can place the workers; returns use_gpu."""
    import ray

    connect(cfg)
    use_gpu = resolve_use_gpu(cfg, ray.cluster_resources())
    check_resources(cfg, use_gpu, ray.nodes())
    return use_gpu


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
    inputs=None,
):
    """The TorchTrainer for a (driver-resolved) config; a run with an existing name resumes.

    For a Tune trial (gdnsq.launch.sweep.tune): ``callbacks`` go to the RunConfig (``TuneReportCallback``),
    rank 0's MLflow run is nested under ``parent_run_id``, and ``controller_failure_limit`` caps the
    controller's retries (-1 = Ray's default, unlimited). ``console``: rank 0 draws progress and epoch lines
    (a single run's console; a sweep's trials leave the console to Tune). ``inputs``: run_job's model and
    loaders factory, called on each worker (the Python API's; None: from the config).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .console import train_log_level

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            # Ray 2.60's fit() replaces the driver's SIGINT handler with one that aborts the run and exits with
            # status 0; the run path's own handler (gdnsq.launch.run: SIGINT and SIGTERM alike) stays, and
            # stop_trainer aborts the controller kept here.
            self.controller = controller

    # Worker-only options are bound to the loop function (the Ray Train examples' way); the config stays the
    # JobConfig alone.
    loop = functools.partial(
        train_loop_per_worker, parent_run_id=parent_run_id, console=console, kill=kill, inputs=inputs
    )
    return Trainer(
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
    inputs=None,
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
    remove_orphan_checkpoints(run_dir(cfg))
    single = callbacks is None  # a Tune trial passes its callbacks; its console is Tune's
    if single:
        from .console import header

        header(cfg, devices=_devices(cfg, use_gpu))
    trainer = create_trainer(
        cfg,
        use_gpu=use_gpu,
        kill=kill,
        callbacks=callbacks,
        parent_run_id=parent_run_id,
        controller_failure_limit=controller_failure_limit,
        console=single,
        inputs=inputs,
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM on the driver (gdnsq.launch.run turns both into this)
        stop_trainer(trainer, run_dir(cfg))
        raise
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


def _write_summary(result, summary: dict) -> None:
    """summary.json in the run's storage folder (local path or remote URI alike), credentials redacted."""
    from ..redaction import scrub_tree

    with result.filesystem.open_output_stream(f"{result.path.rstrip('/')}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(scrub_tree(summary), indent=1, default=str).encode())
