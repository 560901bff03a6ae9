"""What a run prints: a header, a progress bar (or plain lines) per epoch, one line per epoch, a footer.

Verbosity (``-q`` / ``-v`` on the CLI) and whether the driver's stdout is a terminal travel to Ray
workers as environment variables (``ray.init(runtime_env=...)``, see :func:`worker_env`). An in-process
run draws a tqdm bar on a terminal; a Ray worker, and any run whose stdout is a file, writes plain
progress lines instead (``ray.experimental.tqdm_ray`` drew nothing here, Ray 2.60, even for a bare
Ray task on a pseudo-terminal).

Ray's and MLflow's own chatter is switched off with their own settings, not by filtering output:
``RunConfig(logging_config=ray.train.LoggingConfig(log_level="WARNING"))`` (the per-report
"Reporting training result" and "Checkpoint successfully created" lines), ``RAY_COLOR_PREFIX=0`` (no
ANSI codes around worker prefixes), ``RAY_DISABLE_WORKER_LOG_PREFIX=1`` (no "(RayTrainWorker pid=...)"
before our lines), ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false`` and ``MLFLOW_LOGGING_LEVEL=WARNING``;
Ray's token warning (:data:`RAY_QUIET_LOGGERS`); the Python warnings of Ray's own actors (the job's
``ray.LoggingConfig``, :func:`ray_job_logging`) and the C++ log lines of Ray's processes on our console
(``RAY_DEDUP_LOGS_SKIP_REGEX``, :data:`RAY_CPP_LOG_LINE`). ``-v`` turns them back on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ..redaction import redact_logging, scrub_value

VERBOSITY_ENV = "GDNSQ_VERBOSITY"
TTY_ENV = "GDNSQ_CONSOLE_TTY"
PROGRESS_ENV = "GDNSQ_PROGRESS_EVERY_S"
PLAIN_EVERY_S = float(os.environ.get(PROGRESS_ENV, "300"))  # plain progress lines, at most this far apart

log = logging.getLogger("gdnsq")


def verbosity() -> int:
    try:
        return int(os.environ.get(VERBOSITY_ENV, "0"))
    except ValueError:
        return 0


def quiet_env(level: int) -> dict[str, str]:
    """Ray's and MLflow's own switches for our console at verbosity ``level``."""
    env = {"RAY_COLOR_PREFIX": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if level <= 0:
        env.update(
            MLFLOW_LOGGING_LEVEL="WARNING",
            RAY_DISABLE_WORKER_LOG_PREFIX="1",
            # Train V2 sends a worker's print() to its logger *and* the original stdout: each line twice
            RAY_TRAIN_ENABLE_PRINT_PATCH="0",
            # read by the driver when Ray forwards its processes' output (ray._private.ray_logging)
            RAY_DEDUP_LOGS_SKIP_REGEX=RAY_CPP_LOG_LINE,
        )
    return env


def worker_env() -> dict[str, str]:
    """Environment for every Ray task and actor of our job (``ray.init(runtime_env={"env_vars": ...})``)."""
    level = verbosity()
    pace = {PROGRESS_ENV: os.environ[PROGRESS_ENV]} if PROGRESS_ENV in os.environ else {}  # rank 0 prints progress
    return {
        **quiet_env(level),
        VERBOSITY_ENV: str(level),
        TTY_ENV: os.environ.get(TTY_ENV, "1" if sys.stdout.isatty() else "0"),
        **pace,
    }


def train_log_level() -> str:
    """Ray Train's own log level (``ray.train.LoggingConfig``): its per-report lines only with ``-v``."""
    return "INFO" if verbosity() > 0 else "WARNING"


# Ray's own lines that say nothing a gdnsq user can act on, silenced at default verbosity with Ray's switches (-v
# brings them back), each where it is made:
# - the driver's, through their loggers (RAY_QUIET_LOGGERS): ray.init's "Token authentication is enabled for this
#   Ray cluster" warning on every local start, and Ray Train's INFO lines when the driver reads a stored run ("A
#   run snapshot was found in storage folder at ...", three lines, twice on every resumed Ray run);
# - the Python logging of Ray's own actors (Train's controller, its detached PlacementGroupCleaner, which warns
#   "Failed to query Ray Train Controller actor state." whenever the State API answers slowly, at any time): the
#   job's ray.LoggingConfig at ERROR (ray_job_logging), which Ray applies to the root and "ray" loggers of every
#   task and actor of the job. Ray Train's own loggers and a Train worker's root logger follow RunConfig's
#   LoggingConfig (train_log_level), which Train applies after it;
# - C++ log lines: Train's controller logs at error level from its core worker that its PreemptionWatcher actor "has
#   constructor arguments in the object store and max_restarts > 0" (its arguments hold the workers' actor handles;
#   every Train run, Ray 2.60). Ray's switch for that level, RAY_BACKEND_LOG_LEVEL, makes every process that reads
#   it print "Set ray log level from environment variable" before its output is redirected (a line per worker on
#   the console), and RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 would switch off Train's handling of preempted nodes;
#   so the driver does not print Ray's C++ log lines it forwards (RAY_DEDUP_LOGS_SKIP_REGEX, from Ray's log
#   deduplication settings). They stay in Ray's log files (/tmp/ray/session_latest/logs).
RAY_QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.train": logging.WARNING,
}
# Ray's C++ log format (src/ray/util/logging.cc): "[2026-12-07 20:28:27,446 E 9975 10007] core_worker.cc:2465: ..."
RAY_CPP_LOG_LINE = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWEF] \d+ \d+\] [\w.]+:\d+: "


