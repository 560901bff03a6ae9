"""One MLflow run of a training job: config, per-layer bit-widths, summary, plots; robust to a store that is down.

Edge module: the launch layer imports it; training (job, engine, objective) never does, and MLflow
itself is imported lazily so ``import gdnsq.tracking.run`` stays cheap.

Every call goes through the run's :class:`~gdnsq.tracking.outbox.Outbox` and returns at once.
``finish`` waits a bounded time; anything still undelivered stays in the outbox folder, which
``python -m gdnsq.tracking.outbox replay FOLDER`` delivers later. A process that exits without
``finish`` ends its runs FAILED (atexit).
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..config import flatten, to_dict
from .names import MAX_PARAM_LEN, MAX_TAG_LEN, as_float, metric_key, param_str, scrub, scrub_tree, truncate
from .outbox import REPLAY_COMMAND, Outbox, default_outbox_dir
from .plots import draw_run_plots
from .store import is_server_uri, resolve_tracking_uri, set_http_defaults

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """Tags naming the code: package version, git commit (and '.dirty') when run from a checkout."""
    from .._version import __version__

    tags = {"gdnsq.version": __version__, "gdnsq.code_version": __version__}
    here = Path(__file__).resolve().parents[1]  # the gdnsq package: "dirty" means any of its files changed
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=3, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno", "--", "."], cwd=here, capture_output=True, text=True, timeout=3
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return tags
    if sha:
        tags["mlflow.source.git.commit"] = sha
        tags["gdnsq.code_version"] = f"{__version__}+g{sha[:10]}" + (".dirty" if dirty else "")
    return tags


def protocol_tags(cfg: dict) -> dict[str, str]:
    """Tags that say what was quantized how: model, targets, granularity, FP layers, FP checkpoint."""
    m, q = cfg.get("model", {}), cfg.get("quant", {})
    excluded = [
        n
        for n, on in (
            ("first conv", q.get("keep_first_conv")),
            ("classifier", q.get("keep_classifier")),
            ("1x1 convs", q.get("keep_pointwise")),
        )
        if on
    ]
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
        if tw is not None and ta is not None
        else "",
        "gdnsq.fp_checkpoint": str(fp_source),
    }


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunTracker:
    """One MLflow run: start or reattach (``run_id``), nested under ``parent_run_id`` (sweeps).

    All logging methods return at once and never raise because of the tracking store.
    Keep ``state_dict()`` (or at least ``run_id``) in the checkpoint and pass it back on resume so a
    restarted worker continues the same run instead of leaving a RUNNING orphan.
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "gdnsq",
        *,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        tags: dict | None = None,
        state: dict | None = None,
        outbox_dir: str | os.PathLike | None = None,
        start_timeout: float = 5.0,
        finish_timeout: float = 60.0,
    ):
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.finish_timeout = finish_timeout
        if is_server_uri(self.uri):
            set_http_defaults()
        state = state or {}
        run_id = run_id or state.get("run_id")
        self._requested_run_id = run_id
        self._history: list[dict] = list(state.get("history", []))
        self._summary: dict | None = state.get("summary")
        self._last_record: dict | None = state.get("last_record")
        self._finished, self._delivered = False, False
        self.tracker_id = uuid.uuid4().hex
        self.outbox = Outbox(default_outbox_dir(outbox_dir) / self.tracker_id, self.uri, None)
        self.outbox.put(
            [
                "start",
                {
                    "experiment": experiment,
                    "run_id": run_id,
                    "run_name": run_name,
                    "parent_run_id": parent_run_id,
                    "tracker_id": self.tracker_id,
                    "tags": self._clean_tags({**code_version(), **(tags or {})}),
                },
            ]
        )
        if self._last_record is not None:  # a resumed run: its last checkpointed epoch may not have been delivered
            self.log_record(self._last_record)
        # Wait a little so the run id can go into the first checkpoint; a down server just delays it.
        self.outbox.wait_run_id(start_timeout)
        _live_trackers.add(self)

    # ------------------------------------------------------------------ identity / state
    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None for a new run while the store has not been reachable yet."""
        return self.outbox.run_id or self._requested_run_id

    def state_dict(self) -> dict:
        """What a checkpoint needs to reattach, to keep drawing the full history, and to deliver its epoch again."""
        return {
            "run_id": self.run_id,
            "history": self._history,
            "summary": self._summary,
            "last_record": self._last_record,
        }

    # ------------------------------------------------------------------ params and tags
    def log_config(self, cfg, *, fp_layers: list[str] | None = None) -> None:
        """Whole config as dotted params (scrubbed, truncated) + config.json + protocol tags."""
        data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        params = {}
        for k, v in flatten(data).items():
            value = scrub(k, param_str(v))
            params[metric_key(k)] = truncate(value, MAX_PARAM_LEN)
        self.log_params(params)
        tags = protocol_tags(data)
        if fp_layers is not None:
            tags["gdnsq.fp_layers"] = ", ".join(fp_layers) or "none"
        tags["mlflow.note.content"] = (
            f"GDNSQ {tags['gdnsq.model']} {tags['gdnsq.protocol']}. FP weights: {tags['gdnsq.fp_checkpoint']}. "
            f"Code {code_version()['gdnsq.code_version']}. Per-layer bit-widths: metrics `bits/w/*`, `bits/a/*`, "
            "artifacts `bits/epoch_*.csv`, `bits_evolution.png`."
        )
        self.set_tags(tags)
        self.log_dict(scrub_tree(data), "config.json")

    def log_params(self, params: dict) -> None:
        items = [[metric_key(k), truncate(str(scrub(str(k), v)), MAX_PARAM_LEN)] for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.outbox.put(["params", items[i : i + 100]])

    def set_tags(self, tags: dict) -> None:
        items = [[k, v] for k, v in self._clean_tags(tags).items()]
        for i in range(0, len(items), 100):
            self.outbox.put(["tags", items[i : i + 100]])

    @staticmethod
    def _clean_tags(tags: dict) -> dict:
        return {metric_key(k): truncate(str(scrub(str(k), v)), MAX_TAG_LEN) for k, v in tags.items()}

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
            f = as_float(v)
            if f is not None:
                rows.append([metric_key(k), f, ts, int(step or 0)])
        for i in range(0, len(rows), 1000):
            self.outbox.put(["metrics", rows[i : i + 1000]])

    def log_epoch(self, epoch: int, metrics: dict, bits_table: list[dict]) -> None:
        """Epoch metrics + ``bits/w/<layer>``, ``bits/a/<layer>``, the table as bits/epoch_XXX.{json,csv}."""
        self.log_record(self.epoch_record(epoch, metrics, bits_table))

    def epoch_record(self, epoch: int, metrics: dict, bits_table: list[dict]) -> dict:
        """What :meth:`log_epoch` logs, timestamped now but not logged yet; :meth:`state_dict` keeps it.

        A run logs an epoch once its checkpoint holds it (:meth:`log_record` after the save): an epoch lost with
        a killed process was never logged, so the epoch redone after a resume is logged once. A resumed tracker
        logs the record of the checkpoint it resumes from again, in case the process ended before delivering
        it; the store keeps one row of a metric logged twice with the same key, step, timestamp and value.
        """
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
        ts = _now_ms()
        rows = [[metric_key(k), f, ts, int(epoch)] for k, v in all_metrics.items() if (f := as_float(v)) is not None]
        entry = {
            "epoch": int(epoch),
            "metrics": {k: f for k, v in metrics.items() if (f := as_float(v)) is not None},
            "layers": [dict(r) for r in bits_table],
        }
        self._history = [h for h in self._history if h["epoch"] != entry["epoch"]] + [entry]
        self._last_record = {"epoch": int(epoch), "rows": rows, "table": [dict(r) for r in bits_table]}
        return self._last_record

    def log_record(self, record: dict) -> None:
        """Log an :meth:`epoch_record` (again: a row the store already has is not added twice)."""
        rows = record["rows"]
        for i in range(0, len(rows), 1000):
            self.outbox.put(["metrics", rows[i : i + 1000]])
        stem = f"epoch_{int(record['epoch']):03d}"
        self.log_dict(record["table"], f"bits/{stem}.json")
        self._log_csv(record["table"], f"bits/{stem}.csv")

    def log_summary(self, summary: dict) -> None:
        """End-of-training summary: ``final/<key>`` metrics, summary.json, tags; the FP line in plots."""
        self._summary = {k: v for k, v in summary.items() if k != "layers"}
        scalars = {f"final/{k}": v for k, v in self._summary.items()}  # log_metrics keeps the numbers among them
        self.log_metrics(scalars, step=self._history[-1]["epoch"] if self._history else 0)
        self.log_dict(summary, "summary.json")
        # Last: a run that shows its summary tags has its final metrics and summary.json in the store too.
        self.set_tags({f"gdnsq.{k}": summary[k] for k in ("converged", "ns_top1", "top1") if k in summary})

    # ------------------------------------------------------------------ artifacts
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or folder, copied now (later changes or deletion by the caller do not matter)."""
        self.outbox.put(["artifact", self.outbox.stage(path), artifact_path])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """``data`` as a JSON artifact, credentials redacted (a summary names the FP checkpoint, maybe a URI)."""
        clean = scrub_tree(data)
        self._log_file(artifact_file, lambda p: p.write_text(json.dumps(clean, indent=1, default=str)))

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
            log.warning(
                "MLflow store unreachable: %d calls kept in %s; deliver them with `%s %s`",
                self.outbox.pending(),
                self.outbox.folder,
                REPLAY_COMMAND,
                self.outbox.folder,
            )
        if self.outbox.dropped:
            log.warning("MLflow refused %d calls of run %s (see warnings above)", self.outbox.dropped, self.run_id)
        return self._delivered

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    # ------------------------------------------------------------------ plots
    def _draw_plots(self) -> list[str]:
        """bits_evolution.png and accuracy_vs_bits.png into the outbox; returns their relative names."""
        if not self._history:
            return []
        folder = self.outbox.files / f"plots-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        fp = as_float((self._summary or {}).get("fp_top1"))
        return [f"{folder.name}/{name}" for name in draw_run_plots(self._history, folder, fp_top1=fp)]


