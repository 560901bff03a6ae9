"""Where runs live: the storage root rule and small file helpers for local paths and remote URIs alike."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..config import JobConfig

DEFAULT_ROOT = "runs"
SUMMARY_FILE = "summary.json"  # a Ray Train run's summary, next to its checkpoints: <root>/<name>/summary.json


def storage_root(cfg: JobConfig) -> str:
    """``ray.storage_path`` (a shared path or ``s3://`` URI), else ./runs; local paths made absolute, since
    Ray workers and Tune trials run with another working directory than the driver."""
    root = cfg.ray.storage_path or DEFAULT_ROOT
    return root if "://" in root else os.path.abspath(root)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a summary is as readable as any other output
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def fs_of(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = fs_of(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_json(uri: str) -> dict | None:
    if not exists(uri):
        return None
    fs, path = fs_of(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = fs_of(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
