"""Names and values MLflow accepts: metric/param/tag keys, string limits, and secret scrubbing.

Everything that leaves the process for the store (params, tags, config.json, the outbox's stored URI)
goes through :func:`scrub` / :func:`scrub_value` / :func:`scrub_tree` first.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_PARAM_LEN = 6000  # MLflow >= 2.x server limit (older servers: 500); longer values go to config.json
MAX_TAG_LEN = 8000
MAX_KEY_LEN = 250

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
REDACTED = "***"


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
    """Scrubbed deep copy of a nested dict/list (for config.json)."""
    if isinstance(data, dict):
        return {k: scrub_tree(v, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [scrub_tree(v, key) for v in data]
    return scrub(key, data)


def metric_key(name: str) -> str:
    """A valid MLflow metric/param/tag key: allowed characters only, no '.', '..' or empty segments."""
    s = re.sub(r"[^/\w.\- ]", "_", str(name))  # ':' is refused by Windows servers
    segs = [("_" if p in (".", "..") else p) for p in s.split("/") if p]
    return "/".join(segs)[:MAX_KEY_LEN] or "_"


def safe_name(name: str) -> str:
    """``name`` as one file-name segment (artifact folders of experiments)."""
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "default"


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending in a visible marker when cut."""
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def param_str(value: Any) -> str:
    """A param value as MLflow stores it: lists and dicts as compact JSON, the rest with ``str``."""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def as_float(v: Any) -> float | None:
    """A metric value (number, numeric string, 0-d tensor) as a float; None when it is not one."""
    try:
        return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None
