"""Where training connects, checked before Ray starts: job-server URLs, and addresses nothing answers on."""

import logging
import time

import pytest
from fault_runs import fault_pattern

from gdnsq.config import load_config
from gdnsq.errors import ClusterError
from gdnsq.launch.preflight import ray_address


def test_job_server_url_in_the_environment_is_dropped_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what `gdnsq submit` takes
    with caplog.at_level(logging.WARNING, logger="gdnsq"):
        assert ray_address(load_config(None, {})) is None
    assert "job-server URL" in caplog.text
    import os

    assert "RAY_ADDRESS" not in os.environ  # ray.init would read it otherwise


def test_job_server_url_in_the_config_is_one_line(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match=r"^ray\.address: 'https://head:8265' is a job-server URL"):
        ray_address(load_config(None, {"ray.address": "https://head:8265"}))


def test_nothing_listening_fails_fast(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"^RAY_ADDRESS: nothing answers at 127\.0\.0\.1:1"):
        ray_address(load_config(None, {}))
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("address", ["auto", "local"])
def test_ray_keywords_pass(address, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(load_config(None, {"ray.address": address})) == address


def _silent_listener() -> int:
    """A TCP port that accepts connections and never says a word (a wrong port, a firewall's tarpit)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    return server.getsockname()[1]


def _http_server() -> int:
    """A web server (the dashboard's port given as the GCS address, any HTTP service)."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


@pytest.mark.parametrize("listener", [_silent_listener, _http_server], ids=["silent", "http"])
def test_a_listener_that_is_not_ray_fails_in_one_line_within_20_s(listener, monkeypatch):
    """It answers TCP, so the probe above passes; ray.init then waited past two minutes. gRPC's readiness check
    (a Ray GCS is a gRPC server) tells it apart."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = listener()
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as e:
        ray_address(load_config(None, {"ray.address": f"127.0.0.1:{port}"}))
    assert time.monotonic() - t0 < 20
    key = {_silent_listener: "silent_address", _http_server: "http_address"}[listener]
    assert fault_pattern(key, port=port).fullmatch(f"gdnsq: error: {e.value}"), str(e.value)  # the CLI's line
