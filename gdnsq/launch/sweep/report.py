"""The sweep report: the trial table from Tune's results, the best trial, and the table as text, CSV,
JSON and a PNG, saved next to the experiment and as artifacts of the sweep's MLflow run. When trials carry
size figures (their run summaries' ``bytes_payload`` / ``bops``), also the Pareto fronts of test top-1 against
bytes and BOPs (:mod:`gdnsq.launch.sweep.pareto`) as ``pareto_front.{csv,png}``."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
from pathlib import Path

from ..storage import SUMMARY_FILE, read_json, write_bytes
from .pareto import FRONT_STEM, FRONTS, draw_front, front_kind, front_rows, mark_fronts
from .plan import SweepPlan, run_name

log = logging.getLogger("gdnsq")

SUMMARY_STEM = "sweep_summary"


# ------------------------------------------------------------------------------------- results


def _value(row, key: str):
    v = row.get(key) if row is not None else None
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def summarize(results, plan: SweepPlan, trials_dir: str) -> tuple[dict, dict[str, dict]]:
    """The sweep table: per trial its params, its best epoch's metrics (by the sweep metric), status
    (completed / stopped by the scheduler / error), epochs and time. Also returns each completed
    trial's run summary (test split), by trial id."""
    s = plan.sweep
    rows, run_summaries = [], {}
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1]
        name = run_name(s.name, trial_id)
        df = result.metrics_dataframe
        has_rows = df is not None and len(df) > 0
        best, ckpt = None, None
        if has_rows and s.metric in df:
            scored = df[df[s.metric].notna()]
            if len(scored):
                best = scored.loc[scored[s.metric].idxmax() if s.mode == "max" else scored[s.metric].idxmin()]
        if has_rows and "checkpoint_path" in df:
            paths = df["checkpoint_path"].dropna()
            ckpt = str(paths.iloc[-1]) if len(paths) else None
        run_summary = read_json(f"{trials_dir}/{name}/{SUMMARY_FILE}")
        if run_summary is not None:
            run_summaries[trial_id] = run_summary
        rs = run_summary or {}
        status = "error" if result.error else ("completed" if run_summary is not None else "stopped")
        rows.append(
            {
                "trial_id": trial_id,
                "run_name": name,
                "params": {k: result.config.get(k) for k in s.space},
                "status": status,
                "stopped_early": status == "stopped",
                "epochs": int(df["epoch"].max()) if has_rows and "epoch" in df else 0,
                "best_epoch": _value(best, "epoch"),
                "score": _value(best, s.metric),
                "ns_top1": _value(best, "val/ns_top1"),
                "top1": _value(best, "val/top1"),
                "avg_bits_w": _value(best, "bits/avg_w"),
                "avg_bits_a": _value(best, "bits/avg_a"),
                "converged": bool(_value(best, "val/converged") or False),
                # from the run summary: the final (best) state's test figures, convergence and size (the front's)
                "test_ns_top1": rs.get("ns_top1"),
                "test_top1": rs.get("top1"),
                "test_converged": rs.get("converged"),
                "bytes_payload": rs.get("bytes_payload"),
                "bops": rs.get("bops"),
                "time_s": round(float(_value(df.iloc[-1], "time_total_s") or 0.0), 1) if has_rows else 0.0,
                "checkpoint": ckpt,
                "error": str(result.error).strip().splitlines()[0][:300] if result.error else None,
            }
        )
    rows.sort(key=lambda r: r["trial_id"])
    candidates = [r for r in rows if r["score"] is not None and r["checkpoint"]]
    best_row = None
    if candidates:
        sign = 1 if s.mode == "max" else -1
        # a tie goes to the trial that ran to the end
        best_row = max(candidates, key=lambda r: (sign * r["score"], r["status"] == "completed"))
    for r in rows:
        r["best"], r["registered"] = r is best_row, None
    summary = {
        "name": s.name,
        "metric": s.metric,
        "mode": s.mode,
        "params": list(s.space),
        "trials": rows,
        "best_trial": best_row["trial_id"] if best_row else None,
        "front": mark_fronts(rows, front_kind(plan.job.quant.budget.kind)),
        "counts": {k: sum(r["status"] == k for r in rows) for k in ("completed", "stopped", "error")},
    }
    return summary, run_summaries


def best_trial(summary: dict) -> dict | None:
    return next((r for r in summary["trials"] if r["best"]), None)


# ------------------------------------------------------------------------------------ summary io