def ray_job_logging():
    """The ``ray.LoggingConfig`` of our Ray job's tasks and actors (none with ``-v``: Ray's default)."""
    if verbosity() > 0:
        return None
    import ray

    return ray.LoggingConfig(log_level="ERROR")


def keep_our_warnings() -> None:
    """In a Ray actor of our job that Ray Train does not configure (a Tune trial, Train's controller): our logger
    keeps its warnings, which the job's root handler at ERROR (:func:`ray_job_logging`) would drop."""
    root, ours = logging.getLogger(), logging.getLogger("gdnsq")
    if ours.handlers or not root.handlers or any(h.level <= logging.WARNING for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING)
    ours.addHandler(handler)
    ours.propagate = False


def setup_logging(level: int) -> None:
    """CLI start: our logger at INFO (DEBUG with -v, WARNING with -q), third parties at WARNING, and the
    switches above in this process's environment (before Ray or MLflow is imported; user settings win)."""
    os.environ[VERBOSITY_ENV] = str(level)
    os.environ.setdefault(TTY_ENV, "1" if sys.stdout.isatty() else "0")
    for k, v in quiet_env(level).items():
        os.environ.setdefault(k, v)
    for name, quiet in RAY_QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet if level <= 0 else logging.NOTSET)
    logging.basicConfig(level=logging.DEBUG if level > 1 else logging.WARNING, format="%(message)s")
    redact_logging()  # every record any logger writes through the root's handler
    logging.getLogger("gdnsq").setLevel(logging.DEBUG if level > 0 else logging.INFO if level == 0 else logging.WARNING)


def setup_worker_logging() -> None:
    """In a Ray worker: our logger's level from the driver's verbosity.

    Ray 2.60's ``train/v2/_internal/execution/context.py`` names its logger by ``__file__``, not
    ``__name__``, so ``LoggingConfig(log_level=...)`` (which filters ``ray.train.*``) does not reach its
    per-report "Reporting training result ... metrics={...}" line: that logger gets the level here.
    """
    level = verbosity()
    logging.getLogger("gdnsq").setLevel(logging.DEBUG if level > 0 else logging.INFO if level == 0 else logging.WARNING)
    redact_logging()  # Ray's handlers on the worker's root logger
    if level <= 0:
        try:
            from ray.train.v2._internal.execution import context

            logging.getLogger(context.__file__).setLevel(logging.WARNING)
        except Exception:  # noqa: BLE001 - another Ray layout: its line stays
            pass


def say(line: str = "") -> None:
    """One console line (stdout, flushed: a worker's stdout reaches the driver line by line)."""
    if verbosity() >= 0:
        show(line)


def show(line: str) -> None:
    """Print one line, credentials redacted (:mod:`gdnsq.redaction`): every console line of a run goes here."""
    print(scrub_value(line), flush=True)


# ----------------------------------------------------------------------------------- header


def _run_state(cfg, storage: str) -> str:
    if "://" in storage:
        return "new, or resumed if its checkpoints exist there"
    folder = Path(storage) / cfg.name
    found = sorted(folder.glob("checkpoint_*")) + sorted(folder.glob("checkpoint.pt"))
    return f"resumed from {found[-1]}" if found else "new"


_plan_notes: list[str] = []


def plan_note(line: str) -> None:
    """A change pre-flight made to the run's plan (more epochs): the next header prints it under ``plan``."""
    _plan_notes.append(line)


