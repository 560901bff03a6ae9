"""The fault suite, in-process path (``--no-ray``): real CLI processes, real files, signals and resource limits.

Each case runs ``gdnsq quickstart --no-ray`` in a child process on the small CNN with its FP weights given (a 40-step
teacher, trained once for the module), a few steps an epoch, and checks what a user would: the one line, the exit
status, what is left on disk, and that the same command resumes losing at most the epoch in flight.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket

import pytest
from fault_runs import (
    SMALL,
    assert_each_metric_logged_once,
    fault_pattern,
    files_under,
    interrupt,
    interrupted_line,
    no_traceback,
    run,
    start,
)
from mlflow_server import MlflowServer

from gdnsq.training.checkpoint import CHECKPOINT_FILE, load_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill(signal.SIGTERM)


STEPS_20 = ["--train.max_steps_per_epoch", "20"]  # after SMALL's 3: the last value wins


def quickstart(teacher: str, name: str, *extra: str) -> list[str]:
    return [
        "quickstart",
        "--no-ray",
        "--name",
        name,
        "--model.checkpoint",
        teacher,
        *SMALL,
        *extra,
    ]


@pytest.mark.timeout(900)
def test_file_size_limit_during_a_checkpoint_save(teacher, tmp_path):
    """A file-size limit below the checkpoint's size, put on the run once epoch 1 is saved (``prlimit``, as
    ``ulimit -f`` would), hits epoch 2's save: one line naming the reason, exit 2, no temporary file, epoch 1's
    checkpoint intact; without the limit the same command resumes from epoch 1. (One process to the fault: the
    limit lands between the two saves instead of a first run's end.)"""
    import resource

    # 20 steps an epoch: the limit lands while epoch 2 trains, well before its save, on a loaded machine too
    args = quickstart(teacher, "limited", "--tracking.enabled", "false", "--train.epochs", "2", *STEPS_20)
    folder = tmp_path / "runs" / "limited"
    child = start(args, tmp_path)
    child.wait_for(r"^epoch 1/2\s+val top-1", timeout=600)  # printed once epoch 1's checkpoint is saved
    before = (folder / CHECKPOINT_FILE).read_bytes()
    resource.prlimit(child.proc.pid, resource.RLIMIT_FSIZE, (len(before) // 2, resource.RLIM_INFINITY))
    assert child.finish(timeout=300) == 2, child.output[-3000:]
    out = child.output
    no_traceback(out)
    last = out.strip().splitlines()[-1]
    assert fault_pattern("file_size", run=folder).fullmatch(last), out
    assert (folder / CHECKPOINT_FILE).read_bytes() == before
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]

    rc, out = run(args, tmp_path)
    assert rc == 0, out
    assert "resuming from the checkpoint of epoch 1" in out
    assert load_checkpoint(folder / CHECKPOINT_FILE)["engine"]["epoch"] == 2


@pytest.mark.timeout(900)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_a_random_step_then_the_same_command_resumes(sig, teacher, server, tmp_path):
    """Ctrl-C (to the process group, as a terminal sends it) or SIGTERM at a step drawn at random: one line naming
    the last epoch shown, exit 128 + signal, nothing half-written; the same command resumes from that epoch and
    MLflow holds every epoch once."""
    epochs = 3
    draw = random.Random(f"local-{sig.name}")
    epoch, step = draw.randint(1, epochs - 1), draw.randint(1, 2)  # plain progress lines show steps 1 and 2 of 3
    experiment = f"local-{sig.name}"
    args = quickstart(
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
    child = start(args, tmp_path)
    child.wait_for(rf"^\s+epoch {epoch}/{epochs}\s+step {step}/", timeout=600)
    interrupt(child, sig)
    assert child.finish(timeout=300) == 128 + sig, child.output[-3000:]
    saved = interrupted_line(child.output, epochs)  # at most the epoch in flight is lost
    assert saved >= epoch - 1, (epoch, step, saved)
    folder = tmp_path / "runs" / "sig"
    assert not [p for p in files_under(tmp_path) if p.name.endswith(".tmp")], files_under(tmp_path)
    if saved:
        assert load_checkpoint(folder / CHECKPOINT_FILE)["engine"]["epoch"] == saved

    rc, out = run([*args, "--summary-json", "summary.json"], tmp_path)
    assert rc == 0, out
    no_traceback(out)
    if saved:
        assert f"resuming from the checkpoint of epoch {saved}" in out
    shown = [line.split()[1] for line in out.splitlines() if re.match(r"^epoch\s+\d+/", line)]
    assert shown == [f"{e}/{epochs}" for e in range(saved + 1, epochs + 1)], out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == epochs and summary["steps"] == epochs * 3
    assert_each_metric_logged_once(server.url, experiment, epochs)
    assert not files_under(tmp_path / "outbox"), "an MLflow outbox was left undelivered"


@pytest.mark.timeout(900)
def test_a_second_live_run_of_the_same_name_is_refused(teacher, tmp_path):
    """Two runs of one name started apart: the second stops in one line before training, the first is untouched;
    SIGTERM then ends the first."""
    args = quickstart(teacher, "twice", "--train.epochs", "50", "--tracking.enabled", "false")
    first = start(args, tmp_path)
    first.wait_for(r"^\s+epoch 1/50\s+step 1/", timeout=600)
    rc, out = run(args, tmp_path)
    assert rc == 2, out
    last = out.strip().splitlines()[-1]
    holder = fault_pattern("twice_local", name="twice", pid=first.proc.pid, run=tmp_path / "runs" / "twice")
    assert holder.fullmatch(last), out
    assert "val top-1" not in out  # nothing trained
    assert first.proc.poll() is None, "the first run must go on"
    interrupt(first, signal.SIGTERM)
    assert first.finish(timeout=300) == 128 + signal.SIGTERM
    interrupted_line(first.output, 50)


@pytest.mark.timeout(900)
def test_mlflow_down_is_one_warning_and_the_run_goes_on(teacher, tmp_path):
    """Nothing listens at the tracking URI: the run trains and finishes (exit 0) with one warning when the store
    first fails and one line at the end naming the outbox that keeps its calls; no urllib3 retry line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = quickstart(teacher, "down", "--train.epochs", "2", "--tracking.uri", f"http://127.0.0.1:{port}")
    rc, out = run(args, tmp_path)
    assert rc == 0, out
    no_traceback(out)
    (warning,) = [line for line in out.splitlines() if "MLflow unreachable" in line]
    assert fault_pattern("mlflow_down", port=port).fullmatch(warning), warning
    assert "Retrying" not in out and "urllib3" not in out, out
    kept = [line for line in out.splitlines() if "calls kept in" in line]
    assert len(kept) == 1 and str(tmp_path / "outbox") in kept[0], out
    assert "quantized top-1" in out
    assert files_under(tmp_path / "outbox"), "the outbox keeps the calls for replay"


@pytest.mark.timeout(900)
def test_a_password_in_the_tracking_uri_reaches_no_file_and_no_console_line(teacher, server, tmp_path):
    """One redaction rule (gdnsq.redaction) for the console, logs, the checkpoint's stored config, summaries,
    MLflow params and artifacts, and the outbox: a password planted in the tracking URI is found in none of the
    files the runs write (checkpoint bytes included) nor in their output. First with the store unreachable
    (MLflow's error names the URL it called, user info included), then with the server up."""
    secret = "s3cr3t-Pw-9f8e7d"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://alice:{secret}@127.0.0.1:{s.getsockname()[1]}"
    up = server.url.replace("http://", f"http://alice:{secret}@")
    outputs = []
    for name, uri in (("down", down), ("up", up)):
        args = quickstart(teacher, name, "--train.epochs", "2", "--tracking.uri", uri, "--tracking.experiment", "pw")
        rc, out = run([*args, "--summary-json", f"out/{name}.json"], tmp_path)
        assert rc == 0, out
        outputs.append(out)
    (warning,) = [line for line in outputs[0].splitlines() if "MLflow unreachable" in line]
    assert fault_pattern("secret", port=down.rsplit(":", 1)[1]).fullmatch(warning), warning
    assert not [o for o in outputs if secret in o], "a console line shows the password"
    written = files_under(tmp_path) + files_under(server.root)
    names = {p.name for p in written}  # checkpoint bytes and the outbox the unreachable store left are among them
    assert {CHECKPOINT_FILE, "summary.json", "journal.jsonl", "meta.json"} <= names, names
    leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    stored = load_checkpoint(tmp_path / "runs" / "up" / CHECKPOINT_FILE)["config"]["tracking"]["uri"]
    assert stored == up.replace(secret, "***")

    from mlflow import MlflowClient  # the run reached the server through the URI it was given

    client = MlflowClient(server.url)
    (run_up,) = client.search_runs([client.get_experiment_by_name("pw").experiment_id])
    assert run_up.info.status == "FINISHED" and run_up.data.params["tracking.uri"] == up.replace(secret, "***")