def create_tracker(
    cfg,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    state: dict | None = None,
    **kwargs,
) -> RunTracker | None:
    """A tracker for a JobConfig (``cfg.tracking``); None when tracking is disabled. Only one process of a
    job (rank 0) tracks. ``kwargs`` go to :class:`RunTracker`."""
    if not cfg.tracking.enabled:
        return None
    return RunTracker(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        run_id=run_id,
        parent_run_id=parent_run_id,
        run_name=run_name or cfg.name,
        state=state,
        **kwargs,
    )


def close_trial_runs(uri: str, experiment: str, parent_run_id: str, trial_status: dict[str, str]) -> None:
    """End a sweep's nested runs: tag each with its trial's status; stopped ones end KILLED, failed ones FAILED.

    ``trial_status``: {run name: "completed" | "stopped" | "error"}. The workers of stopped and failed
    trials died mid-run (leaving the run open for a restart that will not come now), so nothing else
    would end those runs. Bookkeeping: a store error is logged, never raised.
    """
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'") if exp else []
        for run in runs:
            st = trial_status.get(run.info.run_name)
            if st is None:
                continue
            client.set_tag(run.info.run_id, "gdnsq.sweep_status", st)
            if st != "completed" and run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, "KILLED" if st == "stopped" else "FAILED")
    except Exception as e:  # noqa: BLE001 - bookkeeping must not fail a finished sweep
        log.warning("could not close the trials' MLflow runs: %s", e)


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