def header(cfg, *, devices: str) -> None:
    """Run name, new or resumed, storage, tracking URI, devices and workers, and pre-flight's plan changes."""
    from .storage import storage_root

    notes = list(_plan_notes)
    _plan_notes.clear()
    if verbosity() < -1:
        return
    storage = storage_root(cfg)
    tracking = "off"
    if cfg.tracking.enabled:
        from ..tracking.names import scrub_value
        from ..tracking.store import resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.tracking.uri)
        tracking = f"{scrub_value(uri)}  (experiment {cfg.tracking.experiment})"
        if uri.startswith("sqlite:") and cfg.ray.enabled and (cfg.ray.address or cfg.ray.num_workers > 1):
            tracking += "  -- a store on this machine: a cluster wants MLFLOW_TRACKING_URI=http://..."
    show(
        f"gdnsq run {cfg.name}: {cfg.model.name} -> W{cfg.quant.target_w:g}A{cfg.quant.target_a:g} "
        f"({cfg.quant.method}), {cfg.train.epochs} epochs, data {cfg.data.kind}"
    )
    for key, value in (
        ("run", _run_state(cfg, storage)),
        ("storage", f"{storage}/{cfg.name}"),
        ("tracking", tracking),
        ("devices", devices),
        *(("plan", note) for note in notes),
    ):
        show(f"  {key:<9} {value}")


# --------------------------------------------------------------------------------- progress


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``run_job`` hooks on rank 0: a bar per epoch with throughput and ETA, one compact line per epoch.

    In-process on a terminal: a tqdm bar. Otherwise (log files, Ray workers) plain lines at 25 / 50 / 75 %
    of an epoch that takes longer than a minute, and at least every ``GDNSQ_PROGRESS_EVERY_S`` seconds.
    ``-q``: no progress and no epoch lines.
    """

    def __init__(self, cfg, *, world_size: int = 1, in_ray: bool = False):
        self.epochs = cfg.train.epochs
        self.cap = cfg.train.max_steps_per_epoch
        self.images_per_step = cfg.data.batch_size * world_size
        self.level = verbosity()
        self.tty = os.environ.get(TTY_ENV, "1" if sys.stdout.isatty() else "0") == "1"
        self.in_ray = in_ray
        self.bar = None
        self.run_t0, self.epochs_here = None, 0  # ETA from the epochs this process ran

    def epoch_start(self, epoch: int, steps: int | None) -> None:
        self.epoch, self.n = epoch + 1, 0
        if self.run_t0 is None:
            self.run_t0 = time.perf_counter()
        self.total = min(steps, self.cap) if steps and self.cap else (steps or self.cap)
        self.t0 = self.last = self.step_t = time.perf_counter()
        self.next_mark = 0.25
        self.loss = None
        if self.level < 0 or not self.tty or self.in_ray:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=f"epoch {self.epoch}/{self.epochs}", unit="step", leave=False)
        except Exception:  # noqa: BLE001 - no tqdm: plain lines
            self.bar = None

    def step(self, global_step: int, parts: dict) -> None:
        self.n += 1
        self.step_t = time.perf_counter()
        if "train/loss" in parts:
            self.loss = parts["train/loss"]  # a device tensor: read only when a line is printed (a host sync)
        if self.bar is not None:
            self.bar.update(1)
            return
        if self.level < 0:
            return
        now = time.perf_counter()
        frac = self.n / self.total if self.total else 0.0
        due = now - self.last >= PLAIN_EVERY_S or (frac >= self.next_mark and now - self.t0 >= 60)
        if due and (not self.total or self.n < self.total):
            while self.total and frac >= self.next_mark:
                self.next_mark += 0.25
            self.last = now
            rate = self.n / (now - self.t0)
            eta = f"  ETA {_hms((self.total - self.n) / rate)}" if self.total else ""
            of = f"/{self.total}" if self.total else ""
            say(
                f"  epoch {self.epoch}/{self.epochs}  step {self.n}{of}  {rate * self.images_per_step:,.0f} img/s"
                f"{eta}" + (f"  loss {float(self.loss):.4f}" if self.loss is not None else "")
            )

    def epoch_end(self, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        now = time.perf_counter()
        elapsed, train_s = now - self.t0, self.step_t - self.t0  # with / without validation
        self.epochs_here += 1
        total_eta = (now - self.run_t0) / self.epochs_here * (self.epochs - self.epoch)
        say(
            f"epoch {self.epoch:>{len(str(self.epochs))}}/{self.epochs}  val top-1 {metrics['val/top1']:6.2f}  "
            f"bits W{metrics['bits/avg_w']:.2f} A{metrics['bits/avg_a']:.2f}  "
            f"{'converged' if metrics['val/converged'] else 'not conv.'}  "
            f"T {metrics.get('train/temperature', 0):.3g}  "
            f"{self.n * self.images_per_step / max(train_s, 1e-9):,.0f} img/s  "
            f"{elapsed:.1f} s" + (f"  (ETA {_hms(total_eta)})" if self.epoch < self.epochs else "")
        )
