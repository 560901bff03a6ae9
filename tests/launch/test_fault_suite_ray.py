"""The fault suite, Ray Train path: real CLI processes (the driver) on a real local Ray cluster, real files."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest

pytest.importorskip("ray.train")

from fault_runs import (  # noqa: E402
    SMALL,
    assert_each_metric_logged_once,
    assert_no_ray_noise,
    fault_pattern,
    files_under,
    interrupt,
    interrupted_line,
    no_traceback,
    ray_train_workers,
    run,
    start,
)
from mlflow_server import MlflowServer  # noqa: E402
from ray_cluster import LocalCluster  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    # numba's dispatcher finalizer raises when a dropped FFCV loader is collected; not ours.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_a_checkpoint_that_cannot_be_staged_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    """Rank 0 writes its checkpoint into a temporary folder for ray.train.report: under a file-size limit (set and
    lifted again in this process) that write fails as one StorageError line, and neither the temporary file nor the
    folder stays in TMPDIR. A real Ray run hits it in test_file_size_limit_during_a_checkpoint_save."""
    import resource
    import tempfile

    import torch

    from gdnsq.errors import StorageError
    from gdnsq.launch.staging import staged_checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(StorageError) as e:
            with staged_checkpoint({"engine": {"epoch": 1, "model": {"w": torch.zeros(100_000)}}}):
                pass
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    line = str(e.value)
    assert "\n" not in line
    # the worker returns its StorageError to the driver (ray_worker.USER_ERROR), whose CLI prints it so
    assert fault_pattern("staging", tmp=tmp_path).fullmatch(f"gdnsq: error: {line}"), line
    assert list(tmp_path.iterdir()) == []


PREEMPTION_LINE = (  # Train V2's controller, every run (Ray 2.60), as the driver receives it from the controller
    "[2026-12-07 20:28:27,446 E 9975 10007] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'77b1634d0f2ac691bfd6c77301000000' has constructor arguments in the object store and max_restarts > 0."
)


@pytest.mark.parametrize("level", [-1, 0, 1, 2])
def test_ray_own_lines_are_switched_off_at_the_source_except_with_v(level, monkeypatch):
    """Ray's switches for its own lines: at default verbosity (and -q) the job's tasks and actors log at ERROR (the
    placement-group cleaner's State API warning) and the driver skips Ray's C++ log lines; -v leaves Ray's
    defaults. The end-to-end check is every run of this file (assert_no_ray_noise)."""
    from ray._private.ray_logging import LogDeduplicator

    from gdnsq.launch.console import VERBOSITY_ENV, quiet_env, ray_job_logging

    monkeypatch.setenv(VERBOSITY_ENV, str(level))
    env, job = quiet_env(level), ray_job_logging()
    if level > 0:
        assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in env and job is None
        return
    assert job.log_level == "ERROR"
    # Ray's own driver-side filter, with the pattern we give it: C++ lines go, ours stay
    dedup = LogDeduplicator(5, None, env["RAY_DEDUP_LOGS_SKIP_REGEX"], _timesource=time.monotonic)
    ours = "epoch 1/2  val top-1   9.60  bits W2.00 A2.00  converged  T 2.42  453 img/s  0.8 s"
    batch = {"ip": "127.0.0.1", "pid": 1, "lines": [PREEMPTION_LINE, ours, "gdnsq: error: x"]}
    shown = [line for b in dedup.deduplicate(batch) for line in b["lines"]]
    assert shown == [ours, "gdnsq: error: x"]


# ------------------------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One node (the driver is the CLI child process, connecting with its address and token). Its workers stage
    checkpoints in their own TMPDIR, so a staging folder left by a killed worker would show. With its dashboard, as
    `ray start --head` has one: Train's placement-group cleaner asks its State API (without one on this cluster, it
    asked another Ray's dashboard on this machine, failed on its token and printed a traceback)."""
    staging = tmp_path_factory.mktemp("staging")
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "TMPDIR": str(staging)}
    with LocalCluster(nodes=1, cpus_per_node=2, node_env=env, dashboard=True) as c:
        c.staging = staging
        yield c


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill(signal.SIGTERM)


def quickstart(cluster, teacher: str, name: str, *extra: str) -> list[str]:
    return [
        "quickstart",
        "--name",
        name,
        "--model.checkpoint",
        teacher,
        "--ray.address",
        cluster.address,
        "--ray.num_workers",
        "1",
        "--ray.cpus_per_worker",
        "1",
        "--ray.checkpoints_to_keep",
        "10",
        *SMALL,
        *extra,
    ]


def checkpoint_folders(folder) -> tuple[list[str], list[str]]:
    """(every checkpoint_* folder, the ones Ray's snapshot lists), as names."""
    from ray.train import Result

    found = sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())
    try:
        registered = sorted(os.path.basename(c.path) for c, _ in Result.from_path(str(folder)).best_checkpoints)
    except RuntimeError:
        registered = []
    return found, registered


