"""The manifest of a registered student: its size and BOPs figures, the version tags and the model card.

Pure data (no MLflow): :mod:`gdnsq.tracking.registry` writes ``manifest.json`` next to the weights and
sets the tags and the description computed here from it. The key names are a stored format: registered
versions are read back by them (``list_models`` reads ``bytes_packed`` and ``gbops`` from the tags).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RegistryError
from ..training.bits import FP_BITS, layer_rows, totals
from .names import as_float, metric_key

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "gdnsq-model/1"
MAX_DESCRIPTION = 5000  # model version descriptions are VARCHAR(5000) in MLflow's SQL schema


# ----------------------------------------------------------------------------------- size figures

STATS_KEYS = (  # what register_model reads from its ``stats`` (an export report)
    "bytes_file",
    "bytes_fp32",
    "compression",
    "macs",
    "bops",
    "bops_fp32",
    "layers",
)


def estimate_stats(model: nn.Module, example_input: torch.Tensor, table: list[dict]) -> dict:
    """A size/BOPs report shaped like the exporter's, without exporting (``register_model`` without ``stats``).

    MACs and BOPs come from the shared counter (:func:`gdnsq.training.bits.layer_rows`). Packed bytes are
    estimated: quantized weights at their true bits + every other parameter in FP32, with no grids or
    file header, so the compression is larger than that of the real packed file.
    """
    bits = {
        r["name"]: (int(r["true_bits_w"]), FP_BITS if r.get("true_bits_a") is None else int(r["true_bits_a"]))
        for r in table
    }
    rows = layer_rows(model, bits, example_input, {})
    n_params = sum(p.numel() for p in model.parameters())
    q_params = sum(int(r["params"]) for r in table)
    packed = (n_params - q_params) * 4 + sum(math.ceil(int(r["params"]) * int(r["true_bits_w"]) / 8) for r in table)
    return {**totals(rows, n_params * 4, packed), "layers": rows}


def manifest_stats(stats: dict, table: list[dict], model: nn.Module) -> dict:
    """The manifest's size/BOPs keys from a size report (``stats`` of :func:`gdnsq.tracking.registry.register_model`).

    ``layers``: the bits table's rows with their ``macs`` / ``bops``; ``fp_layers``: the report's other
    Conv/Linear rows; ``bytes_packed`` is the report's ``bytes_file``; ``params``: all the model's parameters.
    A layer's ``params`` counts its weight only, as in the bits table (the export report's rows add the bias).
    """
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        raise RegistryError(f"stats: missing {', '.join(missing)} (pass the report of gdnsq.export.export_packed)")
    counted = {r["name"]: r for r in stats["layers"]}
    quantized = {r["name"] for r in table}
    layers = [
        {**r, "macs": counted.get(r["name"], {}).get("macs"), "bops": counted.get(r["name"], {}).get("bops")}
        for r in table
    ]
    modules = dict(model.named_modules())
    fp_layers = [
        {
            "name": r["name"],
            "kind": r["kind"],
            "params": int(modules[r["name"]].weight.numel()),
            "macs": r["macs"],
            "bops": r["bops"],
        }
        for r in stats["layers"]
        if r["name"] not in quantized
    ]
    return {
        "layers": layers,
        "fp_layers": fp_layers,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": stats["macs"],
        "bops": stats["bops"],
        "bops_fp32": stats["bops_fp32"],
        "bytes_fp32": stats["bytes_fp32"],
        "bytes_packed": stats["bytes_file"],
        "compression": stats["compression"],
        "bytes_payload": stats.get("bytes_payload"),
        "avg_bits_w_params": _param_weighted_bits(layers),
    }


def _param_weighted_bits(layers: list[dict]) -> float | None:
    """Σ params·true weight bits / Σ params over quantized layers (the avg_bits_w budget's figure)."""
    n = sum(int(r["params"]) for r in layers)
    return round(sum(int(r["params"]) * int(r["true_bits_w"]) for r in layers) / n, 4) if n else None


# ---------------------------------------------------------------------------------- tags and card


def _fmt_pct(v) -> str:
    f = as_float(v)
    return "-" if f is None else (f"{100 * f:.2f} %" if f <= 1.0 else f"{f:.2f}")


def _giga(v) -> str:
    """``v / 1e9`` to 4 significant digits; "-" when unknown (a layer the example input did not reach)."""
    return "-" if v is None else f"{v / 1e9:.4g}"


def model_card(name: str, manifest: dict) -> str:
    """Markdown description of a version: headline numbers and the per-layer bit table."""
    m = manifest
    lines = [
        f"# {name}: {m['model']} quantized with GDNSQ (target W{m['target_w']:g}A{m['target_a']:g})",
        "",
        "| | |",
        "|---|---|",
        f"| top-1 | {_fmt_pct(m.get('top1'))} (FP {_fmt_pct(m.get('fp_top1'))}) |",
        f"| ns_top1 (champion metric) | {_fmt_pct(m.get('ns_top1'))} |",
        f"| mean bits W / A | {m.get('avg_bits_w')} / {m.get('avg_bits_a')} |",
        f"| size FP32 / packed | {m['bytes_fp32']:,} B / {m['bytes_packed']:,} B (x{m['compression']}) |",
        f"| BOPs | {_giga(m.get('bops'))} G (FP32: {_giga(m.get('bops_fp32'))} G) |",
        f"| converged | {m.get('converged')} |",
        "",
        'Load: `gdnsq.tracking.registry.load_model("NAME@champion")` (the gdnsq student) or '
        '`mlflow.pytorch.load_model("models:/NAME@champion")` (exported graph).'.replace("NAME", name),
        "",
        "| layer | kind | W bits | A bits | params | MACs |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(m["layers"]):
        row = (
            f"| {r['name']} | {r['kind']} | {r['true_bits_w']} | {r.get('true_bits_a') or 'FP'} | "
            f"{r['params']:,} | {r['macs'] if r.get('macs') is not None else '-'} |"
        )
        if sum(map(len, lines)) + len(row) + 80 > MAX_DESCRIPTION:
            lines.append(f"| ... {len(m['layers']) - i} more layers: see {MANIFEST_FILE} | | | | | |")
            break
        lines.append(row)
    return "\n".join(lines)[:MAX_DESCRIPTION]


def version_tags(manifest: dict) -> dict[str, str]:
    m = manifest
    tags = {
        k: str(m[k])
        for k in (
            "ns_top1",
            "top1",
            "top5",
            "fp_top1",
            "avg_bits_w",
            "avg_bits_a",
            "converged",
            "bytes_fp32",
            "bytes_packed",
            "compression",
            "bops",
            "macs",
            "model",
            "bytes_payload",
            "avg_bits_w_params",
            "budget_kind",
            "budget_value",
        )
        if m.get(k) is not None
    }
    tags.update(
        {"target_w": f"{m['target_w']:g}", "target_a": f"{m['target_a']:g}", "gdnsq_version": m["gdnsq_version"]}
    )
    if m.get("bops") is not None:
        tags["gbops"] = f"{m['bops'] / 1e9:.6g}"
    for r in m["layers"]:
        ta = r.get("true_bits_a")
        tags[metric_key(f"bits.{r['name']}")] = f"w{r['true_bits_w']}a{ta if ta is not None else 'FP'}"
    return tags
