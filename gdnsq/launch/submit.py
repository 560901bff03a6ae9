"""Submit job files to a Ray cluster's job server, and follow, list and stop what was submitted.

``gdnsq submit JOB.yaml --address http://HEAD:8265`` validates the job here (``load_config``, with the
same dotted overrides), so a broken job never reaches the cluster, then hands Ray's job server

- ``entrypoint``: ``gdnsq train JOB.yaml --key=value ...`` (``gdnsq sweep`` for a file with a ``sweep:``
  section), run by the ``gdnsq`` the cluster image has installed;
- ``runtime_env.working_dir``: the job file's folder (or ``--working-dir``), uploaded by Ray without
  ``.venv``, ``.git``, ``runs``, ``out``, ``.gdnsq`` and a top-level ``gdnsq/`` package: Ray puts the
  working dir first on ``PYTHONPATH``, and a stray copy of the package would silently replace the image's.
  ``--ship-code`` sends this machine's ``gdnsq`` package as ``py_modules`` instead, to run unreleased code.

Addresses are the job server's HTTP URL (the dashboard port, 8265 by default), from ``--address`` or the
environment (``RAY_API_SERVER_ADDRESS``, then ``RAY_ADDRESS`` when it is an ``http(s)://`` URL). Ray's client
lets those variables override its argument; here an explicit ``--address`` wins.

The job server client (address, token, list / logs / stop) is :mod:`gdnsq.launch.job_server`.
"""

from __future__ import annotations

import re
import shlex
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import JobConfig, load_config
from ..errors import ConfigError

# gitignore-style patterns relative to the working dir; "/gdnsq" only at its top (see the module docstring).
EXCLUDES = [".venv", ".git", "runs", "out", ".gdnsq", "mlruns", "__pycache__", "*.egg-info", "/gdnsq"]
_CHECKPOINT_MISSING = "model.checkpoint: no such file"


@dataclass
class Submission:
    """Everything ``JobSubmissionClient.submit_job`` receives, built (and validated) without a cluster."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float = 0
    entrypoint_num_gpus: float = 0
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- validation


def validate_job(path: str | Path, overrides: dict[str, str]) -> tuple[JobConfig, list[str]]:
    """``load_config`` as the cluster will run it. A ``model.checkpoint`` that this machine cannot see
    is the one thing left to the cluster (its paths are the cluster's), with a warning."""
    try:
        return load_config(path, overrides), []
    except ConfigError as e:
        if not str(e).startswith(_CHECKPOINT_MISSING):
            raise
        cfg = load_config(path, {**overrides, "model.checkpoint": "none"})
        return cfg, [f"{e} here; it must exist on the cluster"]


def is_sweep_file(path: str | Path) -> bool:
    data = yaml.safe_load(Path(path).read_text())
    return isinstance(data, dict) and "sweep" in data


def _submission_id(name: str) -> str:
    return f"gdnsq-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{uuid.uuid4().hex[:8]}"


def build_submission(
    job: str | Path,
    overrides: dict[str, str] | None = None,
    *,
    name: str | None = None,
    submission_id: str | None = None,
    working_dir: str | Path | None = None,
    ship_code: bool = False,
    runtime_env: dict[str, Any] | None = None,
) -> Submission:
    """Validate ``job`` (+ overrides) and describe its submission. Raises ConfigError before any I/O
    with a cluster. ``name`` sets the run name (a new name = a fresh run; the same name resumes).
    ``runtime_env`` (``--runtime-env FILE`` / ``--runtime-env-json``, as in ``ray job submit``) is merged
    over ours: its keys win, its ``env_vars`` and ``excludes`` add to ours."""
    job = Path(job)
    overrides = dict(overrides or {})
    if name is not None:
        overrides["name"] = name
    cfg, warnings = validate_job(job, overrides)
    root = Path(working_dir or job.resolve().parent).resolve()
    if not root.is_dir():
        raise ConfigError(f"--working-dir: no such directory {str(root)!r}")
    try:
        rel = job.resolve().relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(f"--working-dir: {str(root)!r} does not contain the job file {str(job)!r}") from None
    command = "sweep" if is_sweep_file(job) else "train"
    entrypoint = shlex.join(["gdnsq", command, rel, *(f"--{k}={v}" for k, v in overrides.items())])
    from .console import quiet_env

    user_env = dict(runtime_env or {})
    runtime_env = {
        "working_dir": str(root),
        "excludes": list(EXCLUDES),
        # logs stream while the job runs; the console's switches (no colour codes, no Ray
        # result dumps, no doubled worker lines) reach the job's workers too
        "env_vars": {"PYTHONUNBUFFERED": "1", **quiet_env(0)},
    }
    runtime_env["env_vars"].update(user_env.pop("env_vars", None) or {})
    runtime_env["excludes"] += list(user_env.pop("excludes", None) or [])
    runtime_env.update(user_env)
    if ship_code:
        runtime_env["py_modules"] = [str(Path(__file__).resolve().parents[1])]  # the gdnsq package
    # Without Ray Train the driver itself trains: reserve its worker's resources for it. With Ray Train
    # (or Tune) the driver only coordinates, and must not hold a slot its workers need.
    in_driver = command == "train" and not cfg.ray.enabled
    return Submission(
        submission_id=submission_id or _submission_id(cfg.name or job.stem),
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata={"gdnsq_name": cfg.name or "", "gdnsq_file": rel, "gdnsq_command": command},
        entrypoint_num_cpus=(cfg.ray.cpus_per_worker or 1) if in_driver else 0,
        entrypoint_num_gpus=1 if in_driver and cfg.ray.use_gpu else 0,
        warnings=warnings,
    )


def read_runtime_env(path: str | None, text: str | None) -> dict[str, Any] | None:
    """``--runtime-env FILE`` (YAML) or ``--runtime-env-json TEXT``, as ``ray job submit`` takes them."""
    import json

    if path and text:
        raise ConfigError("--runtime-env: give a file or --runtime-env-json, not both")
    if path:
        from ..config import read_yaml

        data = read_yaml(path, "--runtime-env")
    elif text:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--runtime-env-json: not valid JSON ({e.msg})") from None
    else:
        return None
    if not isinstance(data, dict):
        raise ConfigError("--runtime-env: must hold a mapping (working_dir, env_vars, pip, ...)")
    return data