@pytest.mark.timeout(1200)
def test_file_size_limit_during_a_checkpoint_save(cluster, teacher, tmp_path):
    """A file-size limit put on rank 0's worker once epoch 1 is saved (``prlimit``, as ``ulimit -f`` in its shell
    would), below the checkpoint's size: staging epoch 2's checkpoint fails on the worker, and the driver ends in
    one line naming the worker's TMPDIR and the reason, exit 2; epoch 1's checkpoint stays, byte for byte, the one
    Ray lists; no staging folder is left. Without the limit the same command resumes from epoch 1."""
    import resource

    epochs = 3
    # 30 steps an epoch (SMALL's 3 overridden): the limit lands while epoch 2 trains, seconds before its staging,
    # although a worker's lines reach the console up to a second late
    steps = ["--train.max_steps_per_epoch", "30"]
    args = quickstart(cluster, teacher, "limited", "--train.epochs", str(epochs), "--tracking.enabled", "false", *steps)
    child = start(args, tmp_path, env=cluster.env)
    child.wait_for(rf"^\s+epoch 2/{epochs}\s+step 1/", timeout=900)  # epoch 1 saved and registered
    folder = tmp_path / "runs" / "limited"
    (first,), _ = checkpoint_folders(folder)
    saved = (folder / first / "checkpoint.pt").read_bytes()
    workers = ray_train_workers([p.pid for p in cluster.procs])
    assert len(workers) == 1, workers
    resource.prlimit(workers[0], resource.RLIMIT_FSIZE, (len(saved) // 2, resource.RLIM_INFINITY))
    assert child.finish(timeout=300) == 2, child.output[-3000:]
    no_traceback(child.output)
    assert_no_ray_noise(child.output)
    last = child.output.strip().splitlines()[-1]
    assert fault_pattern("staging", tmp=cluster.staging).fullmatch(last), child.output[-3000:]
    assert checkpoint_folders(folder) == ([first], [first])
    assert (folder / first / "checkpoint.pt").read_bytes() == saved
    assert not list(cluster.staging.glob("gdnsq-ckpt-*")), "a staging folder was left"

    rc, out = run(args, tmp_path, env=cluster.env)
    assert rc == 0, out
    no_traceback(out)
    assert_no_ray_noise(out)
    assert "resuming from the checkpoint of epoch 1" in out, out
    shown = [line.split()[1] for line in out.splitlines() if re.match(r"^epoch\s+\d+/", line)]
    assert shown == [f"{e}/{epochs}" for e in range(2, epochs + 1)], out
    found, registered = checkpoint_folders(folder)
    assert found == registered and len(found) == epochs, (found, registered)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_a_random_step_then_the_same_command_resumes(sig, cluster, teacher, server, tmp_path):
    """Ctrl-C or SIGTERM to the driver at a step drawn at random: one line naming the last epoch shown (the last
    one Ray registered), exit 128 + signal, no checkpoint folder Ray does not know; the same command resumes from
    that epoch, and MLflow holds every epoch once (the issue's run resumed one epoch further back than the console
    showed, left an orphan checkpoint folder and logged that epoch twice)."""
    # Epochs take about a second on the cluster and a worker's lines reach the driver's console up to a second
    # late: the signal lands in one of the first three epochs of ten, never after the run ended.
    epochs = 10
    draw = random.Random(f"ray-{sig.name}")
    epoch, step = draw.randint(1, 3), draw.randint(1, 2)
    experiment = f"ray-{sig.name}"
    args = quickstart(
        cluster,
        teacher,
        "sig",
        "--train.epochs",
        str(epochs),
        "--tracking.uri",
        server.url,
        "--tracking.experiment",
        experiment,
        "--tracking.register",
        "false",
    )
    child = start(args, tmp_path, env=cluster.env)
    child.wait_for(rf"^\s+epoch {epoch}/{epochs}\s+step {step}/", timeout=900)
    interrupt(child, sig)
    assert child.finish(timeout=300) == 128 + sig, child.output[-3000:]
    saved = interrupted_line(child.output, epochs, console_lag=1)
    assert saved >= epoch - 1, (epoch, step, saved)
    folder = tmp_path / "runs" / "sig"
    found, registered = checkpoint_folders(folder)
    assert found == registered and len(found) == saved, (found, registered, saved)

    rc, out = run([*args, "--summary-json", "summary.json"], tmp_path, env=cluster.env)
    assert rc == 0, out
    no_traceback(out)
    assert_no_ray_noise(out)
    shown = [line.split()[1] for line in out.splitlines() if re.match(r"^epoch\s+\d+/", line)]
    assert shown == [f"{e}/{epochs}" for e in range(saved + 1, epochs + 1)], out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == epochs and summary["steps"] == epochs * 3
    found, registered = checkpoint_folders(folder)
    assert found == registered and len(found) == epochs, (found, registered)
    assert_each_metric_logged_once(server.url, experiment, epochs)
    assert not list(cluster.staging.glob("gdnsq-ckpt-*")), "a staging folder of a killed worker was left"
    assert not files_under(tmp_path / "outbox"), "an MLflow outbox was left undelivered"


@pytest.mark.timeout(1200)
def test_a_second_live_run_of_the_same_name_is_refused(cluster, teacher, tmp_path):
    """The driver holds the run's folder for the run's life: a second driver of the same name stops in one line
    before it connects to Ray; SIGTERM then ends the first."""
    args = quickstart(cluster, teacher, "twice", "--train.epochs", "50", "--tracking.enabled", "false")
    first = start(args, tmp_path, env=cluster.env)
    first.wait_for(r"^\s+epoch 1/50\s+step 1/", timeout=900)
    rc, out = run(args, tmp_path, env=cluster.env)
    assert rc == 2, out
    last = out.strip().splitlines()[-1]
    holder = fault_pattern("twice_ray", name="twice", pid=first.proc.pid, run=tmp_path / "runs" / "twice")
    assert holder.fullmatch(last), out
    assert_no_ray_noise(out)
    assert "gdnsq run twice" not in out  # refused before the header: no Ray, nothing trained
    assert first.proc.poll() is None, "the first run must go on"
    interrupt(first, signal.SIGTERM)
    assert first.finish(timeout=300) == 128 + signal.SIGTERM
    interrupted_line(first.output, 50, console_lag=1)
