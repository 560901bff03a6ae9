"""MLflow run tracking: config, per-layer bit-widths, plots; robust to a tracking server that is down.

Edge module: the training driver, the sweep and the CLI import it; the core (quant, objective,
engine) never does, and MLflow itself is imported lazily so ``import gdnsq.tracking.run`` stays cheap.

Every MLflow call goes through an *outbox*: the training thread appends one JSON line to a journal
on disk and returns at once; a daemon thread delivers the lines in order (metric lines merged into
``log_batch`` requests), retrying with exponential backoff while the server is unreachable. So a
down or slow server never blocks a training step, memory stays bounded (the backlog is on disk),
and a retried metric is harmless (the store deduplicates identical key/step/timestamp/value rows).
``finish`` waits a bounded time; anything still undelivered stays in the outbox folder, which
``replay(folder)`` (``python -m gdnsq.tracking.run replay FOLDER``) delivers later.

Store: ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/.gdnsq/mlflow.db``. Experiments
in a non-server store get an explicit artifact location next to the database (without one, a run
started inside a Ray worker put its artifacts in Ray's temporary session folder). With a server
URI the server's proxied artifact store is used.
"""
from __future__ import annotations

import atexit
import csv
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..config import flatten, to_dict

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_LEN = 6000  # MLflow >= 2.x server limit (older servers: 500); longer values go to config.json
MAX_TAG_LEN = 8000
MAX_KEY_LEN = 250

# ------------------------------------------------------------------------------------ store / uri


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


def default_outbox_dir(path: str | os.PathLike | None = None) -> Path:
    """Where undelivered MLflow calls wait: ``path`` > ``$GDNSQ_OUTBOX_DIR`` > ``~/.cache/gdnsq/outbox``.

    Not the cwd: a Ray worker's cwd is a temporary session folder that disappears with the job.
    """
    return Path(path or os.environ.get("GDNSQ_OUTBOX_DIR") or Path.home() / ".cache" / "gdnsq" / "outbox")


