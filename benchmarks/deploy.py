"""Deployment benchmark: latency and size of FP32 ONNX, onnxruntime's own static int8 (the anchor) and gdnsq's
integer export, side by side in one run, on onnxruntime (default optimization level) and OpenVINO (CPU).

    nice -n 10 python benchmarks/deploy.py [--models resnet18,mobilenetv2_100] [--bits 2,4] [--repeats 20]

Per model (timm, random weights: latency and size do not depend on them), batch 8 at 112x112:
* ``fp32``: torch.onnx (dynamo) export of the FP network;
* ``ort-int8``: ``onnxruntime.quantization.quantize_static`` of that file (QDQ, per-channel int8 weights, uint8
  activations, min/max on 8 random batches) — what a user gets from onnxruntime alone;
* ``gdnsq-int8 WkAk``: the network quantized with ``quant.integer_grid`` (grids from calibration at k bits; stem
  and classifier FP, as surgery's defaults), exported with ``--onnx-target int8`` (exact: the convs that reach no
  quantizer run as ``ConvInteger``);
* ``gdnsq-int8-requant WkAk``: the same model exported with ``requantize`` (8-bit grids calibrated on the timed
  batch for the residual sums, those convs' outputs and the FP stem: every conv a ``QLinearConv``, every sum a
  ``QLinearAdd``; not the fake-quant eval, its accuracy cost is measured on the digits in
  tests/export/test_onnx_int8.py).
Latency: the median of ``--repeats`` runs of each artefact, the artefacts measured in turn round after round, so
load from other processes hits all alike; the 1-minute load average is recorded beside each row (a shared 2-core
machine is noisy). Rows go to results/speed.csv (benchmark ``deploy``): random weights measure latency and size, not
accuracy, which results/deployment.csv holds; accuracy through the runtimes is tested on the bundled digits
(tests/export/test_onnx_int8.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

from gdnsq.config import QuantConfig  # noqa: E402
from gdnsq.export.onnx_int8 import export_int8  # noqa: E402
from gdnsq.export.runtimes import runner  # noqa: E402
from gdnsq.training.surgery import calibrate_model, quantize_model  # noqa: E402


def fp32_onnx(model, x, path: Path) -> None:
    torch.onnx.export(
        model, (x,), str(path), dynamo=True, opset_version=21, input_names=["input"], verbose=False, external_data=False
    )


def ort_static_int8(fp_path: Path, out: Path, shape, batches: int = 8) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            gen = torch.Generator().manual_seed(1)
            self.data = iter([{"input": torch.randn(*shape, generator=gen).numpy()} for _ in range(batches)])

        def get_next(self):
            return next(self.data, None)

    quantize_static(
        str(fp_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def gdnsq_int8(model, x, bits: int, paths: dict[str, Path]) -> None:
    torch.manual_seed(0)
    quantize_model(model, QuantConfig(target_w=bits, target_a=bits, integer_grid=True))
    calibrate_model(model, [torch.randn(4, *x.shape[1:]) for _ in range(2)], init_bits=bits)
    export_int8(model.eval(), paths["exact"], x, target="int8")
    export_int8(model, paths["requant"], x, target="int8", requantize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenetv2_100")
    p.add_argument("--bits", default="2,4", help="gdnsq widths (W = A), comma-separated")
    p.add_argument("--runtimes", default="onnxruntime,openvino")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, 3, args.size, args.size)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    rows, summary = [], {}
    device = f"cpu {platform.machine()} x{os.cpu_count()}, {args.threads} threads"  # as speed.csv's machine
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            files = {}
            fp = timm.create_model(name, num_classes=1000).eval()
            files["fp32"] = Path(tmp) / f"{name}.fp32.onnx"
            fp32_onnx(fp, x, files["fp32"])
            files["ort-int8"] = Path(tmp) / f"{name}.ort-int8.onnx"
            ort_static_int8(files["fp32"], files["ort-int8"], shape)
            for b in args.bits.split(","):
                paths = {k: Path(tmp) / f"{name}.w{b}.{k}.onnx" for k in ("exact", "requant")}
                try:
                    gdnsq_int8(timm.create_model(name, num_classes=1000), x, int(b), paths)
                except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others' rows
                    print(f"{name} W{b}A{b}: gdnsq integer export failed: {type(e).__name__}: {e}", flush=True)
                    continue
                files[f"gdnsq-int8 W{b}A{b}"] = paths["exact"]
                files[f"gdnsq-int8-requant W{b}A{b}"] = paths["requant"]
            for runtime in args.runtimes.split(","):
                runs = {k: runner(f, runtime, threads=args.threads) for k, f in files.items()}
                times = {k: [] for k in runs}
                for run in runs.values():  # warm-up
                    run(xn)
                    run(xn)
                for _ in range(args.repeats):
                    for k, run in runs.items():
                        t0 = time.perf_counter()
                        run(xn)
                        times[k].append(time.perf_counter() - t0)
                load = os.getloadavg()[0]
                base = statistics.median(times["fp32"])
                for k, t in times.items():
                    med = statistics.median(t)
                    summary[(name, runtime, k)] = med / base
                    print(f"{name:18s} {runtime:12s} {k:18s} {1e3 * med:8.1f} ms  {med / base:5.2f}x FP32  "
                          f"{files[k].stat().st_size / 1e6:6.1f} MB  load {load:.1f}", flush=True)  # fmt: skip
                    common = {
                        "date": provenance.today(), "commit": provenance.commit(), "source": "measured",
                        "command": provenance.command(), "benchmark": "deploy", "machine": device,
                        "load": f"{load:.1f}", "variant": f"{name} {k} {runtime}", "seed": 0,
                        "notes": f"batch {args.batch} at {args.size}x{args.size}, median of {args.repeats}, "
                        "random weights (latency and size only)",
                    }  # fmt: skip
                    for metric, value, unit in (("latency_ms", f"{1e3 * med:.2f}", "ms"),
                                                ("ratio_to_fp32", f"{med / base:.3f}", "x"),
                                                ("file_bytes", files[k].stat().st_size, "B")):  # fmt: skip
                        rows.append({**common, "metric": metric, "value": value, "unit": unit})
            if not args.no_record:  # per model, so a later model's failure keeps these rows
                provenance.record("speed.csv", rows)
            rows = []
    ours, anchor, w4 = (
        summary.get(("resnet18", "onnxruntime", "gdnsq-int8-requant W2A2")),
        summary.get(("resnet18", "onnxruntime", "ort-int8")),
        summary.get(("resnet18", "onnxruntime", "gdnsq-int8-requant W4A4")),
    )
    if ours is not None and anchor is not None:
        w4_text = "" if w4 is None else f"; W4A4 {w4:.2f}x"
        print(f"integer ONNX / FP32 latency, resnet18 W2A2, onnxruntime: {ours:.2f}x (onnxruntime int8 anchor "
              f"{anchor:.2f}x){w4_text} [requantized export]")  # fmt: skip


if __name__ == "__main__":
    main()
