"""Run a job where the config says: through Ray Train (default) or in-process (``ray.enabled: false``).

:func:`preflight` runs first on both paths (and on a sweep's base job): bad input fails in one line
before any data is loaded, Ray starts or the FP teacher trains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

from ..config import JobConfig, to_dict
from .storage import SUMMARY_FILE, storage_root, write_json_atomic

log = logging.getLogger("gdnsq")


def with_run_name(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its run name: the given one, else '<model>-w<W>a<A>-<8 hex digits of the fingerprint>'.

    The same defining settings give the same name (running them again resumes or returns the finished
    run); any other defining setting gives another name, so default-named runs never collide.
    """
    if cfg.name:
        return cfg
    from ..training.checkpoint import fingerprint

    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.name.rsplit("/", 1)[-1])[:40]
    name = f"{model}-w{cfg.quant.target_w:g}a{cfg.quant.target_a:g}-{fingerprint(to_dict(cfg))[:8]}"
    return dataclasses.replace(cfg, name=name)


def run_dir(cfg: JobConfig) -> str:
    return f"{storage_root(cfg).rstrip('/')}/{cfg.name}"


def finished(cfg: JobConfig, ckpt: dict) -> bool:
    """Whether the checkpointed run has nothing left to train under ``cfg`` (epochs done or stopped early)."""
    done = int(ckpt["engine"]["epoch"]) >= cfg.train.epochs
    return done or bool(cfg.train.patience and ckpt.get("stale", 0) >= cfg.train.patience)


def set_aside(cfg: JobConfig) -> str | None:
    """``--fresh``: move an existing run folder to '<name>.old-<time>' (nothing trained is deleted)."""
    from ..errors import RunIdentityError

    folder = run_dir(cfg)
    if "://" in folder:
        raise RunIdentityError(f"--fresh: cannot move the remote run {folder}; pass --name NEW instead")
    if not Path(folder).exists():
        return None
    aside = f"{folder}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(folder).rename(aside)
    log.warning("--fresh: the earlier run %s was moved to %s", cfg.name, aside)
    return aside


def run_local(cfg: JobConfig) -> dict:
    """In-process run, no Ray: checkpoints to <storage>/<name>/checkpoint.pt, resumed if present and trained
    with the same defining settings; a finished run returns its stored summary without training."""
    from ..training.checkpoint import CHECKPOINT_FILE, check_identity, load_latest, save_checkpoint
    from ..training.job import run_job
    from ..training.runtime import resolve_device
    from . import console

    folder = Path(run_dir(cfg))
    ckpt_path = folder / CHECKPOINT_FILE
    resume = load_latest(ckpt_path)
    if resume is not None:
        check_identity(to_dict(cfg), resume, str(folder))
        stored = folder / SUMMARY_FILE
        if finished(cfg, resume) and stored.is_file():
            log.info(
                "run %s already finished (epoch %d): its stored summary, nothing trained",
                cfg.name,
                resume["engine"]["epoch"],
            )
            return json.loads(stored.read_text())
        log.info("%s: resuming from the checkpoint of epoch %d", cfg.name, resume["engine"]["epoch"])
    console.header(cfg, devices=f"in-process (no Ray), {resolve_device(cfg.train.device)}")

    tracking = LocalTracking(cfg, resume)
    io = dict((resume or {}).get("io") or {})
    progress = console.Progress(cfg)

    def note_io(student):  # the input shape and class count, for registration (as the Ray path records)
        def note(module, args, output):
            io.update(input_shape=list(args[0].shape[1:]), num_classes=int(output.shape[-1]))
            handle.remove()

        handle = student.register_forward_hook(note)
        return student

    def on_epoch(metrics, table, get_checkpoint):
        progress.epoch_end(metrics)
        state = get_checkpoint()
        state["io"] = dict(io)
        state.update(tracking.log_epoch(metrics, table))
        save_checkpoint(state, ckpt_path, keep_previous=True)

    summary = run_job(
        cfg,
        resume=resume,
        on_epoch=on_epoch,
        wrap_ddp=note_io,
        on_step=progress.step,
        on_epoch_start=progress.epoch_start,
    )
    summary["checkpoint"] = str(ckpt_path)
    summary.update(tracking.finish(summary, ckpt_path))
    write_json_atomic(folder / SUMMARY_FILE, summary)
    return summary


class LocalTracking:
    """MLflow for an in-process run, as rank 0 does on Ray: the run starts at the first epoch (or reattaches
    to the one named in the resumed checkpoint), gets every epoch, the summary, and the registration."""

    def __init__(self, cfg: JobConfig, resume: dict | None):
        self.cfg, self.resume, self.tracker, self.reachable = cfg, resume or {}, None, True
        if cfg.tracking.enabled:
            from ..tracking.store import resolve_tracking_uri

            self.cfg = dataclasses.replace(
                cfg, tracking=dataclasses.replace(cfg.tracking, uri=resolve_tracking_uri(cfg.tracking.uri))
            )

    def _get(self):
        if self.tracker is None:
            from ..tracking.run import create_tracker

            run_id = self.resume.get("mlflow_run_id")
            self.tracker = create_tracker(self.cfg, run_id=run_id, state=self.resume.get("tracker"))
            if run_id is None:
                self.tracker.log_config(self.cfg)
        return self.tracker

    def log_epoch(self, metrics: dict, table: list[dict]) -> dict:
        """Log one epoch; returns what the checkpoint keeps to reattach (nothing when tracking is off)."""
        if not self.cfg.tracking.enabled:
            return {}
        tracker = self._get()
        tracker.log_epoch(int(metrics["epoch"]), {k: float(v) for k, v in metrics.items()}, table)
        self.reachable = tracker.flush(30.0 if self.reachable else 0.0)
        return {"mlflow_run_id": tracker.run_id, "tracker": tracker.state_dict()}

    def finish(self, summary: dict, ckpt_path: Path) -> dict:
        if not self.cfg.tracking.enabled:
            return {}
        from ..training.checkpoint import load_checkpoint
        from .register import register_checkpoint, registrable

        tracker = self._get()
        tracker.log_summary(summary)
        run_id = tracker.run_id
        tracker.finish("FINISHED")
        out = {"mlflow_run_id": run_id} if run_id else {}
        if run_id and self.cfg.tracking.register and registrable(summary, self.cfg.name):
            out["registered_model"] = register_checkpoint(
                self.cfg,
                load_checkpoint(ckpt_path),
                summary,
                run_id,
                what=self.cfg.name,
                checkpoint_path=str(ckpt_path),
            )
        return out


