"""The one redaction rule for credentials, at the ground floor (standard library only) so that every layer that
writes something a person or a store will read applies the same rule: the console and logs
(:class:`RedactingFilter`), checkpoints (their stored config), summaries, MLflow params, tags and artifacts, and
the MLflow outbox. ``gdnsq.tracking.names`` re-exports it for the tracking layer.

What is a credential: the password of a URI's user info (``postgresql://u:pw@h``, ``http://alice:pw@host``,
``s3://KEY:SECRET@bucket``), a secret-looking query parameter (``?X-Amz-Signature=...``, ``&token=...``), and the
value of a setting whose name says it is one (``db.password``, ``api_key``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "***"

_SECRET_PARTS = {
    "password",
    "passwd",
    "pwd",
    "secret",
    "secrets",
    "token",
    "key",
    "apikey",
    "credential",
    "credentials",
    "auth",
    "passphrase",
}
_SECRET_SUBSTRINGS = ("password", "secret", "apikey", "passphrase")
_URI_PASSWORD = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.\-]*://[^/\s:@]*:)(?P<pw>[^\s/]*)(?=@)", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<pre>[?&;][\w.\-]*(?:password|passwd|secret|token|key|sig|signature|credential)[\w.\-]*=)[^&;#\s]+", re.I
)


def is_secret_key(key: str) -> bool:
    """True for names like ``db.password``, ``api_key``, ``access-token`` (not ``num_tokens``)."""
    parts = [p for p in re.split(r"[._\-/\s]+", key.lower()) if p]
    return any(p in _SECRET_PARTS or any(s in p for s in _SECRET_SUBSTRINGS) for p in parts)


def scrub_value(value: str) -> str:
    """Redact passwords in URIs (``postgresql://u:pw@h``) and secret-looking query parameters."""
    value = _URI_PASSWORD.sub(lambda m: m.group("pre") + REDACTED, value)
    return _QUERY_SECRET.sub(lambda m: m.group("pre") + REDACTED, value)


def scrub(key: str, value: Any) -> Any:
    """``value`` redacted when ``key`` names a secret, else with secrets inside a string redacted."""
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    return scrub_value(value) if isinstance(value, str) else value


def scrub_tree(data: Any, key: str = "") -> Any:
    """Scrubbed deep copy of a nested dict/list (a config, a summary)."""
    if isinstance(data, dict):
        return {k: scrub_tree(v, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrub_tree(v, key) for v in data]
    return scrub(key, data)


class RedactingFilter(logging.Filter):
    """A logging filter (on a handler: it sees every record the handler writes, whichever logger made it) that
    applies :func:`scrub_value` to the message and to the traceback text. Third-party messages are the usual
    carriers: MLflow's "API request to http://user:pw@host/... failed" names the URL it called."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_value(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_value(record.exc_text)
        return True


def redact_logging(logger: logging.Logger | None = None) -> None:
    """Put a :class:`RedactingFilter` on every handler of ``logger`` (the root logger by default), and on the
    handler Python falls back to when a record finds none (``logging.lastResort``), once each."""
    handlers = list((logger or logging.getLogger()).handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
