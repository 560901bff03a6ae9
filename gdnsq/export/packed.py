"""Packed export: integer weight codes at their learned bit-width, everything else FP, one checked file.

What the manifest holds (``format: gdnsq-packed/1``):

* ``recipe`` — how to rebuild the structure (see :mod:`gdnsq.export.recipe`);
* ``layers`` — per quantized layer: the storage width ``bits_w`` (max over channels), the blob of its
  codes, its weight grid per channel (float32 blob of rows ``lo``, ``hi``, ``z``, ``s``; ``z`` is
  stored once when it equals ``lo``, as for GDNSQ) and true bits per channel (uint8 blob), and the
  input-activation grid (``lo``, ``hi``, ``z``, ``s``, ``bits``, code range) as exact float32 numbers;
  :func:`read_manifest` with ``inline=True`` expands the per-channel blobs into lists;
* ``blobs`` — role ``codes`` (bit-packed, ``encoding: bitpack``), ``grid`` (above) or ``state``: every
  other tensor of the state dict, quantizer state in float32 (grids must stay exact), all other
  floating tensors (FP layers, BN, biases) in ``fp_dtype``, integer and bool buffers as they are.

Loading dequantizes ``x̂ = q·s + z`` with the same float32 operations as the fake-quant eval forward,
so a model exported with ``fp_dtype="float32"`` gives the original's eval logits bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..quant.layers import iter_quantized
from ..training.bits import packed_bytes
from . import report as rep
from .container import f32, pack_bits, read_container, unpack_bits, write_container
from .grids import WeightGrid, act_grid, weight_grid
from .recipe import build_from_recipe, check_recipe, infer_recipe, plan_of

FORMAT = "gdnsq-packed/1"
FP_DTYPES = {"float16": np.float16, "float32": np.float32}


def _json_ready(meta: dict | None, path) -> dict:
    try:
        return json.loads(json.dumps(meta or {}))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: meta must be JSON-serialisable ({e})") from None


def _quantizer_state_keys(model: nn.Module) -> set[str]:
    """State keys that belong to quantizers or to the per-layer targets: kept float32."""
    keys = set()
    for name, layer in iter_quantized(model):
        for k in layer.state_dict().keys():
            if k.startswith(("weight_quant.", "act_quant.")) or k in ("target_w", "target_a"):
                keys.add(f"{name}.{k}")
    return keys


def _raw_blob(key: str, t: torch.Tensor, fp_dtype) -> tuple[str, bytes, dict]:
    t = t.detach().cpu()
    if t.is_floating_point():
        arr = t.to(torch.float32).numpy().astype(fp_dtype)
    else:
        arr = t.numpy()
    arr = np.ascontiguousarray(arr)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    return (
        key,
        arr.astype(dtype).tobytes(),
        {"role": "state", "encoding": "raw", "dtype": dtype.str, "shape": list(arr.shape)},
    )


def _layer_entry(name: str, layer: nn.Module, wg: WeightGrid | None, ag) -> tuple[dict, list]:
    """The manifest entry of a quantized layer and its grid blobs (per-channel arrays stay binary)."""
    entry = {
        "name": name,
        "kind": "linear" if layer.weight.dim() == 2 else "conv",
        "weight_shape": list(layer.weight.shape),
        "weight": None,
        "act": None,
    }
    blobs = []
    if wg is not None:
        rows = {"lo": wg.lo, "hi": wg.hi, "z": wg.z, "s": wg.s}
        z_is_lo = torch.equal(wg.z, wg.lo)  # GDNSQ weights: z = min(w) = lo; stored once
        if z_is_lo:
            del rows["z"]
        grid = torch.stack([t.reshape(-1) for t in rows.values()]).cpu().numpy().astype("<f4")
        channel_bits = np.asarray(wg.channel_bits, dtype=np.uint8)
        entry["weight"] = {
            "codes": f"{name}.weight",
            "bits_w": wg.bits,
            "code_offset": wg.code_offset,
            "per_channel": wg.per_channel,
            "channels": int(wg.s.numel()),
            "grid": f"{name}.weight.grid",
            "grid_rows": list(rows),
            "z_is_lo": z_is_lo,
            "bits": f"{name}.weight.bits",
            "bits_min": int(channel_bits.min()),
            "bits_max": int(channel_bits.max()),
        }
        raw = {"role": "grid", "encoding": "raw"}
        blobs += [
            (f"{name}.weight.grid", grid.tobytes(), {**raw, "dtype": "<f4", "shape": list(grid.shape)}),
            (f"{name}.weight.bits", channel_bits.tobytes(), {**raw, "dtype": "|u1", "shape": list(channel_bits.shape)}),
        ]
    if ag is not None:
        entry["act"] = {
            "lo": f32(ag.lo),
            "hi": f32(ag.hi),
            "z": f32(ag.z),
            "s": f32(ag.s),
            "bits": ag.bits,
            "qmin": ag.qmin,
            "qmax": ag.qmax,
            "signed": ag.signed,
        }
    return entry, blobs


def _weight_grid_arrays(w: dict, decoded: dict) -> dict[str, torch.Tensor]:
    """{lo, hi, z, s} float32 tensors of shape (C,) from a manifest weight entry and its decoded blobs."""
    grid = decoded[w["grid"]].to(torch.float32)
    out = dict(zip(w["grid_rows"], grid))
    if w["z_is_lo"]:
        out["z"] = out["lo"]
    return out


@torch.no_grad()
def export_packed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    fp_dtype: str = "float32",
    example_input: torch.Tensor | None = None,
    meta: dict | None = None,
    recipe: dict | None = None,
) -> dict:
    """Write ``model`` (a quantized student) to one packed file; return the size / BOPs report.

    ``fp_dtype``: storage of FP tensors (FP layers, BN, biases); quantizer grids are always float32.
    ``example_input``: one batch, for MACs/BOPs and the recorded input shape (optional).
    ``meta``: JSON-serialisable user metadata, stored as ``manifest["meta"]``.
    ``recipe``: how to rebuild the structure; default :func:`infer_recipe` (timm name + kwargs + plan).
    The recipe is checked by rebuilding the structure before anything is written.
    """
    path = Path(path)
    if fp_dtype not in FP_DTYPES:
        raise ExportError(f"{path}: fp_dtype must be one of {', '.join(FP_DTYPES)}, got {fp_dtype!r}")
    layers = list(iter_quantized(model))
    if not layers:
        raise ExportError(f"{path}: the model has no quantized layer (run gdnsq.training.surgery.quantize_model first)")
    if recipe is None:
        recipe = infer_recipe(model)
    else:
        recipe = {**recipe, "plan": recipe.get("plan") or plan_of(model)}
        check_recipe(model, recipe)
    meta = _json_ready(meta, path)

    state = model.state_dict()
    keep_f32 = _quantizer_state_keys(model)
    blobs, entries, bits, layer_blobs = [], [], {}, {}
    packed_keys = set()
    for name, layer in layers:
        wg, ag = weight_grid(name, layer), act_grid(name, layer)
        entry, grid_blobs = _layer_entry(name, layer, wg, ag)
        entries.append(entry)
        bits[name] = (wg.bits if wg else rep.FP_BITS, ag.bits if ag else rep.FP_BITS)
        if wg is not None:
            key = f"{name}.weight"
            packed_keys.add(key)
            data = pack_bits(wg.codes.cpu().numpy(), wg.bits)
            blobs.append(
                (
                    key,
                    data,
                    {
                        "role": "codes",
                        "encoding": "bitpack",
                        "bits": wg.bits,
                        "count": wg.codes.numel(),
                        "shape": list(wg.codes.shape),
                    },
                )
            )
            blobs += grid_blobs
            layer_blobs[name] = len(data) + sum(len(b[1]) for b in grid_blobs)
    for key, t in state.items():
        if key in packed_keys:
            continue
        blobs.append(_raw_blob(key, t, np.float32 if key in keep_f32 else FP_DTYPES[fp_dtype]))

    manifest = {
        "format": FORMAT,
        "fp_dtype": fp_dtype,
        "recipe": recipe,
        "layers": entries,
        "meta": meta,
        "input_shape": None if example_input is None else list(example_input.shape[1:]),
    }
    size, digest = write_container(path, manifest, blobs)

    # Report: per layer, the bytes its weight/bias/grid take in the file; FP32 = the FP model's tensors.
    blob_bytes = {b[0]: len(b[1]) for b in blobs}
    export_bytes = {}
    for name, _ in rep.compute_layers(model):
        export_bytes[name] = (layer_blobs.get(name) or blob_bytes.get(f"{name}.weight", 0)) + blob_bytes.get(
            f"{name}.bias", 0
        )
    rows = rep.layer_rows(model, bits, example_input, export_bytes)
    fp32 = sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for k, t in state.items() if k not in keep_f32
    )
    payload = packed_bytes(
        model, {n: b[0] for n, b in bits.items() if n in layer_blobs}, fp_bytes=np.dtype(FP_DTYPES[fp_dtype]).itemsize
    )
    if payload != sum(blob_bytes.values()):  # the budget and the registry card use packed_bytes: keep them true
        raise ExportError(
            f"{path}: blobs hold {sum(blob_bytes.values())} bytes but training.bits.packed_bytes says {payload}"
        )
    return {
        "bytes_payload": payload,
        "path": str(path),
        "format": FORMAT,
        "fp_dtype": fp_dtype,
        "sha256": digest,
        **rep.totals(rows, fp32, size),
        "bytes_codes": sum(blob_bytes[k] for k in packed_keys),
        "layers": rows,
    }


def read_manifest(path: str | os.PathLike, *, inline: bool = False) -> dict:
    """The verified manifest of a packed file (every checksum checked).

    ``inline=True`` replaces each layer's grid and per-channel bits blob names by their values:
    ``weight["lo"|"hi"|"z"|"s"]`` as lists of float32 values and ``weight["bits"]`` as a list of ints.
    """
    manifest, data = read_container(path)
    if inline:
        by_name = {b["name"]: b for b in manifest["blobs"]}
        for entry in manifest["layers"]:
            w = entry["weight"]
            if w is None:
                continue
            decoded = {k: _decode(path, by_name[k], data[k]) for k in (w["grid"], w["bits"])}
            w.update({k: v.tolist() for k, v in _weight_grid_arrays(w, decoded).items()})
            w["bits"] = decoded[w["bits"]].tolist()
    return manifest


def _build_with_state(recipe: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The recipe's structure holding ``state``. Built on the meta device and filled by assignment
    (no random init, no second copy) when every tensor is in the state dict and none is tied;
    otherwise built on CPU and loaded by copy."""
    try:
        with torch.device("meta"):
            model = build_from_recipe(recipe)
    except ExportError:
        raise
    except Exception:  # noqa: BLE001 - constructors that need real tensors take the CPU path
        model = None
    if model is not None:
        own = dict(model.state_dict(keep_vars=True))
        tied = len({id(t) for t in own.values()}) < len(own)
        if tied or any(t.is_meta for n, t in model.named_buffers() if n not in own):
            model = None  # tied parameters or non-persistent buffers: they need a real constructor
        else:
            state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    assign = model is not None
    if model is None:
        model = build_from_recipe(recipe)
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ExportError(f"tensors do not fit the rebuilt model ({first})") from None
    return model


