"""Where runs are stored: tracking-URI resolution, experiments with explicit artifact locations, HTTP defaults.

Store: ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/.gdnsq/mlflow.db``. Experiments
in a non-server store get an explicit artifact location next to the database (without one, a run
started inside a Ray worker put its artifacts in Ray's temporary session folder). With a server
URI the server's proxied artifact store is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .names import safe_name

log = logging.getLogger(__name__)


def default_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``sqlite:///<root>/.gdnsq/mlflow.db`` (root = cwd); the folder is created."""
    folder = Path(root or os.getcwd()).resolve() / ".gdnsq"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store.

    Call this in the driver and pass the result to workers: a Ray worker's cwd is not the driver's.
    """
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def resolve_read_uri(uri: str | None = None) -> str:
    """:func:`resolve_tracking_uri` for commands that only read: a local store that does not exist is a
    one-line :class:`RegistryError` naming where it looked, not a new empty database."""
    from ..errors import RegistryError

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        path = Path(os.getcwd()).resolve() / ".gdnsq" / "mlflow.db"
        uri = f"sqlite:///{path}"
        hint = (
            "run from the folder a run was started in, or pass --tracking-uri URI / set "
            "MLFLOW_TRACKING_URI (e.g. http://localhost:5000)"
        )
    else:
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        hint = "check --tracking-uri / MLFLOW_TRACKING_URI"
    if path is not None and not path.is_file():
        raise RegistryError(f"no MLflow store at {uri}: {hint}")
    return uri


def run_artifact_uri(uri: str, run_id: str) -> str | None:
    """Where run ``run_id`` of store ``uri`` keeps its artifacts (plots, bits tables); None if unknown."""
    try:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=uri).get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - only used to tell the user where to look
        return None


def is_server_uri(uri: str) -> bool:
    """True for a tracking server (HTTP, Databricks); False for a database or file store used directly."""
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Explicit artifact root for a new experiment in a non-server store; None = server default."""
    if is_server_uri(uri):
        return None
    if uri.startswith("sqlite:///"):
        base = Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts"
    else:  # postgresql://, mysql://, file:// used directly: keep artifacts beside the working dir
        base = Path(os.getcwd()).resolve() / ".gdnsq" / "mlartifacts"
    return (base / safe_name(experiment)).as_uri()


def ensure_experiment(client, name: str, uri: str) -> str:
    """Experiment id by name, created (with an explicit artifact location) or restored if deleted."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException:  # created concurrently by another sweep trial
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def set_http_defaults() -> None:
    """MLflow's own HTTP settings for a run's tracking server (user settings win).

    MLflow's defaults (a 120 s timeout, 7 retries with exponential backoff) hold one call for minutes, and
    urllib3 logs a "Retrying (Retry(total=...))" warning per retry. A run's calls go through the outbox, which
    is the retry loop (backoff, replay) and keeps the wait bounded, so each attempt is one request: no retry
    inside MLflow (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, so no backoff either) and a 10 s timeout, what a
    server that accepts the connection but does not answer costs one wait.

    MLflow prints "View run NAME at: URL" to stdout when a run ends, its URL built from the tracking URI with its
    user info, password included (a write gdnsq's redaction never sees); the run's footer names the run and the
    UI, so that print is off too."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
