"""The run checkpoint: one schema, written by the job, read by resume, export and registration.

A checkpoint is a plain dict of tensors and Python values (loadable with ``weights_only=True``)::

    config     the JobConfig as a dict (the run can be rebuilt from the file alone)
    fingerprint  hash of the settings that define the run (:func:`fingerprint`); resume checks them
    teacher    the frozen FP teacher's state dict
    engine     Engine.state_dict(): student, optimizer, schedule, objective, epoch, RNG
    best       {"ns_top1", "val_top1", "epoch", "state"}: the best converged student (state None if none)
    fp_val     the teacher's validation metrics
    teacher_report  how the teacher was obtained: {"source", and for one trained in-run "epochs",
               "val_top1", "plateaued"}
    stale      epochs without a better ns_top1 (early stopping)
    io         (launchers) {"input_shape": [C, H, W], "num_classes": N}, when known
    mlflow_run_id, tracker   (Ray launcher) the MLflow run to reattach to

Everything that reads one goes through this module, so the schema has one owner.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..config import JobConfig, config_from_dict
from ..errors import ExportError, StorageError
from ..redaction import scrub, scrub_tree

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"  # the local run's checkpoint before the latest: a torn latest falls back to it

log = logging.getLogger("gdnsq")


def make_checkpoint(
    cfg_dict: dict,
    teacher: nn.Module,
    engine_state: dict,
    best: dict,
    fp_val: dict,
    stale: int,
    teacher_report: dict | None = None,
    io: dict | None = None,
) -> dict:
    """The one checkpoint dict (its schema lives here); ``io`` = {input_shape: [C, H, W], num_classes}, what
    registration and export need to rebuild the student without the data. The stored config has its
    credentials redacted (:mod:`gdnsq.redaction`: a tracking URI's password, a signed data URL); the run's
    identity compares redacted values on both sides (:func:`defining_settings`)."""
    return {
        "fingerprint": fingerprint(cfg_dict),
        "config": scrub_tree(cfg_dict),
        "teacher": teacher.state_dict(),
        "engine": engine_state,
        "best": best,
        "fp_val": fp_val,
        "stale": stale,
        "teacher_report": dict(teacher_report or {}),
        "io": dict(io or {}),
    }


def save_checkpoint(
    state: dict, path: str | Path, *, keep_previous: bool = False, where: str = "ray.storage_path"
) -> None:
    """Write through a temporary file and a rename: a crash never leaves half a checkpoint.

    ``keep_previous``: the file it replaces becomes PREVIOUS_FILE beside it (a torn latest falls back to
    it, :func:`load_latest`). A write that fails for any reason (unwritable, disk full, a file-size limit:
    torch then raises a RuntimeError about the zip stream after the OSError) removes its temporary file
    and raises one StorageError line naming ``where`` (the setting or folder at fault); the checkpoints
    already there are untouched. An interrupt (Ctrl-C) during the write removes the temporary file too.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # a Python file: a full disk is an OSError (ENOSPC), not torch's C++ stream error
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, path.with_name(PREVIOUS_FILE))
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not a storage fault
            raise
        raise StorageError(
            f"{where}: cannot write checkpoint {path} ({_reason(e)}); the earlier checkpoints are kept"
        ) from None


def _reason(error: BaseException) -> str:
    """The OS's words for a failed write: the OSError behind torch's RuntimeError when there is one."""
    seen = error
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__context__
    if isinstance(seen, OSError):
        return seen.strerror or type(seen).__name__
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__


def load_latest(path: str | Path) -> dict | None:
    """A local run's checkpoint to resume from: ``path``, or PREVIOUS_FILE beside it (with a warning) when
    ``path`` is torn, unreadable or missing after a crash between the two renames; None when neither is there."""
    path = Path(path)
    previous = path.with_name(PREVIOUS_FILE)
    if path.is_file():
        try:
            return load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - torn, truncated, not a zip: any of them means "not usable"
            if not previous.is_file():
                raise ExportError(
                    f"{path}: the run's checkpoint is unreadable ({type(e).__name__}) and there is "
                    "no earlier one; pass --fresh to set it aside"
                ) from None
            log.warning(
                "%s is unreadable (%s): resuming from the checkpoint before it, %s",
                path,
                type(e).__name__,
                previous.name,
            )
    if previous.is_file():
        return load_checkpoint(previous)
    return None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict, without unpickling code (``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> dict:
    """:func:`load_checkpoint` for files from outside: anything unreadable or not ours is one ExportError line."""
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        raise ExportError(f"{path}: not a readable gdnsq checkpoint ({type(e).__name__})") from None
    if not (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("config"), dict)
        and isinstance(ckpt.get("engine"), dict)
        and isinstance(ckpt["engine"].get("model"), dict)
    ):
        raise ExportError(f"{path}: not a gdnsq checkpoint (needs 'config' and 'engine' -> 'model')")
    return ckpt


def structure_config(data: dict) -> JobConfig:
    """The JobConfig of a stored run, for rebuilding its structure only.

    The stored weights replace every FP weight, so the FP checkpoint (maybe absent on this machine) and
    pretrained downloads are dropped.
    """
    data = copy.deepcopy(data)
    data.setdefault("model", {}).update(checkpoint=None, pretrained=False)
    return config_from_dict(data)


def best_or_last(ckpt: dict) -> tuple[dict, str]:
    """The best converged student state if the run had one, else the last one; and which it is."""
    best = ckpt.get("best") if isinstance(ckpt.get("best"), dict) else {}
    if best.get("state"):
        return best["state"], "best"
    return ckpt["engine"]["model"], "last"


