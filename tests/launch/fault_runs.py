"""Helpers of the fault suite (tests/launch/test_fault_suite_*.py): the real CLI in a child process, its output,
signals sent at a step it reports, and what a run leaves on disk.

A child runs ``python -m gdnsq.cli`` in its own session (a terminal's Ctrl-C reaches the whole foreground process
group: :func:`interrupt` sends the signal to the group, as a terminal does) with plain progress lines on every
step (``GDNSQ_PROGRESS_EVERY_S=0``), so the test can pick the step a signal lands at.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# Every run of the suite: the small CNN on the bundled digits, FP weights given (no teacher training), a few steps.
SMALL = [
    "--train.max_steps_per_epoch",
    "3",
    "--quant.calib_batches",
    "1",
    "--data.batch_size",
    "32",
]


class Fault(NamedTuple):
    """A row of docs/errors.md's fault table: the fault, the command it hit, the exit status, and the line the
    named test asserts (through :func:`fault_pattern`): the doc shows what the tests check."""

    what: str
    command: str
    exit: int
    line: str
    test: str


INTERRUPTED = "gdnsq: interrupted after epoch {epoch} of {epochs}; the same command resumes"
ALREADY_RUNNING = (
    "gdnsq: error: name: run '{name}' is already running (pid {pid} on {host} holds {run}/.gdnsq.lock); "
    "wait for it to end, or pass --name NEW for another run"
)
NOT_RAY = (
    "gdnsq: error: ray.address: 127.0.0.1:{port} answers but is not a Ray cluster (no gRPC server there after "
    "5 s); give the head's GCS address, HOST:6379 unless `ray start --port` said other"
)
LOCAL, RAY = "tests/launch/test_fault_suite_local.py::", "tests/launch/test_fault_suite_ray.py::"
FAULTS = {
    "file_size": Fault(
        "a file-size limit (`ulimit -f`, put on the run by `prlimit` once epoch 1 is saved) below the checkpoint's "
        "size when epoch 2 is saved (what a full disk does)",
        "gdnsq quickstart --no-ray --train.epochs 2",
        2,
        "gdnsq: error: ray.storage_path: cannot write checkpoint {run}/checkpoint.pt (File too large); the earlier "
        "checkpoints are kept",
        LOCAL + "test_file_size_limit_during_a_checkpoint_save",
    ),
    "staging": Fault(
        "Ray: a file-size limit (`prlimit` on rank 0's worker, as `ulimit -f`) below the checkpoint's size when "
        "epoch 2 is staged in the worker's `TMPDIR`; the worker returns the line to the driver; the run resumes",
        "gdnsq quickstart --ray.address HOST:PORT --train.epochs 3",
        2,
        "gdnsq: error: TMPDIR ({tmp}): cannot write checkpoint {tmp}/gdnsq-ckpt-{pid}/checkpoint.pt (File too "
        "large); the earlier checkpoints are kept",
        RAY + "test_file_size_limit_during_a_checkpoint_save",
    ),
    "sigint_local": Fault(
        "Ctrl-C (SIGINT to the process group) at a random step",
        "gdnsq quickstart --no-ray",
        130,
        INTERRUPTED,
        LOCAL + "test_signal_at_a_random_step_then_the_same_command_resumes[SIGINT]",
    ),
    "sigterm_local": Fault(
        "SIGTERM at a random step",
        "gdnsq quickstart --no-ray",
        143,
        INTERRUPTED,
        LOCAL + "test_signal_at_a_random_step_then_the_same_command_resumes[SIGTERM]",
    ),
    "sigint_ray": Fault(
        "Ctrl-C on the Ray driver at a random step",
        "gdnsq quickstart --ray.address HOST:PORT",
        130,
        INTERRUPTED,
        RAY + "test_signal_at_a_random_step_then_the_same_command_resumes[SIGINT]",
    ),
    "sigterm_ray": Fault(
        "SIGTERM to the Ray driver at a random step",
        "gdnsq quickstart --ray.address HOST:PORT",
        143,
        INTERRUPTED,
        RAY + "test_signal_at_a_random_step_then_the_same_command_resumes[SIGTERM]",
    ),
    "twice_local": Fault(
        "a second run of the same name while the first trains",
        "gdnsq quickstart --no-ray --name twice",
        2,
        ALREADY_RUNNING,
        LOCAL + "test_a_second_live_run_of_the_same_name_is_refused",
    ),
    "twice_ray": Fault(
        "a second Ray driver of the same name while the first trains",
        "gdnsq quickstart --name twice --ray.address HOST:PORT",
        2,
        ALREADY_RUNNING,
        RAY + "test_a_second_live_run_of_the_same_name_is_refused",
    ),
    "mlflow_down": Fault(
        "nothing listens at the tracking URI (the run trains and finishes; one more line at the end names the "
        "`replay` command)",
        "gdnsq quickstart --no-ray --tracking.uri http://127.0.0.1:PORT",
        0,
        "MLflow unreachable at http://127.0.0.1:{port} ({reason}); the run goes on, its calls wait in {outbox}",
        LOCAL + "test_mlflow_down_is_one_warning_and_the_run_goes_on",
    ),
    "secret": Fault(
        "a password in the tracking URI, the store unreachable (no file or line of the run shows it)",
        "gdnsq quickstart --no-ray --tracking.uri http://alice:PASSWORD@127.0.0.1:PORT",
        0,
        "MLflow unreachable at http://alice:***@127.0.0.1:{port} ({reason}); the run goes on, its calls wait in "
        "{outbox}",
        LOCAL + "test_a_password_in_the_tracking_uri_reaches_no_file_and_no_console_line",
    ),
    "silent_address": Fault(
        "`ray.address` answers TCP but never speaks (ray.init waited there past two minutes)",
        "gdnsq quickstart --ray.address 127.0.0.1:PORT",
        2,
        NOT_RAY,
        "tests/launch/test_ray_address.py::test_a_listener_that_is_not_ray_fails_in_one_line_within_20_s[silent]",
    ),
    "http_address": Fault(
        "`ray.address` is a web server (the dashboard's port, say)",
        "gdnsq quickstart --ray.address 127.0.0.1:PORT",
        2,
        NOT_RAY,
        "tests/launch/test_ray_address.py::test_a_listener_that_is_not_ray_fails_in_one_line_within_20_s[http]",
    ),
}


def fault_pattern(key: str, **known) -> re.Pattern:
    """The line of ``FAULTS[key]`` as a pattern: ``known`` placeholders filled in, each other one a named group
    (any text; the same text where it comes back)."""
    parts, seen = re.split(r"\{(\w+)\}", FAULTS[key].line), set()

    def part(i: int, text: str) -> str:
        if i % 2 == 0:
            return re.escape(text)
        if text in known:
            return re.escape(str(known[text]))
        group = f"(?P={text})" if text in seen else f"(?P<{text}>.+?)"
        seen.add(text)
        return group

    return re.compile("".join(part(i, p) for i, p in enumerate(parts)))


STEP_LINE = re.compile(r"^\s+epoch (\d+)/\d+\s+step (\d+)")
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)/\d+\s+val top-1")


@dataclass
class Child:
    """A ``gdnsq`` child process whose combined output is collected line by line (a thread reads it)."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
        self.done.set()

    def wait_for(self, pattern: re.Pattern | str, timeout: float) -> re.Match:
        """The first output line matching ``pattern`` (waiting for it); fails if the child ends without one."""
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline, seen = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                m = pattern.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if self.done.is_set() and seen >= len(self.lines):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern.pattern!r} in:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            raise AssertionError("the run did not end after its signal:\n" + "\n".join(self.lines[-40:])) from None
        self.done.wait(30)
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def start(args: list[str], cwd: Path, env: dict | None = None, file_size_limit: int | None = None) -> Child:
    """``python -m gdnsq.cli ARGS`` in ``cwd``, its own session; ``file_size_limit``: ``ulimit -f`` in bytes."""
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")},
        "GDNSQ_PROGRESS_EVERY_S": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GDNSQ_OUTBOX_DIR": str(cwd / "outbox"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }

    def limit() -> None:
        if file_size_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    proc = subprocess.Popen(
        [sys.executable, "-m", "gdnsq.cli", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=limit,
    )
    child = Child(proc)
    threading.Thread(target=child._read, daemon=True).start()
    return child


def run(args: list[str], cwd: Path, timeout: float = 600, **kwargs) -> tuple[int, str]:
    child = start(args, cwd, **kwargs)
    return child.finish(timeout), child.output


def interrupt(child: Child, sig: int) -> None:
    """SIGINT as a terminal's Ctrl-C sends it (to the foreground process group); SIGTERM as a scheduler or ``kill``
    sends it (to the process)."""
    if sig == signal.SIGINT:
        os.killpg(child.proc.pid, sig)
    else:
        os.kill(child.proc.pid, sig)


def no_traceback(output: str) -> None:
    assert "Traceback" not in output and "lost sys.stderr" not in output, output[-4000:]


def ray_train_workers(node_pids: list[int]) -> list[int]:
    """The Ray Train worker processes (``ray::RayTrainWorker``) below the given ``ray start`` processes: this test's
    cluster only, whatever other Ray instances share the machine."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(node_pids)
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::RayTrainWorker"):
                    found.append(pid)
        except OSError:
            pass
    return found


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# Ray's own lines that a run at default verbosity must not show (gdnsq.launch.console silences them at the source;
# -v brings them back): a C++ log line of any Ray process ("[2026-12-07 20:28:27,446 E 9975 10007] core_worker.cc:..",
# Train's PreemptionWatcher on every run), a line of Ray's Python log format ("2026-12-07 20:48:43,193\tINFO
# checkpoint_manager.py:482 -- A run snapshot was found", twice on a resumed run), the warning of Train's
# placement-group cleaner when the State API answers slowly, ray.init's token warning, a worker's prefix.
RAY_NOISE = re.compile(
    r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWEF] \d+ \d+\] "
    r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ -- "
    r"|Failed to query Ray Train Controller actor state|Token authentication is enabled"
    r"|\((?:RayTrainWorker|TrainController|PlacementGroupCleaner|raylet)\b"
)


def assert_no_ray_noise(output: str) -> None:
    noise = [line for line in output.splitlines() if RAY_NOISE.search(line)]
    assert not noise, noise


def interrupted_line(output: str, epochs: int, *, console_lag: int = 0) -> int:
    """The run's last line after a signal, checked against its console; returns the epoch it names (0: none).

    That epoch is the last one the console showed as done: an epoch shown is never trained again. A Ray worker's
    lines reach the driver's console through Ray's log monitor, up to a second late: with ``console_lag`` 1 the
    last epoch shown may be one behind the one saved, never ahead of it (the issue's console was one ahead).
    """
    no_traceback(output)
    assert_no_ray_noise(output)
    shown = [int(m.group(1)) for line in output.splitlines() if (m := EPOCH_LINE.match(line))]
    last = output.strip().splitlines()[-1]
    m = fault_pattern("sigint_local", epochs=epochs).fullmatch(last)  # the line of all four signal rows
    if m is None:
        before = f"gdnsq: interrupted before epoch 1 of {epochs} ended; the same command starts it again"
        assert last == before, output[-3000:]
        assert not shown, output[-3000:]
        return 0
    epoch = int(m["epoch"])
    last_shown = shown[-1] if shown else 0
    assert epoch - console_lag <= last_shown <= epoch, (shown, last)
    return epoch


def assert_each_metric_logged_once(uri: str, experiment: str, epochs: int):
    """One MLflow run in ``experiment``, FINISHED, every epoch logged once (no step twice for any metric)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    twice = {}
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        if len(steps) != len(set(steps)):
            twice[key] = steps
    assert not twice, twice
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch")) == list(range(1, epochs + 1))
    return run
