"""Export: packed integer file (exact reload, size, integrity), ONNX with QDQ nodes (onnxruntime parity), CLI.

Models are W2A2 with real 2-bit grids: calibrated on random batches with ``init_bits=2``.
"""

import json
import os

import numpy as np
import pytest
import timm
import torch

from gdnsq.config import JobConfig, ModelConfig, QuantConfig, to_dict
from gdnsq.errors import ExportError
from gdnsq.export import (
    code_flips,
    export_onnx,
    export_packed,
    load_packed,
    read_manifest,
    run_onnx,
)
from gdnsq.export.container import pack_bits, unpack_bits
from gdnsq.export.grids import container_dtype
from gdnsq.quant.layers import iter_quantized
from gdnsq.training.surgery import build_student, calibrate_model, quantize_model

PACKED_TOL = 1e-5
ONNX_TOL = 1e-4


def _w2a2(name: str, shape: tuple, seed: int, **kw):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kw)
    quantize_model(model, QuantConfig(target_w=2, target_a=2))
    calibrate_model(model, [torch.randn(4, *shape) for _ in range(2)], init_bits=2)
    model.eval()
    x = torch.randn(8, *shape)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


@pytest.fixture(scope="module")
def resnet():
    return _w2a2("resnet18", (3, 64, 64), seed=0)


@pytest.fixture(scope="module")
def vit():
    return _w2a2("vit_tiny_patch16_224", (3, 32, 32), seed=0, img_size=32, patch_size=8)


@pytest.fixture(scope="module")
def packed_files(tmp_path_factory, resnet, vit):
    """{(model, fp_dtype): (path, report)} for both models in float32 and float16."""
    out, d = {}, tmp_path_factory.mktemp("packed")
    for key, (model, x, _) in (("resnet", resnet), ("vit", vit)):
        for fp in ("float32", "float16"):
            path = d / f"{key}.{fp}.gdnsq"
            out[key, fp] = path, export_packed(model, path, fp_dtype=fp, example_input=x, meta={"test": key})
    return out


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", range(1, 17))
def test_bitpack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 13, 1000):
        codes = rng.integers(0, 2**bits, size=n)
        data = pack_bits(codes, bits)
        assert len(data) == (n * bits + 7) // 8
        assert np.array_equal(unpack_bits(data, bits, n), codes)


def test_container_dtype():
    assert container_dtype(0, 3) == "uint8" and container_dtype(-2, 1) == "int8"
    assert container_dtype(0, 1023) == "uint16" and container_dtype(-600, 600) == "int16"


# ------------------------------------------------------------------------------- packed parity


@pytest.mark.parametrize("key", ["resnet", "vit"])
def test_packed_reload_is_exact(key, packed_files, resnet, vit):
    model, x, ref = {"resnet": resnet, "vit": vit}[key]
    path, _ = packed_files[key, "float32"]
    rebuilt = load_packed(path)
    with torch.no_grad():
        out = rebuilt(x)
    diff = float((out - ref).abs().max())
    print(f"{key}: packed fp32 reload max |diff| = {diff:.3g}")
    assert diff <= PACKED_TOL
    # Same quantized layers, same true bit-widths, and an evaluable student (not a frozen graph).
    assert [(n, l.true_weight_bits(), l.true_act_bits()) for n, l in iter_quantized(rebuilt)] == [
        (n, l.true_weight_bits(), l.true_act_bits()) for n, l in iter_quantized(model)
    ]
    assert not any(p.grad is not None for p in rebuilt.parameters())


@pytest.mark.parametrize("key", ["resnet", "vit"])
def test_fp16_storage_deviation_is_reported(key, packed_files, resnet, vit):
    """FP16 for FP tensors is smaller but not exact: report the deviation (not part of the parity claim)."""
    _, x, ref = {"resnet": resnet, "vit": vit}[key]
    p16, r16 = packed_files[key, "float16"]
    _, r32 = packed_files[key, "float32"]
    with torch.no_grad():
        out = load_packed(p16)(x)
    diff = float((out - ref).abs().max())
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    print(
        f"{key}: fp16 storage {r16['bytes_file']:,} B vs fp32 {r32['bytes_file']:,} B; "
        f"max |diff| {diff:.3g}, top-1 agreement {agree:.2f}"
    )
    assert r16["bytes_file"] < r32["bytes_file"] and np.isfinite(diff)


