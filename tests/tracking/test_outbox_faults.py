"""A tracking store that does not answer costs a run one warning and one delivery attempt per wait: no minutes of
waiting, no urllib3 retry lines, everything kept in the outbox (network only to 127.0.0.1).

The issue's run with its server down spent 95 s waiting (5 s at the start, 30 s at the first epoch, 60 s at the
end) and printed 95 "Retrying (Retry(total=...))" lines.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from gdnsq.tracking.run import RunTracker

pytestmark = pytest.mark.integration


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: nothing listens there


def silent_port() -> int:
    """Accepts connections and never answers (a hung server, a firewall's tarpit)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    return server.getsockname()[1]


@pytest.fixture
def mlflow_defaults(monkeypatch, tmp_path):
    """MLflow's HTTP settings as gdnsq sets them for a run (store.set_http_defaults), restored afterwards; a
    short request timeout for the silent server, as a user would set MLFLOW_HTTP_REQUEST_TIMEOUT."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)  # recorded, so set_http_defaults' setdefault is undone after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return tmp_path / "outbox"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("port", [refused_port, silent_port], ids=["refused", "silent"])
def test_a_store_that_does_not_answer_costs_one_warning_and_bounded_waits(port, mlflow_defaults, caplog):
    caplog.set_level(logging.DEBUG)
    t0 = time.monotonic()
    tracker = RunTracker(f"http://127.0.0.1:{port()}", "down", run_name="down", outbox_dir=mlflow_defaults)
    for epoch in (1, 2):
        tracker.log_epoch(epoch, {"val/top1": 50.0 + epoch}, [{"name": "fc", "bits_w": 2.0, "bits_a": 2.0}])
        assert tracker.flush(30.0) is False  # the session's per-epoch wait
    assert tracker.finish("FINISHED", timeout=60.0) is False
    elapsed = time.monotonic() - t0
    # each of the four waits: one attempt (a refused connection: at once; a silent server: the 2 s timeout)
    assert elapsed < 30, elapsed
    unreachable = [r for r in caplog.records if "MLflow unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in unreachable]
    retried = [r for r in caplog.records if r.name.startswith("urllib3") and r.levelno >= logging.WARNING]
    assert not retried, "urllib3 retried (and said so)"
    kept = [r.getMessage() for r in caplog.records if "calls kept in" in r.getMessage()]
    assert len(kept) == 1 and str(tracker.outbox.folder) in kept[0]
    journal = (tracker.outbox.folder / "journal.jsonl").read_text().splitlines()
    assert len(journal) == tracker.outbox.pending() > 0
