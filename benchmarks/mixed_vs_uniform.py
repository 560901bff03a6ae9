"""Learned mixed precision against uniform bit-widths at equal packed bytes, in one harness.

Protocol: the bundled MNIST-5k digits, the small CNN (or ``--model``), ONE FP teacher (benchmarks/compare_methods.py
trains and saves it; every run gets it as ``model.checkpoint``), the quick start's recipe for every run. For each
k in ``--bits`` (default 1, 2, 3) the budget is the packed payload of the uniform GDNSQ WkAk student
(:func:`gdnsq.training.bits.packed_bytes`, FP stem/classifier included), and three runs share it:

* ``mixed``   GDNSQ, ``quant.budget: {kind: bytes, value: <bytes of uniform Wk>}``, activations at k bits
  (``--act-budget``: their widths allocated too, k bits per input element on average, ``quant.budget.value_a``),
  weights free in [1, 8] bits per layer: the penalty acts on the model's bytes; with ``--edges budget`` (the
  default) the stem's and classifier's weights are under the budget too (``quant.budget.quantize_edges``;
  their inputs stay FP, as in the uniform arms), ``--edges fp`` keeps them FP like the uniform arms;
* ``gdnsq``   uniform GDNSQ WkAk (per-layer targets; stem and classifier FP, the papers' convention);
* ``lsq``     uniform LSQ WkAk;
* ``gdnsq_e8`` (not by default) uniform GDNSQ WkAk with 8-bit stem and classifier weights (FP inputs): the
  simple rule a skeptic would try first; it costs fewer bytes than the budget.

``--fractions 0.7,0.8`` adds mixed runs at those fractions of uniform W2's bytes: where mixed precision matches
uniform W2A2 at fewer bytes.

Each run is ``run_job`` in this process, selected on validation (``ns_top1``: only runs within their budget
count), reported on the test split with the packed bytes of its selected state. N seeds against the one teacher.

    python benchmarks/mixed_vs_uniform.py --out out/mixed --seeds 3 --bits 2 --fractions 0.7,0.8
    python benchmarks/mixed_vs_uniform.py --out out/mixed --quick --seeds 1 --bits 2     # 2-core smoke
    python benchmarks/mixed_vs_uniform.py --out out/mixed --resume --arms gdnsq_e8 ...   # add an arm to a run

Last printed line: ``mixed minus best uniform at W2 bytes: +X.XX points (N seeds)``.

Every finished run also appends a row to ``results/mixed.csv`` (``--record CSV``, ``--no-record``): commit,
command, date, the teacher's digest and test top-1, seed, the settings (``act_budget`` when ``--act-budget``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402  (the shared recipe and the one teacher)
import provenance  # noqa: E402

log = logging.getLogger("mixed")
COLUMNS = (
    "arm",
    "bits",
    "fraction",
    "seed",
    "budget_bytes",
    "bytes",
    "top1",
    "fp_top1",
    "converged",
    "ns_top1",
    "layer_bits",
    "steps",
    "seconds",
)


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


def edge_names(recipe: dict, args) -> list[str]:
    """The stem conv's and classifier's module names of the model every run uses (the recipe's, or --model)."""
    from gdnsq.training.models import create_model
    from gdnsq.training.surgery import edge_layers

    model_cfg = cm.job_config(recipe, {"model.name": args.model} if args.model else {}).model
    return sorted(set().union(*edge_layers(create_model(model_cfg, num_classes=10, in_chans=1, load_weights=False))))


def overrides(args, arm: str, k: int, teacher: Path, seed: int, budget: int, edges: list[str] = ()) -> dict:
    o = {
        "name": f"mixed-{arm}-w{k}",
        "quant.method": "lsq" if arm == "lsq" else "gdnsq",
        "quant.target_w": k,
        "quant.target_a": k,
        "train.epochs": args.epochs,
        "train.seed": seed,
        "train.device": "cpu",
        "ray.enabled": False,
        "tracking.enabled": False,
        "model.checkpoint": str(teacher),
    }
    if arm == "mixed":
        o.update(
            {
                "quant.budget.kind": "bytes",
                "quant.budget.value": float(budget),
                "quant.budget.max_bits": args.max_bits,
                "quant.budget.quantize_edges": args.edges == "budget",
            }
        )
        if args.act_budget:  # the inputs share k bits per element (the uniform arms' activation memory)
            o["quant.budget.value_a"] = float(k)
    elif arm == "gdnsq_e8":  # edges quantized at 8 bits by rule, inputs FP (``edges``: see edge_names)
        o.update(
            {
                "quant.keep_first_conv": False,
                "quant.keep_classifier": False,
                "quant.rules": [{"pattern": f"^{re.escape(e)}$", "target_w": 8, "quantize_act": False} for e in edges],
            }
        )
    if args.model:
        o["model.name"] = args.model
    if args.max_steps:
        o["train.max_steps_per_epoch"] = args.max_steps
    return o


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's results.csv (``--resume``), typed as run_one writes them."""
    if not path.is_file():
        return []
    kinds = {
        "bits": int,
        "seed": int,
        "budget_bytes": int,
        "bytes": int,
        "steps": int,
        "fraction": float,
        "top1": float,
        "fp_top1": float,
        "ns_top1": float,
        "seconds": float,
        "converged": lambda v: v == "True",
    }
    with open(path, newline="") as f:
        return [{k: kinds.get(k, str)(v) for k, v in r.items()} for r in csv.DictReader(f)]


def run_one(args, recipe, arm, k, teacher, seed, budget, fraction=1.0) -> dict:
    from gdnsq.training.job import run_job

    edges = edge_names(recipe, args) if arm == "gdnsq_e8" else ()
    cfg = cm.job_config(recipe, overrides(args, arm, k, teacher, seed, budget, edges))
    holder = {}
    t0 = time.perf_counter()
    s = run_job(cfg, on_epoch=lambda metrics, table, ckpt: holder.update(ckpt=ckpt))
    state = holder["ckpt"]()["best"]["state"]
    row = {
        "arm": arm,
        "bits": k,
        "fraction": fraction,
        "seed": seed,
        "budget_bytes": budget,
        "bytes": student_bytes(cfg, state),
        "top1": s["top1"],
        "fp_top1": s["fp_top1"],
        "converged": s["converged"],
        "ns_top1": s["ns_top1"],
        "layer_bits": " ".join(f"{r['true_bits_w']}/{r['true_bits_a']}" for r in s["layers"]),
        "steps": s["steps"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info(
        "%-5s W%d seed %d: top1 %.2f ns_top1 %.2f  %d B (budget %d)  W/A per layer %s  (%.0f s)",
        arm,
        k,
        seed,
        row["top1"],
        row["ns_top1"],
        row["bytes"],
        budget,
        row["layer_bits"],
        row["seconds"],
    )
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/mixed")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="3 epochs of 30 steps (a 2-core smoke)")
    p.add_argument("--bits", default="1,2,3", help="uniform widths whose bytes are the budgets")
    p.add_argument("--arms", default="mixed,gdnsq,lsq", help="subset of mixed, gdnsq, lsq, gdnsq_e8")
    p.add_argument(
        "--edges",
        choices=("budget", "fp"),
        default="budget",
        help="mixed: stem and classifier weights under the budget (default) or kept FP",
    )
    p.add_argument("--fractions", default="", help="also mixed at these fractions of uniform W2's bytes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bits", type=int, default=8, help="mixed: a layer's upper bound")
    p.add_argument(
        "--act-budget",
        action="store_true",
        help="mixed: allocate the inputs' widths too, at k bits per input element (else every input at k)",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--retrain-teacher", action="store_true")
    p.add_argument("--recipe", default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="keep --out's results.csv rows and run only what is missing")
    p.add_argument("--report", action="store_true", help="only print the tables of --out's results.csv (runs nothing)")
    p.add_argument("--record", default=str(provenance.RESULTS / "mixed.csv"), metavar="CSV")
    p.add_argument("--no-record", action="store_true", help="append no rows to results/mixed.csv")
    args = p.parse_args(argv)
    settings = [*(["act_budget"] if args.act_budget else []), *args.set]
    if args.edges != "budget":
        settings.append(f"edges={args.edges}")
    if args.max_bits != 8:
        settings.append(f"max_bits={args.max_bits}")
    if args.max_steps:
        settings.append(f"train.max_steps_per_epoch={args.max_steps}")
    stamp = {
        "date": provenance.today(),
        "commit": provenance.commit(),
        "source": "measured",
        "command": provenance.command(["benchmarks/mixed_vs_uniform.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": " ".join(settings),
    }
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
    fractions = [float(f) for f in args.fractions.split(",") if f]
    runs = []  # (arm, k, fraction, budget): the budgets of uniform Wk, then the fractions of W2's
    for k in sorted(set(bits) | ({2} if fractions else set())):
        budget = student_bytes(cm.job_config(recipe, overrides(args, "gdnsq", k, teacher, args.seed, 0)), None, k)
        log.info("budget at W%d: %d bytes (packed payload of uniform GDNSQ W%dA%d)", k, budget, k, k)
        if k in bits:
            runs += [(arm, k, 1.0, budget) for arm in arms]
        if k == 2:
            runs += [("mixed", 2, fr, int(budget * fr)) for fr in fractions]
    rows = read_rows(out / "results.csv") if args.resume or args.report else []
    done = {(r["arm"], r["bits"], r["fraction"], r["seed"]) for r in rows}
    for seed in range(args.seed, args.seed + args.seeds):
        for arm, k, fraction, budget in runs:
            if (arm, k, fraction, seed) in done or args.report:
                continue
            rows.append(run_one(args, recipe, arm, k, teacher, seed, budget, fraction))
            if not args.no_record:
                r = rows[-1]
                extra = {"teacher": f"harness:{provenance.digest(teacher)}", "teacher_top1": r["fp_top1"]}
                extra["model"] = args.model or recipe.get("model", {}).get("name", "")
                extra["minutes"] = round(r["seconds"] / 60, 2)
                provenance.record("mixed.csv", [{**r, **stamp, **extra}], Path(args.record))
            with open(out / "results.csv", "w", newline="") as f:  # partial results survive an interrupted run
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(rows)
    if not args.report:
        (out / "results.json").write_text(json.dumps({"rows": rows, "recipe": recipe, "args": vars(args)}, indent=1))
    print(f"{'budget':<8} {'arm':<8} {'n':>2} {'top1 mean':>9} {'sd':>5} {'ns_top1':>8} {'bytes':>7} {'converged':>9}")
    means = {}
    for arm, k, fraction in dict.fromkeys((r["arm"], r["bits"], r["fraction"]) for r in rows):
        rs = [r for r in rows if r["bits"] == k and r["arm"] == arm and r["fraction"] == fraction]
        ns = [r["ns_top1"] for r in rs]
        means[(k, arm, fraction)] = statistics.fmean(ns)
        sd = statistics.stdev(ns) if len(rs) > 1 else 0.0
        where = f"W{k} bytes" if fraction == 1.0 else f"{fraction:.0%} W{k}"
        print(
            f"{where:<8} {arm:<8} {len(rs):>2} {statistics.fmean(r['top1'] for r in rs):>9.2f} {sd:>5.2f} "
            f"{means[(k, arm, fraction)]:>8.2f} {statistics.fmean(r['bytes'] for r in rs):>7.0f} "
            f"{sum(bool(r['converged']) for r in rs):>6}/{len(rs)}"
        )
    uniform2 = max((means[(2, a, 1.0)] for a in ("gdnsq", "lsq") if (2, a, 1.0) in means), default=None)
    below_w2 = sorted(fr for k, a, fr in means if a == "mixed" and k == 2 and fr < 1.0)  # this run's and resumed
    matched = [fr for fr in below_w2 if uniform2 is not None and means[(2, "mixed", fr)] >= uniform2]
    if matched:
        print(
            f"mixed matches the best uniform W2A2 ({uniform2:.2f}) at {matched[0]:.0%} of its bytes "
            f"({means[(2, 'mixed', matched[0])]:.2f})"
        )
    if (2, "mixed", 1.0) in means and uniform2 is not None:
        print(
            f"mixed minus best uniform at W2 bytes: {means[(2, 'mixed', 1.0)] - uniform2:+.2f} points "
            f"({args.seeds} seeds)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