def check_structure(cfg: JobConfig) -> None:
    """Build the quantized structure on the meta device (no memory, no weights: well under a second for
    a ResNet). That runs model creation, the surgery rules and every layer's quantizer factory, so an
    unknown ``model.name`` or ``quant.method``, a zoo method's bit constraints (bnnpp is W1A1 only, codeq
    needs >= 2 weight bits), unknown ``quant.method_args`` keys and rules that match no layer fail here,
    with the one-line message they would give once training starts. Class count and input channels do
    not change which layers are quantized or how, so the dataset's are not needed.
    """
    import torch

    from ..training.surgery import build_student

    with torch.device("meta"):
        build_student(cfg, num_classes=10, in_chans=3)


GCS_PORT = 6379
PROBE_TIMEOUT_S = 10.0


def ray_address(cfg: JobConfig) -> str | None:
    """The Ray address training connects to (``ray.address``, else $RAY_ADDRESS), checked without Ray.

    A job-server URL (``http://HEAD:8265``, what ``gdnsq submit`` takes) in ``ray.address`` is refused in one
    line; in $RAY_ADDRESS (where our submit hint puts it) it is dropped with a warning, since ``ray.init``
    would read it. A host:port that nothing answers on fails within PROBE_TIMEOUT_S instead of Ray's
    minutes-long retries.
    """
    import os
    import socket

    from ..errors import ClusterError

    field, address = "ray.address", cfg.ray.address
    if address is None:
        field, address = "RAY_ADDRESS", os.environ.get("RAY_ADDRESS") or None
    if address is None or address in ("auto", "local"):
        return cfg.ray.address
    if address.startswith(("http://", "https://")):
        if field == "ray.address":
            raise ClusterError(
                f"ray.address: {address!r} is a job-server URL (for gdnsq submit); training needs "
                f"the cluster's GCS address HOST:{GCS_PORT}"
            )
        log.warning("RAY_ADDRESS=%s is a job-server URL (for gdnsq submit); training ignores it", address)
        os.environ.pop("RAY_ADDRESS")
        return None
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", str(GCS_PORT))
    if not port.isdigit():
        raise ClusterError(f"{field}: expected HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(
            f"{field}: nothing answers at {host}:{port} ({e.strerror or type(e).__name__}); "
            "start the Ray head there or fix the address"
        ) from None
    return address


def preflight(cfg: JobConfig) -> None:
    """Checks that need no data loading or Ray, so bad input fails in one line before anything starts."""

    check_structure(cfg)
    if cfg.ray.enabled:
        ray_address(cfg)
    check_data(cfg)


def check_storage(cfg: JobConfig) -> None:
    """A local storage path must take a file (probed, then removed with any folder made for it)."""
    import tempfile

    from ..errors import StorageError

    root = Path(storage_root(cfg))
    if "://" in str(cfg.ray.storage_path or ""):
        return
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".gdnsq-probe-"):
            pass
    except OSError as e:
        raise StorageError(f"ray.storage_path: cannot write to {root} ({e.strerror or type(e).__name__})") from None
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


def check_data(cfg: JobConfig) -> None:
    """Local data opened here as the loaders will open it (a .beton's header and sizes, an ImageFolder's
    class folders), so a corrupt file or a folder of the wrong shape fails in one line on the driver,
    not inside a Ray worker after the cluster started."""
    from ..errors import ConfigError, DataError

    if cfg.data.kind == "bundled":
        return
    for key in ("train_path", "val_path"):
        path = getattr(cfg.data, key)
        if "://" in path:
            continue
        if not Path(path).exists():
            raise ConfigError(f"data.{key}: no such file or directory {path!r}")
        try:
            if cfg.data.kind == "ffcv":
                from ..data.ffcv_io import open_beton

                open_beton(path)
            else:
                from ..data.imagefolder import open_imagefolder

                open_imagefolder(path)
        except DataError as e:
            raise DataError(f"data.{key}: {e}") from None


def run(cfg: JobConfig, *, fresh: bool = False, resume: bool = False) -> dict:
    """Pre-flight, then the run. ``resume``: the named run must exist; ``fresh``: an existing one is set aside."""
    from ..errors import RunIdentityError
    from .storage import exists

    cfg = with_run_name(cfg)
    preflight(cfg)
    check_storage(cfg)
    if resume and not exists(run_dir(cfg)):
        raise RunIdentityError(f"--resume: no run {cfg.name!r} under {storage_root(cfg)}")
    if fresh:
        set_aside(cfg)
    if cfg.ray.enabled:
        from .ray_train import fit

        return fit(cfg)
    return run_local(cfg)
