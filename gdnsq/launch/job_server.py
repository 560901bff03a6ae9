"""The Ray job server client: ``gdnsq submit`` hands it a submission, ``gdnsq jobs`` lists, follows and stops
what was submitted.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ..errors import ClusterError, ConfigError
from .submit import Submission

DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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
