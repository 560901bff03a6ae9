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

Token authentication (Ray 2.60: on by default for a cluster that ``ray.init()`` starts; ``ray start`` turns it
on when ``RAY_AUTH_MODE=token`` or a token file exists): every request to the job server must then carry
``Authorization: Bearer <token>``, the cluster's shared secret. Ray's own client adds that header only
when ``RAY_AUTH_MODE=token`` is set in the submitting process; gdnsq instead reads the token itself, in Ray's
order, and always sends it when it finds one:

1. ``RAY_AUTH_TOKEN`` (the token itself; what KubeRay puts in the cluster's pods),
2. ``RAY_AUTH_TOKEN_PATH`` (a file holding it; an unreadable file is an error, as in Ray),
3. ``~/.ray/auth_token`` (where ``ray get-auth-token --generate`` writes it).

Getting it onto a laptop: on the head node, ``ray get-auth-token`` prints it (KubeRay:
``kubectl get secret <cluster> -o jsonpath='{.data.auth_token}' | base64 -d``); store it in
``~/.ray/auth_token`` (mode 600) or point ``RAY_AUTH_TOKEN_PATH`` at it. Never put it in a job file or a
command line. The token travels in clear text: reach the job server over TLS or an SSH/kubectl tunnel
(``kubectl port-forward svc/<head> 8265``). A missing or wrong token fails with one line (401/403).
Inside the job, the cluster's own environment carries the token to the driver, so ``ray.init`` there needs
nothing from us.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..config import JobConfig, load_config
from ..errors import ClusterError, ConfigError

DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
# gitignore-style patterns relative to the working dir; "/gdnsq" only at its top (see the module docstring).
EXCLUDES = [".venv", ".git", "runs", "out", ".gdnsq", "mlruns", "__pycache__", "*.egg-info", "/gdnsq"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
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


# ------------------------------------------------------------------------------------- the client


def resolve_address(address: str | None) -> str:
    """The job server URL: ``address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; as in
    ``ray job submit``, ``HEAD:8265`` without a scheme means ``http://HEAD:8265``."""
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    chosen = address or env
    source = "--address" if address else "RAY_ADDRESS"
    if not chosen:
        raise ConfigError("--address: no job server given; pass --address HEAD:8265 or set RAY_ADDRESS")
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    if not re.match(r"https?://", chosen):
        raise ConfigError(
            f"{source}: {chosen!r} is not the job server's URL; use HEAD:8265 or http://HEAD:8265 "
            "(the dashboard port, not the GCS port)"
        )
    if chosen.rstrip("/").endswith(":6379"):
        raise ConfigError(
            f"{source}: {chosen!r} is the GCS port; the job server listens on the dashboard port (8265 by default)"
        )
    return chosen.rstrip("/")


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


def auth_token() -> str | None:
    """The cluster token, looked up as Ray does: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH: cannot read {path!r} ({e.strerror})") from None
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH: {path!r} is empty")
        return token
    default = DEFAULT_TOKEN_PATH.expanduser()
    if default.is_file():
        return default.read_text().strip() or None
    return None


@contextlib.contextmanager
def _cluster_errors(address: str) -> Iterator[None]:
    """Turn the client's failures (connection, auth, HTTP errors) into one-line ClusterErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        first = str(e).splitlines()[0]
        raise ClusterError(
            f"{address}: {first} (the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token; see `gdnsq submit --help`)"
        ) from None
    except (ConnectionError, OSError) as e:
        raise ClusterError(f"{address}: cannot reach the Ray job server ({' '.join(str(e).split())})") from None
    except RuntimeError as e:  # Ray's "Request failed with status code 404: Job ... does not exist."
        raise ClusterError(f"{address}: {' '.join(str(e).split())}") from None


def create_client(address: str | None):
    """A JobSubmissionClient for ``address`` that sends the cluster token when one is found."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray's client lets these variables override its address argument; an explicit --address must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        with _cluster_errors(url):
            return JobSubmissionClient(url, headers=headers)
    finally:
        os.environ.update(saved)


# ------------------------------------------------------------------------------------- operations


def submit(sub: Submission, address: str | None) -> str:
    client = create_client(address)
    with _cluster_errors(client.get_address()):
        return client.submit_job(
            entrypoint=sub.entrypoint,
            runtime_env=sub.runtime_env,
            submission_id=sub.submission_id,
            metadata=sub.metadata,
            entrypoint_num_cpus=sub.entrypoint_num_cpus,
            entrypoint_num_gpus=sub.entrypoint_num_gpus,
        )


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """Submitted jobs, oldest first, as plain dicts."""
    client = create_client(address)
    with _cluster_errors(client.get_address()):
        jobs = client.list_jobs()
    rows = [
        {
            "submission_id": j.submission_id,
            "status": str(j.status.value),
            "start_time": j.start_time,
            "end_time": j.end_time,
            "name": (j.metadata or {}).get("gdnsq_name", ""),
            "entrypoint": j.entrypoint,
            "message": j.message or "",
        }
        for j in jobs
        if j.submission_id
    ]
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def job_info(address: str | None, submission_id: str) -> dict[str, Any]:
    client = create_client(address)
    with _cluster_errors(client.get_address()):
        j = client.get_job_info(submission_id)
    return {
        "submission_id": j.submission_id,
        "status": str(j.status.value),
        "message": j.message or "",
        "entrypoint": j.entrypoint,
        "start_time": j.start_time,
        "end_time": j.end_time,
        "metadata": j.metadata or {},
    }


def job_logs(address: str | None, submission_id: str) -> str:
    client = create_client(address)
    with _cluster_errors(client.get_address()):
        return client.get_job_logs(submission_id)


def follow_logs(address: str | None, submission_id: str, out: TextIO) -> str:
    """Stream the job's logs to ``out`` until it ends; returns its final status."""
    client = create_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    with _cluster_errors(client.get_address()):
        client.get_job_status(submission_id)  # a clean 404 for an unknown id before opening the socket
        asyncio.run(tail())
        return str(client.get_job_status(submission_id).value)


def stop_job(address: str | None, submission_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    client = create_client(address)
    with _cluster_errors(client.get_address()):
        return client.stop_job(submission_id)
