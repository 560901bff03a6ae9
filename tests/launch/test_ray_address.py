"""Where training connects, checked before Ray starts: job-server URLs, and addresses nothing answers on."""

import logging
import time

import pytest

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
