"""The one redaction rule (gdnsq.redaction): what it hides, the logging filter that applies it to every record a
handler writes, and the checkpoint's stored config (the run's identity unchanged by it)."""

from __future__ import annotations

import logging

import torch

from gdnsq.config import load_config, to_dict
from gdnsq.redaction import RedactingFilter, redact_logging, scrub_tree, scrub_value
from gdnsq.training.checkpoint import fingerprint, identity_mismatch, make_checkpoint

URI = "http://alice:s3cr3t@127.0.0.1:5000"


def test_uri_passwords_and_signed_urls_are_hidden_and_nothing_else():
    assert scrub_value(f"API request to {URI}/api/2.0/x failed") == (
        "API request to http://alice:***@127.0.0.1:5000/api/2.0/x failed"
    )
    assert scrub_value("s3://AKIA:wJalr%2FK7M@bucket/runs") == "s3://AKIA:***@bucket/runs"  # "/" is %2F in a URI
    assert "sig" not in scrub_value("https://b/k.beton?X-Amz-Signature=sig&x=1").split("?")[1].split("&")[0][-3:]
    assert scrub_value("http://127.0.0.1:5000/x and /data/runs:3") == "http://127.0.0.1:5000/x and /data/runs:3"
    tree = scrub_tree({"tracking": {"uri": URI}, "rules": ({"api_key": "k"},), "n": 3})
    assert tree == {"tracking": {"uri": "http://alice:***@127.0.0.1:5000"}, "rules": [{"api_key": "***"}], "n": 3}


def test_the_filter_redacts_messages_arguments_and_tracebacks():
    record = logging.LogRecord("mlflow", logging.WARNING, __file__, 1, "request to %s failed", (URI,), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "request to http://alice:***@127.0.0.1:5000 failed"
    try:
        raise ConnectionError(f"cannot reach {URI}")
    except ConnectionError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, sys.exc_info())
    RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "s3cr3t" not in text and "cannot reach http://alice:***@" in text


def test_redact_logging_covers_every_logger_through_the_handler(caplog):
    logger = logging.getLogger("some.library")
    redact_logging(logging.getLogger())  # caplog's handler sits on the root logger
    redact_logging(logging.getLogger())  # once is enough: no second filter
    assert sum(isinstance(f, RedactingFilter) for f in caplog.handler.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("cannot reach %s", URI)
    assert "s3cr3t" not in caplog.text and "alice:***@" in caplog.text


def test_a_checkpoint_stores_the_config_redacted_and_keeps_the_runs_identity():
    cfg = load_config(None, {"tracking.uri": URI, "data.train_path": "postgresql://u:pw1@db/images"})
    ckpt = make_checkpoint(to_dict(cfg), torch.nn.Linear(1, 1), {}, {}, {}, 0)
    assert ckpt["config"]["tracking"]["uri"] == "http://alice:***@127.0.0.1:5000"
    assert ckpt["config"]["data"]["train_path"] == "postgresql://u:***@db/images"
    # the stored (redacted) config still matches the job that wrote it; a rotated password is the same run
    assert identity_mismatch(to_dict(cfg), ckpt) == []
    rotated = load_config(None, {"tracking.uri": URI, "data.train_path": "postgresql://u:pw2@db/images"})
    assert identity_mismatch(to_dict(rotated), ckpt) == [] and fingerprint(to_dict(rotated)) == ckpt["fingerprint"]
    other = load_config(None, {"tracking.uri": URI, "data.train_path": "postgresql://u:pw1@db/other"})
    assert identity_mismatch(to_dict(other), ckpt) == ["data.train_path"]
