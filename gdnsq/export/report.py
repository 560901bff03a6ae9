"""Size and BOPs per layer and in total, as a fixed-width table.

The rows and totals come from the one MAC/BOP counter in :mod:`gdnsq.training.bits` (re-exported
here: ``export.packed`` builds its report with them, and ``gdnsq.export.measure_macs`` stays public).
"""

from __future__ import annotations

from ..training.bits import FP_BITS, compute_layers, layer_rows, measure_macs, totals

__all__ = ["FP_BITS", "compute_layers", "format_report", "layer_rows", "measure_macs", "totals"]


def format_report(report: dict) -> str:
    """A fixed-width table of the per-layer rows and the totals."""
    lines = [
        f"{'layer':<30} {'W':>3} {'A':>3} {'params':>10} {'MACs':>12} {'GBOPs':>9} {'FP32 B':>11} {'export B':>10}"
    ]
    for r in report["layers"]:
        macs = "-" if r["macs"] is None else f"{r['macs']:,}"
        gbops = "-" if r["bops"] is None else f"{r['bops'] / 1e9:.4g}"
        exp = "-" if r["bytes_export"] is None else f"{r['bytes_export']:,}"
        lines.append(
            f"{r['name']:<30} {r['bits_w']:>3} {r['bits_a']:>3} {r['params']:>10,} {macs:>12} {gbops:>9} "
            f"{r['bytes_fp32']:>11,} {exp:>10}"
        )
    t = report
    lines.append(f"total: FP32 {t['bytes_fp32']:,} B -> file {t['bytes_file']:,} B (x{t['compression']})")
    if t.get("bytes_payload") is not None:  # why one model shows several sizes (README, "Tracking, registry")
        lines.append(
            f"       = payload {t['bytes_payload']:,} B (codes, grids, FP tensors: the same from any source) "
            f"+ header and manifest {t['bytes_file'] - t['bytes_payload']:,} B (this file's source and recipe)"
        )
    if t.get("bops") is not None:
        lines.append(
            f"       BOPs {t['bops'] / 1e9:.4g} G (FP32 {t['bops_fp32'] / 1e9:.4g} G, "
            f"x{t['bops_reduction']} fewer), MACs {t['macs']:,}"
        )
    return "\n".join(lines)
