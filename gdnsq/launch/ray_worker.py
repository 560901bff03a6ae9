"""The Ray Train executor's worker side: where the checkpoint goes (a Ray ``Checkpoint`` attached to rank 0's
report) and the per-epoch report every rank makes. What the run records is
:class:`gdnsq.launch.session.RunSession`'s, as in-process.

Every rank calls ``ray.train.report`` once per epoch (a barrier); rank 0 alone attaches ``checkpoint.pt``
and logs to MLflow. A user error (GdnsqError) is returned to the driver rather than raised, so Train V2
does not retry bad input ``ray.max_failures`` times. The driver is :mod:`gdnsq.launch.ray_train`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path

import torch

from ..config import config_from_dict
from ..training.checkpoint import CHECKPOINT_FILE, load_checkpoint
from .faults import KillWorker
from .session import RunSession
from .staging import raise_on_every_rank, staged_checkpoint

log = logging.getLogger("gdnsq")

# Seconds a rank waits for Ray's controller to take its last report (see _wait_report_taken).
REPORT_TAKEN_TIMEOUT_S = 60.0


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


def _wait_registered(name: str, timeout: float = REPORT_TAKEN_TIMEOUT_S) -> bool:
    """Block (bounded) until Ray's controller has registered the checkpoint folder ``name``: it is in the run's
    checkpoint snapshot (``checkpoint_manager_snapshot.json``), the list a restarted or resumed run starts from.

    Registration follows the report by a controller poll or two. A stop in between (Ctrl-C on the driver, a lost
    worker) redoes this epoch, so rank 0 shows it on the console and logs it to MLflow only once it is registered:
    an epoch shown is never redone, and an epoch redone was never logged.
    """
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs, path = storage.storage_filesystem, storage.checkpoint_manager_snapshot_path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with fs.open_input_stream(path) as f:
                if name in f.read().decode():
                    return True
        except OSError:  # no snapshot yet (pyarrow's FileNotFoundError), or one being replaced
            pass
        time.sleep(0.1)
    log.warning("checkpoint %s not registered by Ray Train after %.0f s", name, timeout)
    return False


def _wait_report_taken(timeout: float = REPORT_TAKEN_TIMEOUT_S) -> None:
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


def _both(first, second):
    if first is None or second is None:
        return first or second

    def hook(step: int, parts: dict) -> None:
        first(step, parts)
        second(step, parts)

    return hook


USER_ERROR = "user_error"  # a worker's return key: [GdnsqError class name, its one line]


def train_loop_per_worker(
    config: dict,
    *,
    parent_run_id: str | None = None,
    console: bool = False,
    kill: KillWorker | None = None,
    inputs=None,
) -> dict | None:
    """One Ray Train worker; a user error (GdnsqError: bad data, a checkpoint that does not fit) is
    returned instead of raised. Train V2 retries every worker-group error ``ray.max_failures`` times
    (its DefaultFailurePolicy has no non-retryable class for user code), and the same bad input fails
    the same way each time; returned, it ends the run at once and the driver raises it as one line.

    ``config`` is the JobConfig as a plain dict (Ray's ``train_loop_config``); the keywords are bound by the
    driver with ``functools.partial``: ``parent_run_id`` nests rank 0's MLflow run under a sweep's,
    ``console`` draws progress and epoch lines (a single run's console; a sweep's trials leave it to Tune),
    ``kill`` injects a fault for the recovery tests, ``inputs`` builds the model and loaders on the worker
    (run_job's; the Python API's user model and loader factory).
    """
    from ..errors import GdnsqError

    try:
        return _train_loop(config, parent_run_id=parent_run_id, console=console, kill=kill, inputs=inputs)
    except GdnsqError as e:
        return {USER_ERROR: [type(e).__name__, str(e)]}


def raise_user_error(out) -> None:
    """On the driver: raise the GdnsqError a worker returned (same class and line), if it did."""
    from .. import errors

    if isinstance(out, dict) and out.get(USER_ERROR):
        name, message = out[USER_ERROR]
        cls = getattr(errors, name, errors.GdnsqError)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.GdnsqError) else errors.GdnsqError)(message)


def _train_loop(
    config: dict, *, parent_run_id: str | None, console: bool, kill: KillWorker | None, inputs=None
) -> dict | None:
    """One Ray Train worker: ``run_job`` with Ray's rank, device, checkpoint and report hooks."""
    import ray
    import ray.train
    import ray.train.torch

    from ..errors import GdnsqError
    from ..training.job import run_job
    from .console import Progress, setup_worker_logging

    setup_worker_logging()
    cfg = config_from_dict(config)
    # A worker computes on its CPU share; torch's default (every core of the node) oversubscribes.
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    node_id = ray.get_runtime_context().get_node_id()
    resume = _load_resume()  # its identity was checked on the driver (check_existing_run) before Ray started
    start_epoch = float(resume["engine"]["epoch"]) if resume else 0.0
    progress = Progress(cfg, world_size=world_size, in_ray=True) if console and rank == 0 else None
    session = RunSession(cfg, resume, rank=rank, parent_run_id=parent_run_id, progress=progress)
    clock = {"cpu": time.process_time(), "wall": time.perf_counter()}

    def on_epoch(metrics: dict, table: list[dict], get_checkpoint) -> None:
        state = get_checkpoint()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["run/resumed_from_epoch"] = start_epoch
        metrics["sys/wall_s"] = time.perf_counter() - clock["wall"]
        metrics.update(rank_metrics(state["engine"]["model"], node_id, time.process_time() - clock["cpu"], world_size))
        state = session.record_epoch(metrics, table, state)
        with contextlib.ExitStack() as stack:
            folder, failed = None, None
            if rank == 0:
                try:
                    folder = stack.enter_context(staged_checkpoint(state))
                except GdnsqError as e:
                    failed = e
            raise_on_every_rank(failed, world_size)
            # rank 0 names the checkpoint folder (Ray's default form, checkpoint_<time>) to wait for its registration
            name = ray.train.get_context().get_storage().make_default_checkpoint_dir_name() if folder else None
            checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
            # a barrier: every rank reports once per epoch, rank 0 with the checkpoint
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if name is not None:
            _wait_registered(name)
        else:
            _wait_report_taken()
        session.epoch_saved(metrics)
        clock.update(cpu=time.process_time(), wall=time.perf_counter())

    try:
        summary = run_job(
            cfg,
            rank=rank,
            world_size=world_size,
            device=device,
            resume=resume,
            on_epoch=on_epoch,
            on_step=_both(session.on_step if progress is not None else None, kill and kill.step_hook(rank)),
            on_epoch_start=session.on_epoch_start if progress is not None else None,
            inputs=inputs,
        )
    except BaseException:
        session.abort()  # leave the run RUNNING: a restarted worker group reattaches
        raise
    if rank != 0:
        return None
    return {"summary": summary, "mlflow_run_id": session.finish(summary)}