def test_manifest_describes_every_layer(packed_files, resnet):
    model, x, _ = resnet
    path, report = packed_files["resnet", "float32"]
    m = read_manifest(path, inline=True)
    assert m["format"] == "gdnsq-packed/1" and m["meta"] == {"test": "resnet"}
    assert m["recipe"]["builder"] == "timm" and m["recipe"]["name"] == "resnet18"
    assert m["input_shape"] == list(x.shape[1:])
    layers = dict(iter_quantized(model))
    assert [e["name"] for e in m["layers"]] == list(layers)
    for e in m["layers"]:
        w, a, c = (
            e["weight"],
            e["act"],
            layers[e["name"]].out_features if e["kind"] == "linear" else layers[e["name"]].out_channels,
        )
        assert w["bits_w"] <= 2 and len(w["bits"]) == c and max(w["bits"]) == w["bits_w"]
        assert all(len(w[k]) == c for k in ("lo", "hi", "z", "s")) and w["z"] == w["lo"]
        assert a["bits"] <= 2 and a["qmin"] == 0 and a["qmax"] <= 3 and a["s"] > 0
    blobs = {b["name"]: b for b in m["blobs"]}
    assert blobs["layer1.0.conv1.weight"]["encoding"] == "bitpack" and blobs["layer1.0.conv1.weight"]["bits"] == 2
    assert all(len(b["sha256"]) == 64 for b in m["blobs"])


def test_resnet_w2a2_is_under_a_tenth_of_fp32(packed_files):
    for fp in ("float32", "float16"):
        path, r = packed_files["resnet", fp]
        print(
            f"resnet18 W2A2 ({fp} FP tensors): FP32 {r['bytes_fp32']:,} B -> {r['bytes_file']:,} B "
            f"(x{r['compression']}), BOPs {r['bops'] / 1e9:.3g} G vs {r['bops_fp32'] / 1e9:.3g} G"
        )
        assert r["bytes_file"] == os.path.getsize(path)
        assert r["bytes_file"] * 10 <= r["bytes_fp32"]
    rows = {row["name"]: row for row in r["layers"]}
    # FP-kept edge layers are in the file and the report at 32 bits.
    assert rows["conv1"]["bits_w"] == 32 and not rows["conv1"]["quantized"] and rows["fc"]["bits_a"] == 32
    q = rows["layer1.0.conv1"]
    assert q["quantized"] and q["bits_w"] == 2 and q["bits_a"] == 2
    assert q["macs"] == 64 * 16 * 16 * 64 * 9 and q["bops"] == q["macs"] * 4
    assert r["bops"] == sum(row["bops"] for row in r["layers"])


# --------------------------------------------------------------------------------- integrity


def _refused(path, what: str) -> str:
    with pytest.raises(ExportError) as e:
        load_packed(path)
    msg = str(e.value)
    assert str(path) in msg and what in msg and "\n" not in msg, msg
    return msg


