"""Learned mixed precision against uniform bit-widths at equal packed bytes, in one harness.

Protocol: the bundled MNIST-5k digits, the small CNN (or ``--model``), ONE FP teacher (benchmarks/compare_methods.py
trains and saves it; every run gets it as ``model.checkpoint``), the quick start's recipe for every run. For each
k in ``--bits`` (default 1, 2, 3) the budget is the packed payload of the uniform GDNSQ WkAk student
(:func:`gdnsq.training.bits.packed_bytes`, FP stem/classifier included), and three runs share it:

* ``mixed``   GDNSQ, ``quant.budget: {kind: bytes, value: <bytes of uniform Wk>}``, activations at k bits,
  weights free in [1, 8] bits per layer: the penalty acts on the model's bytes;
* ``gdnsq``   uniform GDNSQ WkAk (per-layer targets);
* ``lsq``     uniform LSQ WkAk.

Each run is ``run_job`` in this process, selected on validation (``ns_top1``: only runs within their budget
count), reported on the test split with the packed bytes of its selected state. N seeds against the one teacher.

    python benchmarks/mixed_vs_uniform.py --out out/mixed --seeds 3
    python benchmarks/mixed_vs_uniform.py --out out/mixed --quick --seeds 1 --bits 2     # 2-core smoke

Last printed line: ``mixed minus best uniform at W2 bytes: +X.XX points (N seeds)``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402  (the shared recipe and the one teacher)

log = logging.getLogger("mixed")
COLUMNS = ("arm", "bits", "seed", "budget_bytes", "bytes", "top1", "fp_top1", "converged", "ns_top1", "layer_bits",
           "steps", "seconds")


def student_bytes(cfg, state: dict | None, bits: int | None = None) -> int:
    """Packed payload of ``cfg``'s student: at its true bits (``state``) or every layer at ``bits``."""
    from gdnsq.quant.layers import iter_quantized
    from gdnsq.training.bits import packed_bytes
    from gdnsq.training.surgery import build_student

    s = build_student(cfg, num_classes=10, in_chans=1)
    if state is not None:
        s.load_state_dict(state)
    layers = [(n, l) for n, l in iter_quantized(s) if l.weight_quant.enabled]
    return packed_bytes(s, {n: bits if bits is not None else max(1, l.true_weight_bits()) for n, l in layers})


def overrides(args, arm: str, k: int, teacher: Path, seed: int, budget: int) -> dict:
    o = {"name": f"mixed-{arm}-w{k}", "quant.method": "lsq" if arm == "lsq" else "gdnsq",
         "quant.target_w": k, "quant.target_a": k, "train.epochs": args.epochs, "train.seed": seed,
         "train.device": "cpu", "ray.enabled": False, "tracking.enabled": False, "model.checkpoint": str(teacher)}
    if arm == "mixed":
        o.update({"quant.budget.kind": "bytes", "quant.budget.value": float(budget),
                  "quant.budget.max_bits": args.max_bits})
    if args.model:
        o["model.name"] = args.model
    if args.max_steps:
        o["train.max_steps_per_epoch"] = args.max_steps
    return o


def run_one(args, recipe, arm, k, teacher, seed, budget) -> dict:
    from gdnsq.training.job import run_job

    cfg = cm.job_config(recipe, overrides(args, arm, k, teacher, seed, budget))
    holder = {}
    t0 = time.perf_counter()
    s = run_job(cfg, on_epoch=lambda metrics, table, ckpt: holder.update(ckpt=ckpt))
    state = holder["ckpt"]()["best"]["state"]
    row = {"arm": arm, "bits": k, "seed": seed, "budget_bytes": budget, "bytes": student_bytes(cfg, state),
           "top1": s["top1"], "fp_top1": s["fp_top1"], "converged": s["converged"], "ns_top1": s["ns_top1"],
           "layer_bits": " ".join(f"{r['true_bits_w']}/{r['true_bits_a']}" for r in s["layers"]),
           "steps": s["steps"], "seconds": round(time.perf_counter() - t0, 1)}
    log.info("%-5s W%d seed %d: top1 %.2f ns_top1 %.2f  %d B (budget %d)  W/A per layer %s  (%.0f s)", arm, k, seed,
             row["top1"], row["ns_top1"], row["bytes"], budget, row["layer_bits"], row["seconds"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/mixed")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="3 epochs of 30 steps (a 2-core smoke)")
    p.add_argument("--bits", default="1,2,3", help="uniform widths whose bytes are the budgets")
    p.add_argument("--arms", default="mixed,gdnsq,lsq")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bits", type=int, default=8, help="mixed: a layer's upper bound")
    p.add_argument("--model", default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--retrain-teacher", action="store_true")
    p.add_argument("--recipe", default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.max_steps = 3, args.max_steps or 30
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("gdnsq", "gdnsq.training.job"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = cm.load_recipe(args)
    teacher = cm.train_teacher(args, recipe, out)
    bits = [int(b) for b in args.bits.split(",")]
    arms = args.arms.split(",")
    rows = []
    for k in bits:
        budget = student_bytes(cm.job_config(recipe, overrides(args, "gdnsq", k, teacher, args.seed, 0)), None, k)
        log.info("budget at W%d: %d bytes (packed payload of uniform GDNSQ W%dA%d)", k, budget, k, k)
        for seed in range(args.seed, args.seed + args.seeds):
            for arm in arms:
                rows.append(run_one(args, recipe, arm, k, teacher, seed, budget))
                with open(out / "results.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=COLUMNS)
                    w.writeheader()
                    w.writerows(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "recipe": recipe, "args": vars(args)}, indent=1))
    print(f"{'budget':<8} {'arm':<6} {'n':>2} {'top1 mean':>9} {'sd':>5} {'ns_top1':>8} {'bytes':>7} {'converged':>9}")
    means = {}
    for k in bits:
        for arm in arms:
            rs = [r for r in rows if r["bits"] == k and r["arm"] == arm]
            if not rs:
                continue
            ns = [r["ns_top1"] for r in rs]
            means[(k, arm)] = statistics.fmean(ns)
            sd = statistics.stdev(ns) if len(rs) > 1 else 0.0
            print(f"W{k} bytes {arm:<6} {len(rs):>2} {statistics.fmean(r['top1'] for r in rs):>9.2f} {sd:>5.2f} "
                  f"{means[(k, arm)]:>8.2f} {statistics.fmean(r['bytes'] for r in rs):>7.0f} "
                  f"{sum(bool(r['converged']) for r in rs):>6}/{len(rs)}")
    if (2, "mixed") in means:
        uniform = [means[(2, a)] for a in arms if a != "mixed" and (2, a) in means]
        if uniform:
            print(f"mixed minus best uniform at W2 bytes: {means[(2, 'mixed')] - max(uniform):+.2f} points "
                  f"({args.seeds} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