def _decode(path, b: dict, data) -> torch.Tensor:
    if b["encoding"] == "bitpack":
        codes = unpack_bits(data, b["bits"], b["count"])
        return torch.from_numpy(codes.reshape(b["shape"]))
    if b["encoding"] == "raw":
        arr = np.frombuffer(data, dtype=np.dtype(b["dtype"])).reshape(b["shape"]).copy()
        return torch.from_numpy(arr)
    raise ExportError(f"{path}: blob {b['name']!r} has unknown encoding {b['encoding']!r}")


@torch.no_grad()
def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the runnable quantized model from a packed file, in eval mode on ``device``.

    The structure comes from the manifest's recipe (timm + gdnsq surgery), the tensors from the
    checked blobs; no pickle is read. Raises ExportError for a damaged or foreign file.
    """
    manifest, data = read_container(path)
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    decoded = {b["name"]: _decode(path, b, data[b["name"]]) for b in manifest["blobs"]}
    state = {b["name"]: decoded[b["name"]] for b in manifest["blobs"] if b.get("role") in ("state", "codes")}
    for entry in manifest["layers"]:
        w = entry["weight"]
        if w is None:
            continue
        codes = decoded[w["codes"]]
        grid = _weight_grid_arrays(w, decoded)
        shape = (-1,) + (1,) * (codes.dim() - 1) if w["per_channel"] else (1,) * codes.dim()
        # Same float32 ops as the fake-quant eval forward: round(...) * s + z.
        state[w["codes"]] = (codes + w["code_offset"]).to(torch.float32) * grid["s"].reshape(shape) + grid["z"].reshape(
            shape
        )
    try:
        model = _build_with_state(manifest["recipe"], state)
    except ExportError as e:
        raise ExportError(f"{path}: {e}") from None
    return model.eval().to(device)