def infer_classes_and_chans(cfg: JobConfig, state: dict) -> tuple[int, int]:
    """num_classes / in_chans from the config, else from the classifier / first conv weights in ``state``."""
    from .models import create_model

    num_classes, in_chans = cfg.model.num_classes, cfg.model.in_chans
    if num_classes and in_chans:
        return num_classes, in_chans
    with torch.device("meta"):  # only for timm's pretrained_cfg: where the edge layers are
        probe = create_model(cfg.model, num_classes=num_classes or 10, in_chans=in_chans or 3, load_weights=False)
    pcfg = getattr(probe, "pretrained_cfg", None) or {}

    def weight_of(name):
        names = [name] if isinstance(name, str) else list(name or [])
        for n in names:
            for key in (f"{n}.weight", f"{n}.fc.weight"):
                if key in state and state[key].dim() >= 2:
                    return state[key]
        return None

    weights = [v for k, v in state.items() if k.endswith(".weight") and v.dim() >= 2]
    if not num_classes:
        w = weight_of(pcfg.get("classifier"))
        num_classes = int((w if w is not None else [v for v in weights if v.dim() == 2][-1]).shape[0])
    if not in_chans:
        w = weight_of(pcfg.get("first_conv"))
        in_chans = int((w if w is not None else [v for v in weights if v.dim() == 4][0]).shape[1])
    return num_classes, in_chans


def student_from_checkpoint(ckpt: dict, *, source: str = "checkpoint") -> tuple[nn.Module, JobConfig, str]:
    """(student with its best-or-last state, in eval mode; the run's JobConfig; "best" or "last").

    The class count and input channels come from the launcher's ``io`` record, else from the weights.
    """
    from .surgery import build_student

    cfg = structure_config(ckpt["config"])
    state, which = best_or_last(ckpt)
    io = ckpt.get("io") or {}
    if io.get("num_classes") and io.get("input_shape"):
        num_classes, in_chans = int(io["num_classes"]), int(io["input_shape"][0])
    else:
        num_classes, in_chans = infer_classes_and_chans(cfg, state)
    model = build_student(cfg, num_classes, in_chans)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ExportError(
            f"{source}: student state does not fit {cfg.model.name} "
            f"({lines[1].strip() if len(lines) > 1 else lines[0]})"
        ) from None
    return model.eval(), cfg, which


# ------------------------------------------------------------------------------------ run identity
# A run is resumed only by a job with the same *defining* settings: those that change what the run
# computes. Resuming under other ones would hand back a model trained with different settings (a W1A1
# checkpoint answering a W3A3 job). Every setting defines the run except these harmless ones, which
# only say how long, where, or with what resources it runs, or where it is reported:
HARMLESS_SETTINGS = (
    "name",  # the run's identity itself
    "train.epochs",  # more epochs continue the same run; fewer end it at its checkpoint
    "train.patience",  # early stopping decides when to stop, not what an epoch computes
    "train.device",  # a checkpoint moves between CPU and GPU
    "data.num_workers",  # loader processes: throughput only
    "data.os_cache",  # page cache vs. quasi-random reads: memory use (the shuffle stays seeded)
    "ray",  # worker count, resources, address, storage path, retries, checkpoints kept
    "tracking",  # MLflow URI, experiment, registration
)
# Everything else defines the run: model.* (the architecture and FP weights), data.kind / paths / sizes /
# batch_size / val_fraction, quant.*, objective.*, schedule.*, optim.*, train.seed, train.teacher_epochs
# and train.max_steps_per_epoch (a capped run is another run than an uncapped one).


def _harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS_SETTINGS)


def defining_settings(cfg_dict: dict) -> dict:
    """The dotted settings of a stored or current config that define its run (see HARMLESS_SETTINGS).

    A stored config may predate a setting (filled with its default) or carry a renamed key (mapped).
    """
    from ..config import _LEGACY_KEYS, flatten, to_dict

    stored = {}
    for section, value in (cfg_dict or {}).items():
        if isinstance(value, dict):
            legacy = _LEGACY_KEYS.get(section, {})
            value = {legacy.get(k, k): v for k, v in value.items()}
        stored[section] = value
    flat = {**flatten(to_dict(JobConfig(name="x"))), **flatten(stored)}
    return {k: scrub(k, v) for k, v in sorted(flat.items()) if not _harmless(k)}


def fingerprint(cfg_dict: dict) -> str:
    """A short stable hash of a config's defining settings (16 hex digits)."""
    import hashlib
    import json

    blob = json.dumps(defining_settings(cfg_dict), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def identity_mismatch(cfg_dict: dict, ckpt: dict) -> list[str]:
    """The defining settings on which ``cfg_dict`` and the checkpoint's stored config differ."""
    mine, theirs = defining_settings(cfg_dict), defining_settings(ckpt.get("config") or {})
    return [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def check_identity(cfg_dict: dict, ckpt: dict, where: str) -> None:
    """Refuse, in one line, to resume the run at ``where`` with settings that define another run."""
    from ..errors import RunIdentityError

    diff = identity_mismatch(cfg_dict, ckpt)
    if not diff:
        return
    mine, theirs = defining_settings(cfg_dict), defining_settings(ckpt.get("config") or {})
    order = ("model", "quant", "data", "train", "objective", "schedule", "optim")  # what users change most
    diff.sort(key=lambda k: (order.index(k.split(".")[0]) if k.split(".")[0] in order else len(order), k))
    shown = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff[:4])
    more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
    raise RunIdentityError(
        f"name: run {cfg_dict.get('name')!r} at {where} was trained with other settings ({shown}{more}); "
        f"pass --name NEW for a new run, or --fresh to set the old one aside and start this one there"
    )
