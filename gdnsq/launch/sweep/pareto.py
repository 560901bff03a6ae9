"""The accuracy-vs-size Pareto front of a sweep's trials, its table and its drawing (no Ray, MLflow or torch;
the drawing imports matplotlib through :mod:`gdnsq.tracking.plots` when called).

A trial is a point of a front when it ran to the end, its run summary says it converged (within its budget)
and it carries the figure: test top-1 (``test_top1``) against the packed payload bytes (``bytes_payload``,
the budget's true bytes) or against BOPs per sample (``bops``), both from the run summary
(:func:`gdnsq.training.bits.size_figures`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

FRONT_STEM = "pareto_front"  # the front's files: pareto_front.{csv,png}
FRONTS = {"bytes": "bytes_payload", "bops": "bops"}  # front -> the trial row's cost key
SIZE_SETTINGS = ("quant.budget.",)  # a sweep over one of these is a front sweep: every converged trial is registered


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, cost) ``a`` dominates ``b``: no less accurate, no larger, and strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (accuracy, cost) points, higher accuracy and lower cost better, ordered
    by cost (then accuracy descending, then index).

    Ties: points equal in both figures dominate neither other, so all of them are on the front (or none);
    at equal cost only the most accurate are, at equal accuracy only the smallest. O(n²), for sweeps.
    """
    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][1], -points[i][0], i))


def front_kind(budget_kind: str) -> str:
    """The front a budget's sweep is about (its ``pareto_front`` tag): BOPs for a BOPs budget, else bytes."""
    return "bops" if budget_kind == "bops" else "bytes"


def is_front_sweep(space: dict) -> bool:
    return any(k.startswith(SIZE_SETTINGS) for k in space)


def is_point(row: dict, cost: str) -> bool:
    """A converged trial that ran to the end and carries its top-1 and ``cost``."""
    return (
        row.get("status") == "completed"
        and bool(row.get("test_converged"))
        and row.get("test_top1") is not None
        and row.get(cost) is not None
    )


def mark_fronts(trials: list[dict], primary: str = "bytes") -> dict | None:
    """Set ``front_bytes`` / ``front_bops`` (bool) and ``pareto_front`` (the ``primary`` front's) on every trial
    row; returns ``{primary, bytes: [trial ids], bops: [trial ids]}`` (each front by cost), or None when no
    trial is a point of either front (the rows are then left as they are)."""
    if not any(is_point(r, cost) for r in trials for cost in FRONTS.values()):
        return None
    out: dict = {"primary": primary}
    for name, cost in FRONTS.items():
        points = [r for r in trials if is_point(r, cost)]
        on = [points[i]["trial_id"] for i in pareto_front([(float(r["test_top1"]), float(r[cost])) for r in points])]
        for r in trials:
            r[f"front_{name}"] = r["trial_id"] in on
        out[name] = on
    for r in trials:
        r["pareto_front"] = r[f"front_{primary}"]
    return out


def front_tags(row: dict, sweep_name: str, front: dict | None) -> dict[str, str]:
    """Registry version tags of a sweep's trial: ``sweep``, and with a front ``pareto_front`` (the primary
    front), ``pareto_front_bytes``, ``pareto_front_bops`` as ``true`` / ``false`` (MLflow filters compare strings:
    ``tags.pareto_front = 'true'``)."""
    tags = {"sweep": sweep_name}
    if front is not None:
        for tag, key in (
            ("pareto_front", "pareto_front"),
            ("pareto_front_bytes", "front_bytes"),
            ("pareto_front_bops", "front_bops"),
        ):
            tags[tag] = "true" if row.get(key) else "false"
    return tags


def front_rows(summary: dict) -> tuple[list[str], list[dict]]:
    """The front table: one row per trial with a size figure (converged or not), by bytes; front_bytes /
    front_bops mark the fronts' points, ``registered`` the version."""
    cols = [
        "trial_id",
        *summary["params"],
        "test_top1",
        "bytes_payload",
        "bops",
        "avg_bits_w",
        "test_converged",
        "front_bytes",
        "front_bops",
        "registered",
        "status",
        "run_name",
    ]
    rows = [
        {**{k: v for k, v in r.items() if k != "params"}, **r["params"]}
        for r in summary["trials"]
        if any(r.get(c) is not None for c in FRONTS.values())
    ]
    rows.sort(key=lambda r: (r["bytes_payload"] is None, r["bytes_payload"] or 0, r["trial_id"]))
    return cols, [{c: r.get(c) for c in cols} for r in rows]


def draw_front(summary: dict) -> bytes | None:
    """PNG of the fronts (gdnsq.tracking.plots.draw_pareto_front) over the trials with size figures."""
    from ...tracking.plots import draw_pareto_front

    def label(r: dict) -> str:  # the trial and its budget
        return r["trial_id"] + "".join(
            f" {'budget' if k == 'quant.budget.value' else k.removeprefix('quant.')} {v:g}"
            for k, v in r["params"].items()
            if k.startswith("quant.budget.") and isinstance(v, (int, float))
        )

    points = [
        {
            "label": label(r),
            "top1": r["test_top1"],
            "converged": bool(r["test_converged"]),
            **{k: r.get(k) for k in ("bytes_payload", "bops", "front_bytes", "front_bops")},
        }
        for r in summary["trials"]
    ]
    with tempfile.TemporaryDirectory(prefix="gdnsq-front-") as d:
        path = Path(d) / f"{FRONT_STEM}.png"
        title = f"sweep {summary['name']}: test top-1 against size, front in red"
        return path.read_bytes() if draw_pareto_front(points, path, title) else None