def test_truncated_and_altered_files_are_refused(packed_files, tmp_path):
    src, _ = packed_files["resnet", "float32"]
    data = src.read_bytes()
    cut = tmp_path / "cut.gdnsq"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, "truncated")
    manifest_end = 56 + int.from_bytes(data[8:16], "little")
    for where, what in (
        (0, "not a gdnsq packed model"),
        (40, "manifest checksum"),
        (100, "manifest checksum"),
        (manifest_end + 10, "checksum mismatch in blob"),
        (len(data) // 2, "checksum mismatch in blob"),
        (len(data) - 1, "checksum mismatch in blob"),
    ):
        bad = tmp_path / f"flip{where}.gdnsq"
        b = bytearray(data)
        b[where] ^= 0x01
        bad.write_bytes(bytes(b))
        _refused(bad, what)
    _refused(tmp_path / "missing.gdnsq", "no such file")
    with pytest.raises(ExportError):
        read_manifest(cut)


# ---------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("key", ["resnet", "vit"])
def test_onnx_matches_fake_quant_eval(key, resnet, vit, tmp_path):
    import onnx

    model, x, ref = {"resnet": resnet, "vit": vit}[key]
    path = tmp_path / f"{key}.onnx"
    # Static batch here (the export is 2x faster); the CLI test checks the dynamic batch dimension.
    report = export_onnx(model, path, x, dynamic_batch=False, verify=False)
    out = torch.from_numpy(run_onnx(path, x))
    diff = float((out - ref).abs().max())
    print(f"{key}: onnxruntime max |diff| = {diff:.3g}, {report['bytes_file']:,} B")
    detail = ""
    if diff > ONNX_TOL:  # tell a float-noise flip at a rounding boundary from a real mismatch
        detail = str([r for r in code_flips(model, path, x) if r["flips"]][:3])
    assert diff <= ONNX_TOL, detail
    assert torch.equal(out.argmax(1), ref.argmax(1)), detail
    assert report["bops"] == sum(r["bops"] for r in report["layers"]) < report["bops_fp32"]

    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    n_layers = len(list(iter_quantized(model)))
    # One QDQ pair per quantized input (identical grids on a shared input, as a ResNet's shortcut conv
    # and its block's first conv get from the same calibration, are merged by the ONNX optimizer)
    # and one DequantizeLinear per weight.
    assert 0 < ops.count("QuantizeLinear") <= n_layers
    assert ops.count("DequantizeLinear") == n_layers + ops.count("QuantizeLinear")
    inits = {i.name: i for i in proto.graph.initializer}
    props = {p.key: p.value for p in proto.metadata_props}
    for name, _ in iter_quantized(model):
        meta = json.loads(props[f"gdnsq.layer.{name}"])
        assert meta["weight"]["bits"] <= 2 and meta["act"]["bits"] <= 2
        assert meta["weight"]["container"] == meta["act"]["container"] == "uint8"
        assert inits[f"{name}.codes"].data_type == onnx.TensorProto.UINT8


# ------------------------------------------------------------------------------------------ CLI


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    from gdnsq.cli import main

    cfg = JobConfig(model=ModelConfig(name="gdnsq_smallcnn"), quant=QuantConfig(target_w=2, target_a=2))
    model = build_student(cfg, 10, 1)
    calibrate_model(model, [torch.randn(8, 1, 28, 28) for _ in range(2)], init_bits=2)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(
        {"config": to_dict(cfg), "engine": {"model": model.state_dict()}, "best": {"ns_top1": -1.0, "state": None}},
        ckpt,
    )
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "total: FP32" in printed and "onnxruntime" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["max_abs_diff"] <= ONNX_TOL and report["onnx"]["top1_agree"]
    x = torch.randn(5, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(load_packed(out / "model.gdnsq")(x), ref)
    onnx_out = torch.from_numpy(run_onnx(out / "model.onnx", x))  # batch 5: the batch dimension is dynamic
    assert float((onnx_out - ref).abs().max()) <= ONNX_TOL
    assert read_manifest(out / "model.gdnsq")["recipe"]["builder"] == "gdnsq"

    assert main(["export", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["export", str(tmp_path / "junk.pt"), "--out", str(out)]) == 2
    assert "not a readable gdnsq checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------ mixed precision


def _mixed_student(seed=0, quantize_edges=False):
    """A SmallCNN whose quantized layers sit at different weight widths (a budget's outcome); with
    ``quantize_edges`` the stem and classifier are quantized too, weights only (their inputs stay FP)."""
    from gdnsq.config import BudgetConfig
    from gdnsq.training.models import SmallCNN

    torch.manual_seed(seed)
    model = SmallCNN()
    quantize_model(
        model, QuantConfig(budget=BudgetConfig(kind="bytes", value=1e4, max_bits=8, quantize_edges=quantize_edges))
    )
    calibrate_model(model, [torch.randn(8, 1, 28, 28)], init_bits=6.0)
    with torch.no_grad():
        for i, (_, layer) in enumerate(iter_quantized(model)):
            layer.weight_quant.log_s.add_(float(i + 2) - 6.0)  # ~6 - (4 - i) bits: 2, 3, 4, 5
    return model.eval()


@pytest.mark.parametrize("quantize_edges", [False, True])
def test_mixed_width_file_is_exact_and_its_size_is_the_shared_rule(tmp_path, quantize_edges):
    from gdnsq.training.bits import packed_bytes

    model = _mixed_student(quantize_edges=quantize_edges)
    widths = {n: layer.true_weight_bits() for n, layer in iter_quantized(model)}
    assert ({"stem.0", "head"} <= set(widths)) == quantize_edges
    assert len(set(widths.values())) >= 3, widths
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "mixed.gdnsq"
    report = export_packed(model, path, example_input=x)
    man = read_manifest(path)
    assert {e["name"]: e["weight"]["bits_w"] for e in man["layers"]} == widths  # each layer at its own width
    with torch.no_grad():
        assert torch.equal(load_packed(path)(x), ref)  # bit-exact reload
    assert report["bytes_file"] == os.path.getsize(path)
    assert report["bytes_payload"] == packed_bytes(model, widths)  # the budget's true check counts the same bytes
    assert report["bops"] == sum(r["macs"] * r["bits_w"] * r["bits_a"] for r in report["layers"])
