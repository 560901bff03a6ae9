"""A run owns its folder: one live run per name (in this process or another), a lock that a killed holder leaves
free, and ``--fresh`` that never moves a live run's folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gdnsq.config import load_config
from gdnsq.errors import RunIdentityError
from gdnsq.launch.identity import LOCK_FILE, own_folder


def job(tmp_path, name="shared"):
    return load_config(None, {"name": name, "ray.storage_path": str(tmp_path / "runs")})


def test_a_second_holder_in_this_process_is_refused_in_one_line(tmp_path):
    cfg = job(tmp_path)
    with own_folder(cfg):
        with pytest.raises(RunIdentityError) as e:
            with own_folder(cfg):
                pass
        line = str(e.value)
        assert "\n" not in line and line.startswith("name: run 'shared' is already running (")
        assert f"pid {os.getpid()} on " in line and "--name NEW" in line
        with own_folder(job(tmp_path, "other")):  # another name: another folder, another lock
            pass
    with own_folder(cfg):  # released at the end of the run
        pass


HOLD = """
import sys, time
from gdnsq.config import load_config
from gdnsq.launch.identity import own_folder
cfg = load_config(None, {"name": "shared", "ray.storage_path": sys.argv[1]})
with own_folder(cfg):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "runs")], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.timeout(300)
def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    """fcntl locks end with their process (SIGKILL included): the lock file stays, but it blocks nobody."""
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunIdentityError, match=rf"pid {proc.pid} on "):
            with own_folder(job(tmp_path)):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert (tmp_path / "runs" / "shared" / LOCK_FILE).exists()
    t0 = time.monotonic()
    with own_folder(job(tmp_path)):
        pass
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(300)
def test_fresh_never_moves_a_live_runs_folder(tmp_path):
    proc = _holder(tmp_path)
    try:
        (tmp_path / "runs" / "shared" / "checkpoint.pt").write_bytes(b"the live run's")
        with pytest.raises(RunIdentityError, match="is already running"):
            with own_folder(job(tmp_path), fresh=True):
                pass
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["shared"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    with own_folder(job(tmp_path), fresh=True):  # once it ended: set aside, and the new folder held
        names = sorted(p.name for p in (tmp_path / "runs").iterdir())
        assert names[0] == "shared" and names[1].startswith("shared.old-") and len(names) == 2
        with pytest.raises(RunIdentityError, match="is already running"):
            with own_folder(job(tmp_path)):
                pass
    assert (tmp_path / "runs" / names[1] / "checkpoint.pt").read_bytes() == b"the live run's"


def test_fresh_with_no_earlier_run_sets_nothing_aside(tmp_path, caplog):
    """The lock makes the run's folder before --fresh looks: a folder holding only the lock is not an earlier run
    (no warning, no '.old-' folder); a killed run's leftover lock alone is not one either."""
    for _ in range(2):
        with caplog.at_level("WARNING", logger="gdnsq"):
            with own_folder(job(tmp_path), fresh=True):
                pass
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["shared"]
        assert "was moved" not in caplog.text