def is_server_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Explicit artifact root for a new experiment in a non-server store; None = server default."""
    if is_server_uri(uri):
        return None
    if uri.startswith("sqlite:///"):
        base = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
    else:  # postgresql://, mysql://, file:// used directly: keep artifacts beside the working dir
        base = Path(os.getcwd()).resolve() / ".gdnsq" / "mlartifacts"
    return (base / _safe_name(experiment)).as_uri()


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


def _set_http_defaults() -> None:
    # MLflow's defaults (120 s timeout, 7 retries with backoff) can hold one call for minutes; the
    # outbox retries on its own, so each attempt should fail fast. User settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


# ------------------------------------------------------------------------------ names and secrets

_SECRET_PARTS = {"password", "passwd", "pwd", "secret", "secrets", "token", "key", "apikey", "credential",
                 "credentials", "auth", "passphrase"}
_SECRET_SUBSTRINGS = ("password", "secret", "apikey", "passphrase")
_URI_PASSWORD = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.\-]*://[^/\s:@]*:)(?P<pw>[^\s/]*)(?=@)", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<pre>[?&;][\w.\-]*(?:password|passwd|secret|token|key|sig|signature|credential)[\w.\-]*=)[^&;#\s]+", re.I)
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """True for names like ``db.password``, ``api_key``, ``access-token`` (not ``num_tokens``)."""
    parts = [p for p in re.split(r"[._\-/\s]+", key.lower()) if p]
    return any(p in _SECRET_PARTS or any(s in p for s in _SECRET_SUBSTRINGS) for p in parts)


def scrub_value(value: str) -> str:
    """Redact passwords in URIs (``postgresql://u:pw@h``) and secret-looking query parameters."""
    value = _URI_PASSWORD.sub(lambda m: m.group("pre") + REDACTED, value)
    return _QUERY_SECRET.sub(lambda m: m.group("pre") + REDACTED, value)


def scrub(key: str, value: Any) -> Any:
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    return scrub_value(value) if isinstance(value, str) else value


def scrub_tree(data: Any, key: str = "") -> Any:
    """Scrubbed deep copy of a nested dict/list (for config.json)."""
    if isinstance(data, dict):
        return {k: scrub_tree(v, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [scrub_tree(v, key) for v in data]
    return scrub(key, data)


def metric_key(name: str) -> str:
    """A valid MLflow metric/param/tag key: allowed characters only, no '.', '..' or empty segments."""
    s = re.sub(r"[^/\w.\- ]", "_", str(name))  # ':' is refused by Windows servers
    segs = [("_" if p in (".", "..") else p) for p in s.split("/") if p]
    return "/".join(segs)[:MAX_KEY_LEN] or "_"


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "default"


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def _param_str(value: Any) -> str:
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """Tags naming the code: package version, git commit (and '.dirty') when run from a checkout."""
    from .. import __version__

    tags = {"gdnsq.version": __version__, "gdnsq.code_version": __version__}
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=3, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=3).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return tags
    if sha:
        tags["mlflow.source.git.commit"] = sha
        tags["gdnsq.code_version"] = f"{__version__}+g{sha[:10]}" + (".dirty" if dirty else "")
    return tags


def protocol_tags(cfg: dict) -> dict[str, str]:
    """Tags that say what was quantized how: model, targets, granularity, FP layers, FP checkpoint."""
    m, q = cfg.get("model", {}), cfg.get("quant", {})
    excluded = [n for n, on in (("first conv", q.get("keep_first_conv")), ("classifier", q.get("keep_classifier")),
                                ("1x1 convs", q.get("keep_pointwise"))) if on]
    excluded += [f"/{r['pattern']}/" for r in q.get("rules", []) if r.get("skip")]
    tw, ta = q.get("target_w"), q.get("target_a")
    granularity = "per-channel" if q.get("per_channel") else "per-tensor"
    fp_source = m.get("checkpoint") or ("timm pretrained" if m.get("pretrained") else "teacher trained in-run")
    return {
        "gdnsq.job": str(cfg.get("name", "")),
        "gdnsq.model": str(m.get("name", "")),
        "gdnsq.method": str(q.get("method", "")),
        "gdnsq.estimator": str(q.get("estimator", "")),
        "gdnsq.target_w": f"{tw:g}" if tw is not None else "",
        "gdnsq.target_a": f"{ta:g}" if ta is not None else "",
        "gdnsq.per_channel": str(q.get("per_channel")),
        "gdnsq.excluded": ", ".join(excluded) or "none",
        "gdnsq.protocol": f"W{tw:g}A{ta:g}, {granularity} weights, FP: {', '.join(excluded) or 'none'}"
        if tw is not None and ta is not None else "",
        "gdnsq.fp_checkpoint": str(fp_source),
    }


# ---------------------------------------------------------------------------------------- outbox


class _Permanent(Exception):
    """A call the store refused for good (bad request); retrying cannot help."""


def _classify(exc: BaseException) -> str:
    """'permanent' (4xx), 'server' (an answer like 5xx/429, or a bug: retry a few times), 'down' (retry on).

    Unreachable servers surface as MlflowException without an HTTP answer (INTERNAL_ERROR), or as
    requests/OS errors; only those are retried for as long as it takes.
    """
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        if 400 <= code < 500 and code != 429:
            return "permanent"
        return "server" if isinstance(exc, RestException) else "down"
    if isinstance(exc, (OSError, requests.RequestException)):
        return "down"
    return "server"


class _Outbox:
    """An append-only JSON-lines journal of MLflow calls and the daemon thread that delivers it.

    Ops (one JSON list per line): ``["start", spec]``, ``["metrics", [[key, value, ts_ms, step], ...]]``,
    ``["params", [[k, v], ...]]``, ``["tags", [[k, v], ...]]``, ``["artifact", relpath, artifact_path]``,
    ``["end", status, ts_ms]``. Delivered lines are forgotten; the journal is truncated whenever empty.
    """

    MERGE_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow log_batch limits
    MAX_SERVER_ERRORS = 8
    COMPACT_BYTES = 32 << 20
    MAX_BACKOFF_S = 30.0

    def __init__(self, folder: Path, uri: str, run_id: str | None = None, *, live: bool = True):
        self.folder, self.uri = folder, uri
        self.files = folder / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.journal = folder / "journal.jsonl"
        self.run_id, self.experiment_id = run_id, None
        self.dropped = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wfh = open(self.journal, "a", encoding="utf-8")
        self._offset, self._closed = 0, False
        with open(self.journal, "rb") as f:  # replay: lines left by an earlier process
            self._pending = sum(1 for _ in f)
        self._client = None
        self._stop, self._kick, self._urgent = threading.Event(), threading.Event(), False
        self._thread = threading.Thread(target=self._loop, name="gdnsq-mlflow-outbox", daemon=True)
        self._write_meta()
        if live:
            self._thread.start()

    # ------------------------------------------------------------------ producer side
    def put(self, op: list) -> None:
        line = json.dumps(op, separators=(",", ":"), default=str)
        with self._lock:
            if self._closed:
                log.warning("MLflow tracker already finished; %s dropped", op[0])
                return
            self._wfh.write(line + "\n")
            self._wfh.flush()
            self._pending += 1

    def stage(self, src: str | os.PathLike) -> str:
        """Copy a file or folder into the outbox so later changes by the caller do not matter."""
        src = Path(src)
        rel = f"{uuid.uuid4().hex[:8]}/{src.name}"
        dst = self.files / rel
        dst.parent.mkdir(parents=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return rel

    def pending(self) -> int:
        return self._pending

    def wait_run_id(self, timeout: float) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: self.run_id is not None, timeout=timeout)
        return self.run_id

    def drain(self, timeout: float) -> bool:
        """Wait (bounded) until every queued call is delivered; retries speed up meanwhile."""
        self._urgent = True
        self._kick.set()
        try:
            with self._cond:
                self._cond.wait_for(lambda: self._pending == 0, timeout=max(0.0, timeout))
                return self._pending == 0
        finally:
            self._urgent = False

    def close(self, join_timeout: float = 15.0) -> None:
        """Stop the thread; keep only undelivered lines in the journal (for ``replay``)."""
        self._stop.set()
        self._kick.set()
        if self._thread.is_alive():
            self._thread.join(join_timeout)
        with self._lock:
            self._closed = True
            self._wfh.close()
            with open(self.journal, "rb") as f:
                f.seek(self._offset)
                rest = f.read()
            self.journal.write_bytes(rest)
            self._offset = 0
        self._write_meta()

    # ------------------------------------------------------------------ delivery side
    def _write_meta(self) -> None:
        meta = {"uri": scrub_value(self.uri), "run_id": self.run_id, "experiment_id": self.experiment_id}
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.folder / "meta.json")

    def _read_group(self) -> tuple[str, Any, int, int] | None:
        """Next deliverable group: consecutive same-kind ops merged up to MLflow's batch limits.

        Returns (kind, payload, end offset, lines) or None when nothing complete is queued.
        """
        with open(self.journal, "rb") as f:
            f.seek(self._offset)
            kind, merged, n, end = None, [], 0, self._offset
            while True:
                line = f.readline()
                if not line.endswith(b"\n"):  # nothing more, or a line still being written
                    break
                op = json.loads(line)
                if kind is None and op[0] not in self.MERGE_LIMITS:
                    return op[0], op, end + len(line), 1
                if kind is not None and (op[0] != kind or len(merged) + len(op[1]) > self.MERGE_LIMITS[kind]):
                    break
                kind = op[0]
                merged.extend(op[1])
                n, end = n + 1, end + len(line)
        return (kind, merged, end, n) if n else None

    def _advance(self, end: int, n: int) -> bool:
        """Forget ``n`` delivered lines; False once the outbox is closed (the journal is final then)."""
        with self._cond:
            if self._closed:
                return False
            self._offset = end
            self._pending -= n
            if self._pending == 0:  # everything delivered: start the journal afresh
                self._wfh.truncate(0)
                self._offset = 0
            elif self._offset > self.COMPACT_BYTES:  # long outage, busy logging: drop the delivered head
                self._wfh.close()
                with open(self.journal, "rb") as f:
                    f.seek(self._offset)
                    rest = f.read()
                tmp = self.journal.with_suffix(".tmp")
                tmp.write_bytes(rest)
                tmp.replace(self.journal)
                self._wfh = open(self.journal, "a", encoding="utf-8")
                self._offset = 0
            self._cond.notify_all()
        return True

    def _loop(self) -> None:
        backoff, server_errors = 0.5, 0
        while True:
            try:
                group = self._read_group()
            except (OSError, ValueError) as e:  # journal unreadable: nothing sensible left to do
                log.warning("MLflow outbox %s unreadable (%s); tracking stops", self.journal, e)
                return
            if group is None:
                if self._stop.is_set():
                    return
                self._kick.wait(0.2)
                self._kick.clear()
                continue
            kind, payload, end, n = group
            try:
                self._deliver(kind, payload)
            except _Permanent as e:
                self.dropped += n
                log.warning("MLflow refused %s (%s); dropped", kind, e)
            except Exception as e:  # noqa: BLE001 - any failure of the store: back off and retry
                state = _classify(e)
                server_errors += state == "server"
                if state == "permanent" or server_errors > self.MAX_SERVER_ERRORS:
                    self.dropped += n
                    log.warning("MLflow refused %s (%s); dropped", kind, str(e).splitlines()[0][:300])
                else:
                    if backoff == 0.5:
                        log.warning("MLflow unreachable (%s); buffering and retrying",
                                    str(e).splitlines()[0][:200])
                    if self._stop.is_set():
                        return
                    self._kick.wait(min(backoff, 1.0) if self._urgent else backoff)
                    self._kick.clear()
                    backoff = min(backoff * 2, self.MAX_BACKOFF_S)
                    continue
            backoff, server_errors = 0.5, 0
            if not self._advance(end, n):
                return

    def _get_client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _deliver(self, kind: str, payload) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._get_client()
        if kind == "start":
            return self._start(client, payload[1])
        if self.run_id is None:
            raise _Permanent("no run (its creation failed)")
        if kind == "metrics":
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in payload])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload])
        elif kind == "params":
            try:
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in payload])
            except Exception as e:
                if _classify(e) != "permanent":
                    raise
                # One changed value (a resumed run with another config) must not lose the others.
                for k, v in payload:
                    try:
                        client.log_param(self.run_id, k, v)
                    except Exception as e1:  # noqa: BLE001
                        if _classify(e1) != "permanent":
                            raise
                        self.dropped += 1
                        log.warning("MLflow param %s=%r refused (%s)", k, v, str(e1).splitlines()[0][:200])
        elif kind == "artifact":
            _, rel, artifact_path = payload
            path = self.files / rel
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                client.log_artifact(self.run_id, str(path), artifact_path)
        elif kind == "end":
            _, status, end_ms = payload
            client.set_terminated(self.run_id, status, end_ms)
        else:
            raise _Permanent(f"unknown op {kind!r}")

    def _start(self, client, spec: dict) -> None:
        from mlflow.exceptions import MlflowException

        self.experiment_id = ensure_experiment(client, spec["experiment"], self.uri)
        run_id = spec.get("run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.status != "RUNNING":  # a restarted worker takes its run back
                    client.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                if _classify(e) != "permanent":
                    raise
                log.warning("MLflow run %s not found in %s; starting a new run", run_id, scrub_value(self.uri))
                run_id = None
        if not run_id:
            # A create_run whose reply was lost would be retried into a duplicate: look first.
            found = client.search_runs([self.experiment_id], f"tags.`gdnsq.tracker_id` = '{spec['tracker_id']}'",
                                       max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                tags = dict(spec.get("tags") or {}, **{"gdnsq.tracker_id": spec["tracker_id"]})
                if spec.get("parent_run_id"):
                    tags["mlflow.parentRunId"] = spec["parent_run_id"]
                run_id = client.create_run(self.experiment_id, run_name=spec.get("run_name"), tags=tags).info.run_id
        with self._cond:
            self.run_id = run_id
            self._cond.notify_all()
        self._write_meta()


def replay(folder: str | os.PathLike, uri: str | None = None, timeout: float = 300.0) -> bool:
    """Deliver an outbox left behind by a ``finish`` that timed out. True when all went through.

    ``uri`` is needed when the stored one had a password (it is stored redacted).
    """
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    uri = uri or meta["uri"]
    if REDACTED in uri:
        raise ValueError(f"{folder}: the stored tracking URI is redacted; pass uri=")
    box = _Outbox(folder, uri, meta.get("run_id"), live=False)
    box.experiment_id = meta.get("experiment_id")
    box._urgent = True
    box._thread.start()
    ok = box.drain(timeout)
    box.close()
    if ok:
        shutil.rmtree(folder, ignore_errors=True)
    return ok


# ----------------------------------------------------------------------------------------- plots
# matplotlib's object API with the Agg canvas: no pyplot, no global backend switch, thread-safe.

ACCURACY_KEYS = ("val/top1", "top1", "val/ns_top1", "test/top1")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def draw_bits_evolution(history: list[dict], path: Path) -> bool:
    """Two panels (weights, activations): one line per layer of continuous bits vs epoch, targets dashed."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    names = list(dict.fromkeys(r["name"] for h in history for r in h["layers"]))
    if not names:
        return False
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, side in zip(axes, ("w", "a")):
        for name in names:
            ys = [next((r.get(f"bits_{side}") for r in h["layers"] if r["name"] == name), None) for h in history]
            pts = [(e, y) for e, y in zip(epochs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", lw=1.2, label=name)
        targets = {r.get(f"target_{side}") for h in history for r in h["layers"]} - {None}
        for t in sorted(targets):
            ax.axhline(t, ls="--", color="k", lw=0.8)
        ax.set_title("weights" if side == "w" else "activations")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits (continuous)")
    if len(names) <= 24:
        axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    return True


def draw_accuracy_vs_bits(history: list[dict], path: Path, fp_top1: float | None = None) -> bool:
    """Validation accuracy against the mean weight / activation bits, one point per epoch."""
    key = next((k for k in ACCURACY_KEYS if any(k in h["metrics"] for h in history)), None)
    key = key or next((k for h in history for k in h["metrics"] if k.endswith("top1")), None)
    if key is None:
        return False
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    for side, marker in (("w", "o"), ("a", "s")):
        pts = []
        for h in history:
            bits = [r[f"bits_{side}"] for r in h["layers"] if r.get(f"bits_{side}") is not None]
            if bits and key in h["metrics"]:
                pts.append((sum(bits) / len(bits), h["metrics"][key], h["epoch"]))
        if pts:
            xs, ys, es = zip(*pts)
            ax.plot(xs, ys, marker=marker, lw=1, label=f"mean {'weight' if side == 'w' else 'activation'} bits")
            for x, y, e in pts:
                ax.annotate(str(e), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if fp_top1 is not None:
        ax.axhline(fp_top1, ls="--", color="k", lw=0.8, label="FP top-1")
    ax.set_xlabel("mean bits (labels: epoch)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


# ------------------------------------------------------------------------------------- trackers


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_float(v: Any) -> float | None:
    try:
        return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None


class RunTracker:
    """One MLflow run: start or reattach (``run_id``), nested under ``parent_run_id`` (sweeps).

    All logging methods return at once and never raise because of the tracking store.
    Keep ``state_dict()`` (or at least ``run_id``) in the checkpoint and pass it back on resume so a
    restarted worker continues the same run instead of leaving a RUNNING orphan.
    """

    def __init__(self, uri: str | None = None, experiment: str = "gdnsq", *, run_id: str | None = None,
                 parent_run_id: str | None = None, run_name: str | None = None, tags: dict | None = None,
                 state: dict | None = None, outbox_dir: str | os.PathLike | None = None,
                 start_timeout: float = 5.0, finish_timeout: float = 60.0):
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.finish_timeout = finish_timeout
        if is_server_uri(self.uri):
            _set_http_defaults()
        state = state or {}
        run_id = run_id or state.get("run_id")
        self._requested_run_id = run_id
        self._history: list[dict] = list(state.get("history", []))
        self._summary: dict | None = state.get("summary")
        self._finished, self._delivered = False, False
        self.tracker_id = uuid.uuid4().hex
        self.outbox = _Outbox(default_outbox_dir(outbox_dir) / self.tracker_id, self.uri, None)
        self.outbox.put(["start", {"experiment": experiment, "run_id": run_id, "run_name": run_name,
                                   "parent_run_id": parent_run_id, "tracker_id": self.tracker_id,
                                   "tags": self._clean_tags({**code_version(), **(tags or {})})}])
        # Wait a little so the run id can go into the first checkpoint; a down server just delays it.
        self.outbox.wait_run_id(start_timeout)
        _live_trackers.add(self)

    # ------------------------------------------------------------------ identity / state
    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None for a new run while the store has not been reachable yet."""
        return self.outbox.run_id or self._requested_run_id

    def state_dict(self) -> dict:
        """What a checkpoint needs to reattach and to keep drawing the full history."""
        return {"run_id": self.run_id, "history": self._history, "summary": self._summary}

    # ------------------------------------------------------------------ params and tags
    def log_config(self, cfg, *, fp_layers: list[str] | None = None) -> None:
        """Whole config as dotted params (scrubbed, truncated) + config.json + protocol tags."""
        data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        params = {}
        for k, v in flatten(data).items():
            value = scrub(k, _param_str(v))
            params[metric_key(k)] = _truncate(value, MAX_PARAM_LEN)
        self.log_params(params)
        tags = protocol_tags(data)
        if fp_layers is not None:
            tags["gdnsq.fp_layers"] = ", ".join(fp_layers) or "none"
        tags["mlflow.note.content"] = (
            f"GDNSQ {tags['gdnsq.model']} {tags['gdnsq.protocol']}. FP weights: {tags['gdnsq.fp_checkpoint']}. "
            f"Code {code_version()['gdnsq.code_version']}. Per-layer bit-widths: metrics `bits/w/*`, `bits/a/*`, "
            "artifacts `bits/epoch_*.csv`, `bits_evolution.png`.")
        self.set_tags(tags)
        self.log_dict(scrub_tree(data), "config.json")

    def log_params(self, params: dict) -> None:
        items = [[metric_key(k), _truncate(str(scrub(str(k), v)), MAX_PARAM_LEN)] for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.outbox.put(["params", items[i:i + 100]])

    def set_tags(self, tags: dict) -> None:
        items = [[k, v] for k, v in self._clean_tags(tags).items()]
        for i in range(0, len(items), 100):
            self.outbox.put(["tags", items[i:i + 100]])

    @staticmethod
    def _clean_tags(tags: dict) -> dict:
        return {metric_key(k): _truncate(str(scrub(str(k), v)), MAX_TAG_LEN) for k, v in tags.items()}

    def log_checkpoint_uri(self, uri: str, epoch: int | None = None) -> None:
        """Where the latest checkpoint lives (a path or s3:// URI), as tags."""
        tags = {"gdnsq.checkpoint": uri}
        if epoch is not None:
            tags["gdnsq.checkpoint_epoch"] = epoch
        self.set_tags(tags)

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Scalar metrics (floats, ints, 0-d tensors); keys are made valid MLflow keys."""
        ts, rows = _now_ms(), []
        for k, v in metrics.items():
            f = _as_float(v)
            if f is not None:
                rows.append([metric_key(k), f, ts, int(step or 0)])
        for i in range(0, len(rows), 1000):
            self.outbox.put(["metrics", rows[i:i + 1000]])

    def log_epoch(self, epoch: int, metrics: dict, bits_table: list[dict]) -> None:
        """Epoch metrics + ``bits/w/<layer>``, ``bits/a/<layer>``, the table as bits/epoch_XXX.{json,csv}."""
        all_metrics = dict(metrics)
        bw = [r["bits_w"] for r in bits_table if r.get("bits_w") is not None]
        ba = [r["bits_a"] for r in bits_table if r.get("bits_a") is not None]
        for r in bits_table:
            all_metrics[f"bits/w/{r['name']}"] = r.get("bits_w")
            if r.get("bits_a") is not None:
                all_metrics[f"bits/a/{r['name']}"] = r["bits_a"]
        if bw:
            all_metrics["bits/mean_w"] = sum(bw) / len(bw)
        if ba:
            all_metrics["bits/mean_a"] = sum(ba) / len(ba)
        self.log_metrics(all_metrics, step=epoch)
        stem = f"epoch_{int(epoch):03d}"
        self.log_dict(bits_table, f"bits/{stem}.json")
        self._log_csv(bits_table, f"bits/{stem}.csv")
        entry = {"epoch": int(epoch), "metrics": {k: f for k, v in metrics.items() if (f := _as_float(v)) is not None},
                 "layers": [dict(r) for r in bits_table]}
        self._history = [h for h in self._history if h["epoch"] != entry["epoch"]] + [entry]

    def log_summary(self, summary: dict) -> None:
        """End-of-training summary: ``final/<key>`` metrics, summary.json, tags; the FP line in plots."""
        self._summary = {k: v for k, v in summary.items() if k != "layers"}
        scalars = {f"final/{k}": v for k, v in summary.items() if k != "layers" and _as_float(v) is not None}
        self.log_metrics(scalars, step=self._history[-1]["epoch"] if self._history else 0)
        self.set_tags({f"gdnsq.{k}": summary[k] for k in ("converged", "ns_top1", "top1") if k in summary})
        self.log_dict(summary, "summary.json")

    # ------------------------------------------------------------------ artifacts
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or folder, copied now (later changes or deletion by the caller do not matter)."""
        self.outbox.put(["artifact", self.outbox.stage(path), artifact_path])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._log_file(artifact_file, lambda p: p.write_text(json.dumps(data, indent=1, default=str)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._log_file(artifact_file, lambda p: p.write_text(text))

    def _log_csv(self, rows: list[dict], artifact_file: str) -> None:
        def write(p: Path):
            cols = list(dict.fromkeys(k for r in rows for k in r))
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        self._log_file(artifact_file, write)

    def _log_file(self, artifact_file: str, write) -> None:
        rel = f"{uuid.uuid4().hex[:8]}/{Path(artifact_file).name}"
        path = self.outbox.files / rel
        path.parent.mkdir(parents=True)
        write(path)
        parent = str(Path(artifact_file).parent)
        self.outbox.put(["artifact", rel, None if parent == "." else parent])

    # ------------------------------------------------------------------ end
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait (bounded) until everything logged so far is in the store."""
        return self.outbox.drain(timeout)

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Draw the plots, end the run with ``status`` and flush, waiting at most ``timeout`` seconds.

        Returns True when everything reached the store. Otherwise the run stays RUNNING there and the
        outbox folder (logged as a warning) can be delivered later with ``replay``.
        """
        if status not in STATUSES:
            raise ValueError(f"status: must be one of {', '.join(STATUSES)}, got {status!r}")
        if self._finished:
            return self._delivered
        self._finished = True
        try:
            for name in self._draw_plots():
                self.outbox.put(["artifact", name, None])
        except Exception as e:  # noqa: BLE001 - a plot must never fail the run
            log.warning("tracking plots failed: %s", e)
        self.outbox.put(["end", status, _now_ms()])
        self._delivered = self.outbox.drain(self.finish_timeout if timeout is None else timeout)
        self.outbox.close()
        _live_trackers.discard(self)
        if self._delivered:
            shutil.rmtree(self.outbox.folder, ignore_errors=True)
        else:
            log.warning("MLflow store unreachable: %d calls kept in %s; deliver them with "
                        "`python -m gdnsq.tracking.run replay %s`", self.outbox.pending(), self.outbox.folder,
                        self.outbox.folder)
        if self.outbox.dropped:
            log.warning("MLflow refused %d calls of run %s (see warnings above)", self.outbox.dropped, self.run_id)
        return self._delivered

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    # ------------------------------------------------------------------ plots
    def _draw_plots(self) -> list[str]:
        """bits_evolution.png and accuracy_vs_bits.png into the outbox; returns their relative names."""
        if not self._history:
            return []
        out = []
        folder = self.outbox.files / f"plots-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        fp = _as_float((self._summary or {}).get("fp_top1"))
        for name, draw in (("bits_evolution.png", draw_bits_evolution),
                           ("accuracy_vs_bits.png", lambda h, p: draw_accuracy_vs_bits(h, p, fp_top1=fp))):
            if draw(self._history, folder / name):
                out.append(f"{folder.name}/{name}")
        return out


class NullTracker:
    """Same interface, does nothing: tracking disabled, or a rank other than 0."""

    run_id = None
    uri = None

    def state_dict(self) -> dict:
        return {}

    def flush(self, timeout: float = 0.0) -> bool:
        return True

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        return True

    def __getattr__(self, name):
        if name.startswith("log_") or name in ("set_tags",):
            return lambda *a, **k: None
        raise AttributeError(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def create_tracker(cfg, *, run_id: str | None = None, parent_run_id: str | None = None, run_name: str | None = None,
                   state: dict | None = None, enabled: bool = True, **kwargs) -> RunTracker | NullTracker:
    """A tracker for a JobConfig (``cfg.tracking``); a NullTracker when disabled or ``enabled=False``
    (pass ``enabled=(rank == 0)`` in DDP workers). ``kwargs`` go to :class:`RunTracker`."""
    if not (enabled and cfg.tracking.enabled):
        return NullTracker()
    return RunTracker(cfg.tracking.uri, cfg.tracking.experiment, run_id=run_id, parent_run_id=parent_run_id,
                      run_name=run_name or cfg.name, state=state, **kwargs)


# A process that exits without finish() (an exception escaped the driver) ends its run FAILED, with a
# short wait; a killed worker cannot do this, which is what reattaching by run id is for.
_live_trackers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _finish_leftovers() -> None:
    for tracker in list(_live_trackers):
        try:
            tracker.finish("FAILED", timeout=10.0)
        except Exception:  # noqa: BLE001
            pass


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gdnsq.tracking.run", description="Deliver a leftover MLflow outbox.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay")
    r.add_argument("folder")
    r.add_argument("--uri", default=None)
    r.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    return 0 if replay(args.folder, args.uri, args.timeout) else 1


if __name__ == "__main__":
    raise SystemExit(_main())