def _csv_rows(summary: dict) -> tuple[list[str], list[dict]]:
    cols = [
        "trial_id",
        "status",
        "stopped_early",
        *summary["params"],
        "ns_top1",
        "top1",
        "avg_bits_w",
        "avg_bits_a",
        "converged",
        "best_epoch",
        "epochs",
        "test_ns_top1",
        "test_top1",
        "bytes_payload",
        "bops",
        "time_s",
        "best",
        "registered",
        "run_name",
        "error",
    ]
    rows = [{**{k: v for k, v in r.items() if k != "params"}, **r["params"]} for r in summary["trials"]]
    return cols, [{c: r.get(c) for c in cols} for r in rows]


def _fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, float) else str(v)


def format_table(summary: dict) -> str:
    """The trial table as fixed-width text (best trial marked *)."""
    head = ["trial", "status", *summary["params"], "ns_top1", "top1", "bits W/A", "conv", "epochs", "time s"]
    lines = []
    for r in summary["trials"]:
        bits = f"{_fmt(r['avg_bits_w'])}/{_fmt(r['avg_bits_a'])}"
        status = r["status"] + (" (early)" if r["stopped_early"] else "")
        params = [_fmt(r["params"][k], ".4g") for k in summary["params"]]
        lines.append(
            [
                ("*" if r["best"] else " ") + r["trial_id"],
                status,
                *params,
                _fmt(r["ns_top1"]),
                _fmt(r["top1"]),
                bits,
                _fmt(r["converged"]),
                str(r["epochs"]),
                _fmt(r["time_s"], ".0f"),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
    c = summary["counts"]
    out.append(
        f"{len(lines)} trials: {c['completed']} completed, {c['stopped']} stopped early, {c['error']} failed; "
        f"metric {summary['metric']} ({summary['mode']}), * = best"
    )
    front = summary.get("front")
    for name in ("bytes", "bops") if front else ():
        out.append(
            f"front, test top-1 vs {name}: {', '.join(front[name]) or 'none'}"
            + (f" ({FRONT_STEM}.csv)" if name == front["primary"] else "")
        )
    return "\n".join(out)


def _csv_text(cols: list[str], rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def _plot(draw, summary: dict) -> bytes | None:
    try:
        return draw(summary)
    except Exception as e:  # noqa: BLE001 - a plot must never fail the sweep
        log.warning("sweep plot %s failed: %s", draw.__name__, e)
        return None


def save_summary(summary: dict, experiment: str, parent) -> None:
    """sweep_summary.{json,csv,png} (and pareto_front.{csv,png} with a front) next to the experiment and as
    artifacts of the sweep's run."""
    from ...tracking.plots import draw_sweep_summary

    files = {
        f"{SUMMARY_STEM}.json": json.dumps(summary, indent=1, default=str).encode(),
        f"{SUMMARY_STEM}.csv": _csv_text(*_csv_rows(summary)),
    }
    png = _plot(draw_sweep_summary, summary)
    if png:
        files[f"{SUMMARY_STEM}.png"] = png
    front = summary.get("front")
    if front:
        files[f"{FRONT_STEM}.csv"] = _csv_text(*front_rows(summary))
        png = _plot(draw_front, summary)
        if png:
            files[f"{FRONT_STEM}.png"] = png
    summary["files"] = {}
    for name, data in files.items():
        write_bytes(f"{experiment}/{name}", data)
        stem, ext = name.rsplit(".", 1)
        summary["files"][ext if stem == SUMMARY_STEM else f"front_{ext}"] = f"{experiment}/{name}"
    if parent is None:
        return
    with tempfile.TemporaryDirectory(prefix="gdnsq-sweep-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
            parent.log_artifact(Path(d) / name)  # staged (copied) at once
    best = best_trial(summary)
    c = summary["counts"]
    parent.log_metrics(
        {
            "sweep/trials": len(summary["trials"]),
            "sweep/completed": c["completed"],
            "sweep/stopped_early": c["stopped"],
            "sweep/errors": c["error"],
            **({f"sweep/best/{summary['metric']}": best["score"]} if best else {}),
            **({f"sweep/front_{k}_points": len(front[k]) for k in FRONTS} if front else {}),
        }
    )
    parent.set_tags(
        {
            "gdnsq.best_trial": summary["best_trial"] or "none",
            **({"gdnsq.pareto_front": ",".join(front[front["primary"]])} if front else {}),
            **({"gdnsq.registered_model": summary["registered_model"]} if summary.get("registered_model") else {}),
        }
    )
