"""Pre-flight: checks that need no data loading and no Ray, so bad input fails in one line before anything starts
(on both executors and on a sweep's base job): the quantized structure on the meta device, the Ray address,
the storage folder, and local data opened as the loaders will open it."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
from pathlib import Path

from ..config import JobConfig
from ..data.facts import DatasetFacts, scan_data
from ..errors import ClusterError, ConfigError, DataError, StorageError
from .storage import storage_root

log = logging.getLogger("gdnsq")


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


BUNDLED_SIDE = 28  # the bundled digits' side in pixels (data.img_size does not apply to them)
GCS_PORT = 6379
_PORT = re.compile(r"[0-9]{1,5}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:.]{2,45}")  # a DNS name or an IP
PROBE_TIMEOUT_S = 10.0


def ray_address(cfg: JobConfig) -> str | None:
    """The Ray address training connects to (``ray.address``, else $RAY_ADDRESS), checked without Ray.

    A job-server URL (``http://HEAD:8265``, what ``gdnsq submit`` takes) in ``ray.address`` is refused in one
    line; in $RAY_ADDRESS (where our submit hint puts it) it is dropped with a warning, since ``ray.init``
    would read it. A host:port that nothing answers on fails within PROBE_TIMEOUT_S instead of Ray's
    minutes-long retries.
    """
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
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not (_PORT.fullmatch(port) and 0 < int(port) < 65536 and _HOST.fullmatch(host)):
        raise ClusterError(
            f"{field}: expected HOST:PORT (a host name or IP address, a port in 1-65535), got {address!r}"
        )
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, UnicodeError) as e:
        raise ClusterError(
            f"{field}: nothing answers at {host}:{port} ({getattr(e, 'strerror', None) or type(e).__name__}); "
            "start the Ray head there or fix the address"
        ) from None
    return address


def preflight(cfg: JobConfig) -> tuple[JobConfig, DatasetFacts | None]:
    """Checks that need no data loading or Ray, so bad input fails in one line before anything starts.

    Returns the config the run will use and the data's facts. The order is the cheapest first; a check that
    needs the data's facts (classes, sizes, the steps a budget gives) takes them from :func:`check_data`, and a
    check that changes the plan (more epochs for a descent that cannot finish) returns a new config, which the
    run header reports.
    """
    check_structure(cfg)
    if cfg.ray.enabled:
        ray_address(cfg)
    facts = check_data(cfg)
    check_input_size(cfg, facts)
    return cfg, facts


def check_storage(cfg: JobConfig) -> None:
    """A local storage path must take a file (probed, then removed with any folder made for it)."""
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


def check_data(cfg: JobConfig) -> DatasetFacts | None:
    """Local data opened here as the loaders will open it (a .beton's header and sizes, an ImageFolder's
    class folders), so a corrupt file or a folder of the wrong shape fails in one line on the driver,
    not inside a Ray worker after the cluster started. Returns what the scan learnt (None for remote data).

    Against the job: at least 2 classes, the same classes in both splits, a batch that every rank can fill
    from its share of the training set, a crop no larger than the validation resize, and a model whose
    classifier and stem fit the data. A listing, never a decode: as cheap at ImageNet scale as ``ls -R``."""
    d = cfg.data
    if d.kind != "bundled" and d.img_size > d.val_resize:
        raise DataError(f"data.img_size ({d.img_size}) must be <= data.val_resize ({d.val_resize})")
    facts = scan_data(d)
    if facts is None:
        return None
    where = {"train": "data.train_path", "val": "data.val_path"} if d.kind != "bundled" else {}
    for split in ("train", "val"):
        sf = getattr(facts, split)
        if sf.skipped_links:
            log.warning(
                "%s: %d directory link(s) not followed, into a loop or a folder already read (e.g. %s)",
                where[split],
                len(sf.skipped_links),
                sf.skipped_links[0],
            )
    train, val = facts.train, facts.val
    if len(train.classes) < 2:
        names = f" ({', '.join(train.classes)})" if d.kind == "imagefolder" else ""
        raise DataError(
            f"data.train_path: {d.train_path} has {len(train.classes)} class{names}; a classifier needs at least 2"
        )
    if d.kind == "imagefolder" and val.classes != train.classes:
        # ImageFolder numbers classes by sorted folder name: another set of folders shifts every label.
        only_train, only_val = (
            sorted(set(train.classes) - set(val.classes)),
            sorted(set(val.classes) - set(train.classes)),
        )
        parts = [
            f"only in train: {', '.join(only_train[:3])}" if only_train else "",
            f"only in val: {', '.join(only_val[:3])}" if only_val else "",
        ]
        raise DataError(
            f"data.val_path: its class folders differ from data.train_path's ({'; '.join(p for p in parts if p)})"
        )
    if d.kind == "ffcv" and len(val.classes) > len(train.classes):
        raise DataError(
            f"data.val_path: {d.val_path} has labels up to {len(val.classes) - 1}, "
            f"but data.train_path has only {len(train.classes)} classes"
        )
    ranks = cfg.ray.num_workers if cfg.ray.enabled else 1
    if train.size // ranks < d.batch_size:
        source = d.train_path if d.kind != "bundled" else "the bundled training split"
        raise DataError(
            f"data.batch_size: {d.batch_size} is more than the {train.size // ranks} training samples per rank "
            f"({train.size} in {source} over {ranks} rank(s))"
        )
    m = cfg.model
    if m.num_classes is not None and m.num_classes < facts.num_classes:
        raise ConfigError(f"model.num_classes: {m.num_classes} is fewer than the data's {facts.num_classes} classes")
    if m.in_chans is not None and facts.in_chans is not None and m.in_chans != facts.in_chans:
        raise ConfigError(f"model.in_chans: {m.in_chans}, but the data has {facts.in_chans} channel(s)")
    return facts


def check_input_size(cfg: JobConfig, facts: DatasetFacts | None) -> None:
    """The FP model, built on the meta device (no memory, no weights), takes one batch of the data's images: a ViT
    made for 224 pixels given 64, or a size that a stride leaves empty, fails here in one line."""
    import torch

    from ..training.models import create_model

    size = BUNDLED_SIDE if cfg.data.kind == "bundled" else cfg.data.img_size
    chans = (facts.in_chans if facts else None) or 3
    num_classes = facts.num_classes if facts else 10
    with torch.device("meta"):
        model = create_model(cfg.model, num_classes=num_classes, in_chans=chans, load_weights=False)
        try:
            model.eval()(torch.zeros(1, cfg.model.in_chans or chans, size, size))
        except Exception as e:  # noqa: BLE001 - whatever the model raises, the size is what to change
            what = "data.img_size" if cfg.data.kind != "bundled" else "model.name"
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{what}: {cfg.model.name} cannot take {size}x{size} images ({reason})") from None
