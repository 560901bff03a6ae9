"""The packed-model container: a JSON manifest and binary blobs, every byte covered by SHA-256.

Layout (all integers little-endian)::

    offset 0    8 bytes   magic b"GDNSQPK1"
    offset 8    u64       L, manifest length in bytes
    offset 16   u64       D, data length in bytes
    offset 24   32 bytes  SHA-256 of the manifest bytes
    offset 56   L bytes   manifest, UTF-8 JSON; manifest["blobs"] lists every blob as
                          {name, offset (from the data start), nbytes, sha256, ...}
    56 + L      D bytes   blobs, back to back, tiling the data region exactly

There is no padding, so a flipped byte anywhere lands in the magic, a length, the manifest hash,
the manifest or a blob, and each of these is checked before anything is decoded. Nothing is
unpickled: the manifest is JSON and blobs are raw little-endian numpy buffers or bit-streams.

Bit-packing (``encoding: "bitpack"``): element i of the flattened integer array occupies bits
[i*b, (i+1)*b) of one LSB-first bit-stream (``numpy.packbits(..., bitorder="little")``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import ExportError

MAGIC = b"GDNSQPK1"
_PREAMBLE = struct.Struct("<8sQQ32s")  # magic, manifest length, data length, manifest sha256
_CHUNK = 1 << 20  # elements per pack/unpack chunk (a multiple of 8, so chunks stay byte-aligned)


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------- bit-packing


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned integer codes (any shape, each < 2**bits) -> LSB-first bit-stream of ceil(n*bits/8) bytes."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bit-width must be in [1, 16], got {bits}")
    flat = np.ascontiguousarray(codes, dtype=np.uint16).reshape(-1)
    if bits == 8:
        return flat.astype(np.uint8).tobytes()
    if bits == 16:
        return flat.astype("<u2").tobytes()
    shifts = np.arange(bits, dtype=np.uint16)
    out = []
    for i in range(0, flat.size, _CHUNK):
        chunk = flat[i : i + _CHUNK]
        planes = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(np.packbits(planes.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes as a flat int64 array."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bit-width must be in [1, 16], got {bits}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != (count * bits + 7) // 8:
        raise ValueError(f"{buf.size} bytes cannot hold {count} codes of {bits} bits")
    if bits == 8:
        return buf.astype(np.int64)
    if bits == 16:
        return buf.view("<u2").astype(np.int64)
    weights = 1 << np.arange(bits, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    step = _CHUNK * bits // 8  # bytes per chunk
    for j, i in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - i)
        planes = np.unpackbits(buf[j * step : j * step + (n * bits + 7) // 8], bitorder="little", count=n * bits)
        out[i : i + n] = planes.reshape(n, bits).astype(np.int64) @ weights
    return out


# ------------------------------------------------------------------------------- JSON numbers


def f32_list(values) -> list[float]:
    """float32 values -> the shortest decimals that round back to the same float32 (exact, compact JSON)."""
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    # str(np.float32) is the shortest round-tripping decimal; the double parsed from it prints the same.
    return [float(str(v)) for v in arr]


def f32(value) -> float:
    return f32_list([value])[0]


# ---------------------------------------------------------------------------------- read/write


def write_container(path: str | os.PathLike, manifest: dict, blobs: list[tuple[str, bytes, dict]]) -> tuple[int, str]:
    """Write ``manifest`` plus ``blobs`` ((name, bytes, extra manifest fields), in order) atomically.

    The blob table (offsets, sizes, checksums) is added to the manifest as ``manifest["blobs"]``.
    Returns (file size in bytes, SHA-256 of the whole file).
    """
    path = Path(path)
    table, offset = [], 0
    for name, data, extra in blobs:
        table.append({"name": name, "offset": offset, "nbytes": len(data), "sha256": sha256(data), **extra})
        offset += len(data)
    try:
        header = json.dumps({**manifest, "blobs": table}, separators=(",", ":"), allow_nan=True).encode()
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: the manifest is not JSON-serialisable ({e})") from None
    tmp = path.with_name(path.name + ".tmp")
    whole = hashlib.sha256()
    with open(tmp, "wb") as f:
        for chunk in (
            _PREAMBLE.pack(MAGIC, len(header), offset, hashlib.sha256(header).digest()),
            header,
            *(data for _, data, _ in blobs),
        ):
            f.write(chunk)
            whole.update(chunk)
    os.replace(tmp, path)  # never leave a half-written file under the final name
    return _PREAMBLE.size + len(header) + offset, whole.hexdigest()


def read_container(path: str | os.PathLike) -> tuple[dict, dict[str, memoryview]]:
    """Read and verify a container: (manifest, {blob name: bytes}). Raises ExportError on any damage."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < _PREAMBLE.size:
        raise ExportError(f"{path}: truncated or not a gdnsq packed model ({len(raw)} bytes)")
    magic, n_header, n_data, header_sha = _PREAMBLE.unpack_from(raw)
    if magic != MAGIC:
        raise ExportError(f"{path}: not a gdnsq packed model (bad magic {magic!r})")
    expected = _PREAMBLE.size + n_header + n_data
    if len(raw) < expected:
        raise ExportError(f"{path}: truncated file ({len(raw)} of {expected} bytes)")
    if len(raw) > expected:
        raise ExportError(f"{path}: {len(raw) - expected} unexpected trailing bytes (expected {expected})")
    view = memoryview(raw)
    header = view[_PREAMBLE.size : _PREAMBLE.size + n_header]
    if hashlib.sha256(header).digest() != header_sha:
        raise ExportError(f"{path}: manifest checksum mismatch (file altered or corrupted)")
    try:
        manifest = json.loads(bytes(header))
    except ValueError:
        raise ExportError(f"{path}: manifest is not valid JSON") from None
    data = view[_PREAMBLE.size + n_header :]
    blobs, end = {}, 0
    for b in manifest.get("blobs", []):
        if b["offset"] != end or b["offset"] + b["nbytes"] > n_data:
            raise ExportError(f"{path}: blob table inconsistent at {b['name']!r}")
        chunk = data[b["offset"] : b["offset"] + b["nbytes"]]
        if sha256(chunk) != b["sha256"]:
            raise ExportError(f"{path}: checksum mismatch in blob {b['name']!r} (file altered or corrupted)")
        blobs[b["name"]] = chunk
        end = b["offset"] + b["nbytes"]
    if end != n_data:
        raise ExportError(f"{path}: {n_data - end} data bytes not covered by the blob table")
    return manifest, blobs
