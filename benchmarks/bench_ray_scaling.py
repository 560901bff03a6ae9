"""Data-parallel scaling of the Ray Train edge: 2 workers vs 1 on the bundled digits (CPU).

Each worker gets one CPU (and one torch thread) and a fixed per-worker batch, so the ideal is 2x
samples/s. Throughput is the engine's ``train/samples_per_s`` of rank 0 times the world size (DDP
ranks run in lockstep), the median over the epochs after the first. A random-init FP checkpoint
stands in for the teacher, so no teacher training is timed.

Wall-clock throughput needs two idle cores. On a shared machine the second number, training
samples per CPU-second of all workers (``sys/cpu_s``: training, evaluation, checkpointing), shows
what the DDP path itself costs: its 2-worker / 1-worker ratio times 2 is the speed-up two idle
cores would give, minus time spent waiting on each other.

    .venv/bin/python benchmarks/bench_ray_scaling.py [--epochs 4] [--steps 25] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path


def throughput(workers: int, args, storage: Path, teacher: Path) -> tuple[float, float]:
    from ray.train import Result

    from gdnsq.config import load_config
    from gdnsq.launch.ray_train import fit

    name = f"scaling-{workers}w-{uuid.uuid4().hex[:6]}"
    cfg = load_config(
        args.config,
        {
            "name": name,
            "ray.address": "local",
            "ray.storage_path": str(storage),
            "ray.num_workers": workers,
            "ray.cpus_per_worker": 1,
            "ray.checkpoints_to_keep": max(2, args.epochs),
            "model.checkpoint": str(teacher),
            "train.epochs": args.epochs,
            "train.max_steps_per_epoch": args.steps,
            "data.batch_size": args.batch,
            "tracking.enabled": False,
        },
    )
    t0 = time.perf_counter()
    fit(cfg)
    wall = time.perf_counter() - t0
    reports = sorted((m for _, m in Result.from_path(storage / name).best_checkpoints), key=lambda m: m["epoch"])
    per_epoch = [m["train/samples_per_s"] * workers for m in reports]
    per_cpu = [m["train/steps"] * args.batch * workers / m["sys/cpu_s"] for m in reports]
    print(
        f"  {workers} worker(s): samples/s per epoch {[round(x) for x in per_epoch]}, "
        f"per CPU-s {[round(x) for x in per_cpu]}  (run wall {wall:.0f} s)"
    )
    return statistics.median(per_epoch[1:] or per_epoch), statistics.median(per_cpu[1:] or per_cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "gdnsq/configs/quickstart.yaml"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=25, help="optimizer steps per epoch and worker")
    p.add_argument("--batch", type=int, default=64, help="per-worker batch size")
    args = p.parse_args(argv)

    import ray
    import torch

    from gdnsq.config import load_config
    from gdnsq.training.models import create_model

    # A private instance with this machine's 2 CPUs; worker logs stay out of the numbers printed here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print(f"cpus {os.cpu_count()}  load average {os.getloadavg()[0]:.1f} (other work on the machine skews this)")
    with tempfile.TemporaryDirectory(prefix="gdnsq-bench-") as tmp:
        teacher = Path(tmp) / "teacher.pt"
        torch.manual_seed(0)
        torch.save(create_model(load_config(args.config).model, num_classes=10, in_chans=1).state_dict(), teacher)
        one = throughput(1, args, Path(tmp), teacher)
        two = throughput(2, args, Path(tmp), teacher)
    ray.shutdown()
    print(f"1 worker : {one[0]:8.1f} samples/s   {one[1]:7.1f} samples per CPU-s")
    print(f"2 workers: {two[0]:8.1f} samples/s   {two[1]:7.1f} samples per CPU-s")
    print(
        f"speed-up : {two[0] / one[0]:8.2f}x wall (goal >= 1.6x)   "
        f"CPU efficiency {two[1] / one[1]:.2f} (2 idle cores: up to {2 * two[1] / one[1]:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
