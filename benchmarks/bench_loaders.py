"""Training-loader throughput: FFCV vs torchvision ImageFolder + DataLoader, same crops.

Generates ImageNet-sized JPEGs (default 320 images of 500x375, in train/ and val/), converts
train/ to a .beton as gdnsq does (longer side <= 256, half JPEG q90, half raw), then times
full passes of both training loaders: RandomResizedCrop(224) + horizontal flip + ImageNet
normalisation to float32 NCHW on the CPU, with the same batch size and worker count. The
first pass of each loader is a warm-up (FFCV JIT-compiles its pipeline; DataLoader forks).

    python benchmarks/bench_loaders.py [--images 320] [--workers N] [--batch-size 64] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gdnsq.config import DataConfig  # noqa: E402
from gdnsq.data.ffcv_io import available_cpus, create_ffcv_loaders, write_beton  # noqa: E402
from gdnsq.data.imagefolder import create_imagefolder_loaders  # noqa: E402
from gdnsq.data.synthetic import make_jpeg_imagefolder  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers; FFCV uses threads)."""
    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def throughput(loader, epochs: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second) over ``epochs`` passes after a warm-up."""
    for _ in loader:  # warm-up pass
        pass
    n, start, cpu = 0, time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        for x, _ in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - start), n / (cpu_seconds() - cpu)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=320, help="training images (8 classes)")
    p.add_argument("--workers", type=int, default=available_cpus(), help="loader workers for both loaders")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed passes after the warm-up pass")
    p.add_argument("--root", type=Path, default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        classes = 8
        t = time.perf_counter()
        make_jpeg_imagefolder(root / "jpeg", classes=classes, per_class=args.images // classes, val_per_class=1)
        print(f"generated {args.images} JPEGs of 500x375 in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        write_beton(root / "jpeg" / "train", root / "beton" / "train.beton", num_workers=args.workers, progress=False)
        write_beton(root / "jpeg" / "val", root / "beton" / "val.beton", num_workers=args.workers, progress=False)
        print(f"wrote .beton files in {time.perf_counter() - t:.1f}s")

        common = dict(img_size=224, val_resize=256, batch_size=args.batch_size, num_workers=args.workers)
        cpu = torch.device("cpu")
        tv_train, _, _ = create_imagefolder_loaders(
            DataConfig(
                kind="imagefolder",
                train_path=str(root / "jpeg" / "train"),
                val_path=str(root / "jpeg" / "val"),
                **common,
            ),
            distributed=False,
            device=cpu,
            seed=0,
        )
        ffcv_train, _, _ = create_ffcv_loaders(
            DataConfig(
                kind="ffcv",
                train_path=str(root / "beton" / "train.beton"),
                val_path=str(root / "beton" / "val.beton"),
                **common,
            ),
            distributed=False,
            device=cpu,
            seed=0,
        )

        load_before = os.getloadavg()[0]
        tv, tv_cpu = throughput(tv_train, args.epochs)
        ffcv, ffcv_cpu = throughput(ffcv_train, args.epochs)

    # Wall-clock throughput is what training sees; images per CPU second is the cost, and it is
    # less sensitive to other processes competing for the same cores (see the load average).
    print(
        f"train loaders, 224px RandomResizedCrop+flip, batch {args.batch_size}, {args.workers} workers, "
        f"{available_cpus()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}:"
    )
    print(f"  {'':36s} {'images/s':>10s} {'images/CPU-s':>13s}")
    print(f"  {'torchvision ImageFolder+DataLoader':36s} {tv:10.1f} {tv_cpu:13.1f}")
    print(f"  {'FFCV Loader (.beton)':36s} {ffcv:10.1f} {ffcv_cpu:13.1f}")
    print(f"  {'ratio FFCV / torchvision':36s} {ffcv / tv:9.2f}x {ffcv_cpu / tv_cpu:12.2f}x   (goal >= 3x)")
    return ffcv / tv


if __name__ == "__main__":
    main()
