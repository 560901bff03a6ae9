"""Names and values MLflow accepts: metric/param/tag keys, string limits, and secret scrubbing.

Everything that leaves the process for the store (params, tags, artifacts such as config.json and
summary.json, the outbox's stored URI) goes through :func:`scrub` / :func:`scrub_value` /
:func:`scrub_tree` first: the one redaction rule of :mod:`gdnsq.redaction`, re-exported here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..redaction import REDACTED as REDACTED
from ..redaction import is_secret_key as is_secret_key
from ..redaction import scrub as scrub
from ..redaction import scrub_tree as scrub_tree
from ..redaction import scrub_value as scrub_value

MAX_PARAM_LEN = 6000  # MLflow >= 2.x server limit (older servers: 500); longer values go to config.json
MAX_TAG_LEN = 8000
MAX_KEY_LEN = 250


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
