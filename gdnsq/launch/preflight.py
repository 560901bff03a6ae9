"""Pre-flight: checks that need no data loading and no Ray, so bad input fails in one line before anything starts
(on both executors and on a sweep's base job): the quantized structure on the meta device, the Ray address,
the storage folder, and local data opened as the loaders will open it."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

from ..config import JobConfig
from ..data.facts import DatasetFacts, scan_data
from ..errors import ClusterError, StorageError
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


GCS_PORT = 6379
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
    not inside a Ray worker after the cluster started. Returns what the scan learnt (None for remote data)."""
    return scan_data(cfg.data)
