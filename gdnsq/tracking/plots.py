"""The PNGs a run ends with: per-layer bit-widths over the epochs, and accuracy against the mean bits; a sweep's
summary and Pareto front.

matplotlib's object API with the Agg canvas: no pyplot, no global backend switch, thread-safe.
"""

from __future__ import annotations

import io
from pathlib import Path

ACCURACY_KEYS = ("val/top1", "top1", "val/ns_top1", "test/top1")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def draw_bits_evolution(history: list[dict], path: Path) -> bool:
    """Two panels (weights, activations): one line per layer of continuous bits vs epoch, targets dashed."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    names = list(dict.fromkeys(r["name"] for h in history for r in h["layers"]))
    if not names:
        return False
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, side in zip(axes, ("w", "a")):
        for name in names:
            ys = [next((r.get(f"bits_{side}") for r in h["layers"] if r["name"] == name), None) for h in history]
            pts = [(e, y) for e, y in zip(epochs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", lw=1.2, label=name)
        targets = {r.get(f"target_{side}") for h in history for r in h["layers"]} - {None}
        for t in sorted(targets):
            ax.axhline(t, ls="--", color="k", lw=0.8)
        ax.set_title("weights" if side == "w" else "activations")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits (continuous)")
    if len(names) <= 24:
        axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    return True


def draw_accuracy_vs_bits(history: list[dict], path: Path, fp_top1: float | None = None) -> bool:
    """Validation accuracy against the mean weight / activation bits, one point per epoch."""
    key = next((k for k in ACCURACY_KEYS if any(k in h["metrics"] for h in history)), None)
    key = key or next((k for h in history for k in h["metrics"] if k.endswith("top1")), None)
    if key is None:
        return False
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    for side, marker in (("w", "o"), ("a", "s")):
        pts = []
        for h in history:
            bits = [r[f"bits_{side}"] for r in h["layers"] if r.get(f"bits_{side}") is not None]
            if bits and key in h["metrics"]:
                pts.append((sum(bits) / len(bits), h["metrics"][key], h["epoch"]))
        if pts:
            xs, ys, es = zip(*pts)
            ax.plot(xs, ys, marker=marker, lw=1, label=f"mean {'weight' if side == 'w' else 'activation'} bits")
            for x, y, e in pts:
                ax.annotate(str(e), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if fp_top1 is not None:
        ax.axhline(fp_top1, ls="--", color="k", lw=0.8, label="FP top-1")
    ax.set_xlabel("mean bits (labels: epoch)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def draw_layer_bits(history: list[dict], path: Path) -> bool:
    """The last epoch's true bits per layer against depth (layer index) and against layer size (weight
    elements, log scale): where a budget's layers kept precision. Weights solid, activations hollow."""
    layers = history[-1]["layers"] if history else []
    rows = [r for r in layers if r.get("true_bits_w") is not None]
    if not rows:
        return False
    fig = _figure(11, 4.2)
    ax_d, ax_s = fig.subplots(1, 2, sharey=True)
    depth = list(range(len(rows)))
    sizes = [r.get("params") or 1 for r in rows]
    bw = [r["true_bits_w"] for r in rows]
    ba = [r.get("true_bits_a") for r in rows]
    for ax, xs in ((ax_d, depth), (ax_s, sizes)):
        ax.plot(xs, bw, "o", color="C0", label="weights")
        pts = [(x, a) for x, a in zip(xs, ba) if a is not None]
        if pts:
            ax.plot(*zip(*pts), "s", mfc="none", color="C1", label="activations")
        ax.grid(alpha=0.3)
    ax_d.plot(depth, bw, "-", color="C0", lw=0.8)
    ax_d.set_xticks(depth, [r["name"] for r in rows], rotation=70, fontsize=6)
    ax_d.set_xlabel("layer (depth)")
    ax_s.set_xscale("log")
    ax_s.set_xlabel("weight elements")
    ax_d.set_ylabel("true bits")
    ax_d.legend(fontsize=8)
    fig.suptitle(f"bits per layer, epoch {history[-1].get('epoch')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return True


FRONT_PANELS = (("bytes_payload", "front_bytes", "packed payload bytes"), ("bops", "front_bops", "BOPs per sample"))


def draw_pareto_front(points: list[dict], path: Path, title: str = "") -> bool:
    """A sweep's fronts: test top-1 against packed bytes and against BOPs, one point per trial with the figure.

    ``points``: ``{label, top1, converged, bytes_payload, bops, front_bytes, front_bops}`` (a missing figure
    leaves the point out of that panel). Front points red and joined by the front's staircase, other converged
    trials filled, trials that did not converge hollow (never on a front); labels name the trials.
    """
    panels = [p for p in FRONT_PANELS if any(r.get(p[0]) is not None and r.get("top1") is not None for r in points)]
    if not panels:
        return False
    fig = _figure(5.2 * len(panels), 4.3)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (cost, flag, xlabel) in zip(axes, panels):
        pts = [r for r in points if r.get(cost) is not None and r.get("top1") is not None]
        front = sorted((r for r in pts if r.get(flag)), key=lambda r: r[cost])
        if front:  # the region the front dominates ends at each point: a step up to the right
            ax.step([r[cost] for r in front], [r["top1"] for r in front], where="post", color="C3", lw=1, alpha=0.6)
        for r in pts:
            on = bool(r.get(flag))
            color = "C3" if on else "C0"
            ax.scatter(
                [r[cost]],
                [r["top1"]],
                s=60 if on else 28,
                marker="o",
                edgecolors=color,
                facecolors=color if r.get("converged") else "none",
                zorder=3,
            )
            ax.annotate(
                str(r.get("label", "")), (r[cost], r["top1"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        xs = [r[cost] for r in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 % (red: front, hollow: not converged)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return True


def draw_run_plots(history: list[dict], folder: Path, fp_top1: float | None = None) -> list[str]:
    """Every plot of a run's ``history`` (``[{epoch, metrics, layers}]``) into ``folder``; the file names drawn."""
    drawn = []
    for name, draw in (
        ("bits_evolution.png", draw_bits_evolution),
        ("accuracy_vs_bits.png", lambda h, p: draw_accuracy_vs_bits(h, p, fp_top1=fp_top1)),
        ("bits_per_layer.png", draw_layer_bits),
    ):
        if draw(history, folder / name):
            drawn.append(name)
    return drawn


def draw_sweep_summary(summary: dict) -> bytes | None:
    """PNG of a sweep (gdnsq.launch.sweep.report's summary): the metric against each swept setting, and
    validation top-1 against average weight bits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trials = [r for r in summary["trials"] if r["score"] is not None]
    if not trials:
        return None
    params = summary["params"][:6]
    n = len(params) + 1
    fig = Figure(figsize=(3.4 * n, 3.2))
    FigureCanvasAgg(fig)
    style = {
        "completed": {"marker": "o", "color": "C0"},
        "stopped": {"marker": "x", "color": "C1"},
        "error": {"marker": "s", "color": "C3"},
    }
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
