"""The outbox: every MLflow call of a run, journalled on disk and delivered by a daemon thread.

The training thread appends one JSON line to a journal on disk and returns at once; a daemon thread
delivers the lines in order (metric lines merged into ``log_batch`` requests), retrying with
exponential backoff while the server is unreachable. So a down or slow server never blocks a
training step, memory stays bounded (the backlog is on disk), and a retried metric is harmless (the
store deduplicates identical key/step/timestamp/value rows). Whatever a run's ``finish`` could not
deliver in time stays in the outbox folder, which :func:`replay` delivers later::

    python -m gdnsq.tracking.outbox replay FOLDER [--uri URI] [--timeout SECONDS]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from .names import REDACTED, scrub_value
from .store import ensure_experiment

log = logging.getLogger(__name__)

_PROG = "python -m gdnsq.tracking.outbox"
REPLAY_COMMAND = f"{_PROG} replay"  # what a run that could not deliver tells its user to run


def default_outbox_dir(path: str | os.PathLike | None = None) -> Path:
    """Where undelivered MLflow calls wait: ``path`` > ``$GDNSQ_OUTBOX_DIR`` > ``~/.cache/gdnsq/outbox``.

    Not the cwd: a Ray worker's cwd is a temporary session folder that disappears with the job.
    """
    return Path(path or os.environ.get("GDNSQ_OUTBOX_DIR") or Path.home() / ".cache" / "gdnsq" / "outbox")


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


class Outbox:
    """An append-only JSON-lines journal of MLflow calls and the daemon thread that delivers it.

    Ops (one JSON list per line): ``["start", spec]``, ``["metrics", [[key, value, ts_ms, step], ...]]``,
    ``["params", [[k, v], ...]]``, ``["tags", [[k, v], ...]]``, ``["artifact", relpath, artifact_path]``,
    ``["end", status, ts_ms]``. Delivered lines are forgotten; the journal is truncated whenever empty.

    A store that does not answer (``down``: a connection refused or timed out, not a refusal) costs a run one
    warning and, per wait (:meth:`drain`, :meth:`wait_run_id`), at most one more delivery attempt: one HTTP
    request, bounded by MLflow's own ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (see ``store.set_http_defaults``).
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
        self.down = False  # the last delivery attempt found no store answering
        self._attempts = 0  # delivery attempts made (a wait on a down store waits for one more)
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
        """The run id once the store has given it, waiting at most ``timeout`` (one attempt on a down store)."""
        self._wait(lambda: self.run_id is not None, timeout)
        return self.run_id

    def drain(self, timeout: float) -> bool:
        """Wait (bounded: ``timeout``, or one more attempt on a down store) until every queued call is delivered;
        retries speed up meanwhile."""
        return self._wait(lambda: self._pending == 0, timeout)

    def _wait(self, done, timeout: float) -> bool:
        self._urgent = True
        self._kick.set()
        try:
            with self._cond:
                start = self._attempts
                self._cond.wait_for(lambda: done() or (self.down and self._attempts > start), max(0.0, timeout))
                return done()
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
                self._attempted(down=False)
            except _Permanent as e:
                self._attempted(down=False)
                self.dropped += n
                log.warning("MLflow refused %s (%s); dropped", kind, e)
            except Exception as e:  # noqa: BLE001 - any failure of the store: back off and retry
                state = _classify(e)
                server_errors += state == "server"
                if state == "permanent" or server_errors > self.MAX_SERVER_ERRORS:
                    self._attempted(down=False)
                    self.dropped += n
                    log.warning("MLflow refused %s (%s); dropped", kind, _first_line(e, 300))
                else:
                    if not self.down and state == "down":  # once per outage; the retries are silent
                        log.warning(
                            "MLflow unreachable at %s (%s); the run goes on, its calls wait in %s",
                            scrub_value(self.uri),
                            _first_line(e, 200),
                            self.folder,
                        )
                    self._attempted(down=state == "down")
                    if self._stop.is_set():
                        return
                    self._kick.wait(min(backoff, 1.0) if self._urgent else backoff)
                    self._kick.clear()
                    backoff = min(backoff * 2, self.MAX_BACKOFF_S)
                    continue
            backoff, server_errors = 0.5, 0
            if not self._advance(end, n):
                return

    def _attempted(self, *, down: bool) -> None:
        with self._cond:
            self.down = down
            self._attempts += 1
            self._cond.notify_all()

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
            found = client.search_runs(
                [self.experiment_id], f"tags.`gdnsq.tracker_id` = '{spec['tracker_id']}'", max_results=1
            )
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


def _first_line(error: BaseException, limit: int) -> str:
    """An exception's first line, credentials redacted (MLflow names the URL it called, user info included)."""
    return scrub_value((str(error).strip().splitlines() or [type(error).__name__])[0][:limit])


def replay(folder: str | os.PathLike, uri: str | None = None, timeout: float = 300.0) -> bool:
    """Deliver an outbox left behind by a ``finish`` that timed out. True when all went through.

    ``uri`` is needed when the stored one had a password (it is stored redacted).
    """
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    uri = uri or meta["uri"]
    if REDACTED in uri:
        raise ValueError(f"{folder}: the stored tracking URI is redacted; pass uri=")
    box = Outbox(folder, uri, meta.get("run_id"), live=False)
    box.experiment_id = meta.get("experiment_id")
    box._urgent = True
    box._thread.start()
    ok = box.drain(timeout)
    box.close()
    if ok:
        shutil.rmtree(folder, ignore_errors=True)
    return ok


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog=_PROG, description="Deliver a leftover MLflow outbox.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay")
    r.add_argument("folder")
    r.add_argument("--uri", default=None)
    r.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    return 0 if replay(args.folder, args.uri, args.timeout) else 1


if __name__ == "__main__":
    raise SystemExit(_main())
