"""The sweep report: the trial table from Tune's results, the best trial, and the table as text, CSV,
JSON and a PNG, saved next to the experiment and as artifacts of the sweep's MLflow run."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
from pathlib import Path

from .storage import SUMMARY_FILE, read_json, write_bytes
from .sweep_plan import SweepPlan, run_name

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
        status = "error" if result.error else ("completed" if run_summary is not None else "stopped")
        rows.append({
            "trial_id": trial_id, "run_name": name, "params": {k: result.config.get(k) for k in s.space},
            "status": status, "stopped_early": status == "stopped",
            "epochs": int(df["epoch"].max()) if has_rows and "epoch" in df else 0,
            "best_epoch": _value(best, "epoch"), "score": _value(best, s.metric),
            "ns_top1": _value(best, "val/ns_top1"), "top1": _value(best, "val/top1"),
            "avg_bits_w": _value(best, "bits/avg_w"), "avg_bits_a": _value(best, "bits/avg_a"),
            "converged": bool(_value(best, "val/converged") or False),
            "test_ns_top1": (run_summary or {}).get("ns_top1"), "test_top1": (run_summary or {}).get("top1"),
            "time_s": round(float(_value(df.iloc[-1], "time_total_s") or 0.0), 1) if has_rows else 0.0,
            "checkpoint": ckpt,
            "error": str(result.error).strip().splitlines()[0][:300] if result.error else None,
        })
    rows.sort(key=lambda r: r["trial_id"])
    candidates = [r for r in rows if r["score"] is not None and r["checkpoint"]]
    best_row = None
    if candidates:
        sign = 1 if s.mode == "max" else -1
        # a tie goes to the trial that ran to the end
        best_row = max(candidates, key=lambda r: (sign * r["score"], r["status"] == "completed"))
    for r in rows:
        r["best"] = r is best_row
    summary = {"name": s.name, "metric": s.metric, "mode": s.mode, "params": list(s.space), "trials": rows,
               "best_trial": best_row["trial_id"] if best_row else None,
               "counts": {k: sum(r["status"] == k for r in rows) for k in ("completed", "stopped", "error")}}
    return summary, run_summaries


def best_trial(summary: dict) -> dict | None:
    return next((r for r in summary["trials"] if r["best"]), None)



# ------------------------------------------------------------------------------------ summary io


def _csv_rows(summary: dict) -> tuple[list[str], list[dict]]:
    cols = ["trial_id", "status", "stopped_early", *summary["params"], "ns_top1", "top1", "avg_bits_w", "avg_bits_a",
            "converged", "best_epoch", "epochs", "test_ns_top1", "test_top1", "time_s", "best", "run_name", "error"]
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
        lines.append([("*" if r["best"] else " ") + r["trial_id"], status, *params, _fmt(r["ns_top1"]),
                      _fmt(r["top1"]), bits, _fmt(r["converged"]), str(r["epochs"]), _fmt(r["time_s"], ".0f")])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
    c = summary["counts"]
    out.append(f"{len(lines)} trials: {c['completed']} completed, {c['stopped']} stopped early, {c['error']} failed; "
               f"metric {summary['metric']} ({summary['mode']}), * = best")
    return "\n".join(out)


def draw_summary(summary: dict) -> bytes | None:
    """PNG: the metric against each swept setting, and validation top-1 against average weight bits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trials = [r for r in summary["trials"] if r["score"] is not None]
    if not trials:
        return None
    params = summary["params"][:6]
    n = len(params) + 1
    fig = Figure(figsize=(3.4 * n, 3.2))
    FigureCanvasAgg(fig)
    style = {"completed": {"marker": "o", "color": "C0"}, "stopped": {"marker": "x", "color": "C1"},
             "error": {"marker": "s", "color": "C3"}}
    for i, key in enumerate(params):
        ax = fig.add_subplot(1, n, i + 1)
        values = [r["params"][key] for r in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            cats = sorted({str(v) for v in values})
            xs = [cats.index(str(v)) for v in values]
            ax.set_xticks(range(len(cats)), cats)
        for x, r in zip(xs, trials):
            ax.scatter([x], [r["score"]], s=90 if r["best"] else 30, **style[r["status"]])
        ax.set_xlabel(key)
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_ylabel(summary["metric"])
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, n, n)
    for r in trials:
        if r["avg_bits_w"] is None or r["top1"] is None:
            continue
        marker, color = style[r["status"]]["marker"], style[r["status"]]["color"]
        if marker == "x":  # an x has no face to leave hollow
            kw = {"c": color}
        else:
            kw = {"facecolors": color if r["converged"] else "none", "edgecolors": color}
        ax.scatter([r["avg_bits_w"]], [r["top1"]], s=90 if r["best"] else 30, marker=marker, **kw)
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("val top-1 % (hollow: not converged)")
    ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {summary['name']}: o completed, x stopped early")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def save_summary(summary: dict, experiment: str, parent) -> None:
    """sweep_summary.{json,csv,png} next to the experiment and as artifacts of the sweep's run."""
    cols, rows = _csv_rows(summary)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    files = {f"{SUMMARY_STEM}.json": json.dumps(summary, indent=1, default=str).encode(),
             f"{SUMMARY_STEM}.csv": text.getvalue().encode()}
    try:
        png = draw_summary(summary)
    except Exception as e:  # noqa: BLE001 - a plot must never fail the sweep
        log.warning("sweep plot failed: %s", e)
        png = None
    if png:
        files[f"{SUMMARY_STEM}.png"] = png
    summary["files"] = {}
    for name, data in files.items():
        write_bytes(f"{experiment}/{name}", data)
        summary["files"][name.rsplit(".", 1)[-1]] = f"{experiment}/{name}"
    if parent is None:
        return
    with tempfile.TemporaryDirectory(prefix="gdnsq-sweep-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
            parent.log_artifact(Path(d) / name)  # staged (copied) at once
    best = best_trial(summary)
    c = summary["counts"]
    parent.log_metrics({"sweep/trials": len(summary["trials"]), "sweep/completed": c["completed"],
                        "sweep/stopped_early": c["stopped"], "sweep/errors": c["error"],
                        **({f"sweep/best/{summary['metric']}": best["score"]} if best else {})})
    parent.set_tags({"gdnsq.best_trial": summary["best_trial"] or "none",
                     **({"gdnsq.registered_model": summary["registered_model"]}
                        if summary.get("registered_model") else {})})
