"""Export sizes, parity and timings for a W2A2 timm model (random weights, 2-bit grids from calibration).

    python benchmarks/bench_export.py --model resnet18 --size 64
    python benchmarks/bench_export.py --model vit_tiny_patch16_224 --size 32 --kw img_size=32 patch_size=8

Prints one JSON line per artefact: bytes (FP32 vs file), compression, BOPs, max |logit diff| against the
fake-quant eval (packed reload: float32 / float16 FP tensors; onnxruntime), seconds to export and load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch

from gdnsq.config import QuantConfig
from gdnsq.export import export_onnx, export_packed, load_packed, run_onnx
from gdnsq.training.surgery import calibrate_model, quantize_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="square input side")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bits", type=float, default=2.0, help="calibration bits (W and A)")
    p.add_argument("--kw", nargs="*", default=[], help="timm kwargs as key=int")
    p.add_argument("--no-onnx", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    kw = {k: int(v) for k, v in (a.split("=", 1) for a in args.kw)}
    model = timm.create_model(args.model, num_classes=10, **kw)
    quantize_model(model, QuantConfig(target_w=args.bits, target_a=args.bits))
    shape = (3, args.size, args.size)
    calibrate_model(model, [torch.randn(4, *shape) for _ in range(2)], init_bits=args.bits)
    model.eval()
    x = torch.randn(args.batch, *shape)
    with torch.no_grad():
        ref = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        for fp in ("float32", "float16"):
            path = Path(tmp) / f"model.{fp}.gdnsq"
            t0 = time.perf_counter()
            r = export_packed(model, path, fp_dtype=fp, example_input=x)
            t1 = time.perf_counter()
            rebuilt = load_packed(path)
            t2 = time.perf_counter()
            with torch.no_grad():
                diff = float((rebuilt(x) - ref).abs().max())
            print(
                json.dumps(
                    {
                        "artefact": f"packed-{fp}",
                        "model": args.model,
                        "bytes_fp32": r["bytes_fp32"],
                        "bytes_file": r["bytes_file"],
                        "compression": r["compression"],
                        "bops": r["bops"],
                        "bops_fp32": r["bops_fp32"],
                        "max_abs_diff": diff,
                        "export_s": round(t1 - t0, 2),
                        "load_s": round(t2 - t1, 2),
                    }
                )
            )
        if not args.no_onnx:
            path = Path(tmp) / "model.onnx"
            t0 = time.perf_counter()
            r = export_onnx(model, path, x, verify=False)
            t1 = time.perf_counter()
            out = torch.from_numpy(run_onnx(path, x))
            print(
                json.dumps(
                    {
                        "artefact": "onnx",
                        "model": args.model,
                        "bytes_file": r["bytes_file"],
                        "max_abs_diff": float((out - ref).abs().max()),
                        "top1_agree": bool((out.argmax(1) == ref.argmax(1)).all()),
                        "export_s": round(t1 - t0, 2),
                    }
                )
            )


if __name__ == "__main__":
    main()
