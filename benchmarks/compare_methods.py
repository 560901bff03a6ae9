"""GDNSQ against the field in one harness: every method of ``quant.method`` on the same data, teacher and budget.

Protocol: the bundled MNIST-5k digits (3,500 train / 500 val / 1,000 test), the small CNN ``gdnsq_smallcnn``
(stem conv and classifier FP, per-channel weights, per-tensor activations), ONE FP teacher trained once and
passed to every run as ``model.checkpoint``, and one recipe for everyone: the quick start
(``gdnsq/configs/quickstart.yaml``, read once at start; ``--recipe`` / ``--set key=value`` change it for
every run alike) with the same epochs and steps. GDNSQ starts at ``quant.init_bits`` and its penalty must
bring every layer to the target within the budget; fixed-bit methods sit at the target from the start.
Each run is ``gdnsq.training.job.run_job`` in this process (no Ray, no MLflow): checkpoint selection on the
validation split (``ns_top1``), top-1 reported on the test split. Effective bits: the true bits of the
grids (mean over quantized layers) and the parameter-weighted entropy of the integer weight codes (bits
per weight after ideal entropy coding).

    # the method table of docs/results.md: W2A2 and W1A1 at 432 and 2,160 steps, 3 seeds, Brevitas included
    python benchmarks/compare_methods.py --out out/compare --epochs 8 --seeds 3 --methods gdnsq,lsq,brevitas \
        --targets W2A2,W1A1
    python benchmarks/compare_methods.py --out out/compare --epochs 40 --seeds 3 --methods gdnsq,lsq,brevitas \
        --targets W2A2,W1A1                                                   # same folder: same teacher.pt
    python benchmarks/compare_methods.py --write-jobs jobs/compare           # regenerate the ImageNet job files

Every finished run appends one row to ``results/methods.csv`` (``--record``; ``--no-record`` for a smoke run):
commit, command, date, the teacher's digest and test top-1, the seed, the overrides, the result.
``--methods ...,brevitas`` adds the Brevitas arm (``benchmarks/brevitas_arm.py``: Brevitas's own learned-scale,
MSE-initialised quantizers at the same placement; needs ``pip install 'brevitas==0.13.4'``, the [bench] extra).

``--seeds N`` runs every cell with seeds seed .. seed+N-1 against the ONE teacher (trained with ``--seed``) and
reports mean ± sd per cell; ``--seed-list 1,2`` runs exactly those seeds against the same teacher (the missing
cells of an interrupted run, in its ``--out`` folder so ``teacher.pt`` is reused); ``--model`` swaps
the student/teacher architecture (e.g. ``resnet10t``).

Writes ``teacher.pt``, ``results.csv``, ``results.json`` (rows + protocol + resolved recipe), ``results.md``
and ``results.png`` in the output folder, after every run (an interrupted run keeps what it finished).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (benchmarks/ is not a package)

METHODS = ("gdnsq", "lsq", "dorefa", "pact", "pege", "bnnpp", "codeq")
PEERS = ("brevitas",)  # arms from other libraries (benchmarks/brevitas_arm.py), opt-in: --methods ...,brevitas
TARGETS = ((4, 4), (3, 3), (2, 2), (1, 1))
ONLY_AT = {"bnnpp": {(1, 1)}}  # methods defined for some targets only
COLUMNS = (
    "method",
    "target",
    "seed",
    "status",
    "top1",
    "fp_top1",
    "converged",
    "ns_top1",
    "avg_bits_w",
    "avg_bits_a",
    "entropy_bits_w",
    "sparsity_w",
    "full_levels",
    "descent_end",
    "val_top1",
    "best_epoch",
    "steps",
    "seconds",
)

log = logging.getLogger("compare")


def quickstart_path() -> Path:
    return Path(str(resources.files("gdnsq") / "configs" / "quickstart.yaml"))


def load_recipe(args) -> dict:
    """The shared recipe, read ONCE (the quick start is being tuned: every run must see the same file)."""
    import yaml

    from gdnsq.config import apply_overrides, parse_cli_overrides

    recipe = yaml.safe_load(Path(args.recipe or quickstart_path()).read_text()) or {}
    return apply_overrides(recipe, parse_cli_overrides(args.set))


def job_config(recipe: dict, overrides: dict):
    from gdnsq.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(recipe, overrides))


def job_overrides(args, method: str, target: tuple[int, int], teacher: str | None, seed: int | None = None) -> dict:
    o = {
        "name": f"compare-{method}-w{target[0]}a{target[1]}",
        "quant.method": method,
        "quant.target_w": target[0],
        "quant.target_a": target[1],
        "train.epochs": args.epochs,
        "train.seed": args.seed if seed is None else seed,
        "train.device": "cpu",
        "ray.enabled": False,
        "tracking.enabled": False,
    }
    if args.model:
        o["model.name"] = args.model
    if teacher:
        o["model.checkpoint"] = teacher
    if args.max_steps:
        o["train.max_steps_per_epoch"] = args.max_steps
    if args.anneal is not None:
        o["schedule.anneal"] = args.anneal
    return o


def train_teacher(args, recipe: dict, out: Path) -> Path:
    """The one FP teacher of every run: the pipeline's own recipe, trained once and saved."""
    from gdnsq.data.loaders import create_loaders
    from gdnsq.training.evaluation import evaluate
    from gdnsq.training.job import prepare_teacher
    from gdnsq.training.runtime import seed_everything

    path = out / "teacher.pt"
    if path.is_file() and not args.retrain_teacher:
        log.info("reusing the FP teacher %s", path)
        return path
    over = {"train.seed": args.seed, "train.device": "cpu", "ray.enabled": False, "model.checkpoint": None}
    if args.teacher_epochs is not None:
        over["train.teacher_epochs"] = args.teacher_epochs
    if args.model:
        over["model.name"] = args.model
    cfg = job_config(recipe, over)
    # Seeded before the loaders and the model, in run_job's order: the teacher's initial weights are then the
    # seed's (unseeded they were the process's RNG, so two harness folders got different teachers), and the
    # harness teacher is the one the quick start trains in-run with the same seed.
    seed_everything(args.seed)
    loaders = create_loaders(cfg)
    teacher, report = prepare_teacher(cfg, loaders, torch.device("cpu"), None)
    log.info("FP teacher: test top-1 %.2f (%s)", evaluate(teacher, loaders.test, torch.device("cpu"))["top1"], report)
    torch.save(teacher.state_dict(), path)
    return path


@torch.no_grad()
def weight_code_stats(cfg, best_state: dict) -> tuple[float, float]:
    """Parameter-weighted entropy (bits / weight) of the eval weight codes, and the share of zero weights."""
    from gdnsq.quant import functional as F
    from gdnsq.quant.layers import iter_quantized
    from gdnsq.quant.zoo.common import code_stats
    from gdnsq.training.surgery import build_student

    student = build_student(cfg, num_classes=10, in_chans=1)
    student.load_state_dict(best_state)
    student.eval()
    bits = zeros = total = 0.0
    for _, layer in iter_quantized(student):
        w = layer.weight
        w_hat = layer.weight_quant(w)
        codes = F.integer_codes(w_hat, *layer.weight_quant.grid(w))  # eval output -> codes, for every method
        bits += code_stats(codes)["entropy_bits"] * w.numel()
        zeros += float((w_hat == 0).sum())
        total += w.numel()
    return bits / total, zeros / total


def full_levels(best_state: dict, cfg) -> bool:
    """Every learnable grid of the selected model keeps all 2**target levels (fixed-bit grids have them by design)."""
    from gdnsq.quant.layers import iter_quantized
    from gdnsq.training.surgery import build_student

    student = build_student(cfg, num_classes=10, in_chans=1)
    student.load_state_dict(best_state)
    for _, layer in iter_quantized(student):
        for q, args_, t in (
            (layer.weight_quant, (layer.weight,), layer.target_w),
            (layer.act_quant, (), layer.target_a),
        ):
            if q is not None and q.learnable_bits and q.levels(*args_).min() < 2 ** int(t):
                return False
    return True


def run_one(args, recipe: dict, method: str, target: tuple[int, int], teacher: Path, seed: int | None = None) -> dict:
    from gdnsq.errors import ConfigError
    from gdnsq.training.job import run_job

    row = {"method": method, "target": f"W{target[0]}A{target[1]}", "seed": args.seed if seed is None else seed}
    try:
        cfg = job_config(recipe, job_overrides(args, method, target, str(teacher), seed))
        holder = {}
        t0 = time.perf_counter()
        s = run_job(cfg, on_epoch=lambda metrics, table, ckpt: holder.update(ckpt=ckpt))
        seconds = time.perf_counter() - t0
    except ConfigError as e:  # e.g. codeq at 1 bit: the method is not defined there
        log.warning("%s %s: not run (%s)", method, row["target"], e)
        return {**row, "status": f"n/a: {e}"}
    best_state = holder["ckpt"]()["best"]["state"]
    entropy, sparsity = weight_code_stats(cfg, best_state)
    end = s.get("descent_end_step")
    row.update(
        status="ok",
        top1=s["top1"],
        fp_top1=s["fp_top1"],
        converged=s["converged"],
        ns_top1=s["ns_top1"],
        avg_bits_w=s["avg_bits_w"],
        avg_bits_a=s["avg_bits_a"],
        entropy_bits_w=round(entropy, 3),
        sparsity_w=round(sparsity, 3),
        full_levels=full_levels(best_state, cfg),
        descent_end=None if end is None else round(end / max(1, s["steps"]), 3),
        val_top1=s["val_top1"],
        best_epoch=s["best_epoch"],
        steps=s["steps"],
        seconds=round(seconds, 1),
    )
    log.info(
        "%-6s %s  top1 %6.2f  converged %-5s  bits W%.2f A%.2f  H_w %.2f  (%.0f s)",
        method,
        row["target"],
        row["top1"],
        row["converged"],
        row["avg_bits_w"],
        row["avg_bits_a"],
        entropy,
        seconds,
    )
    return row


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| method | target | seed | test top-1 | converged | ns_top1 | true bits W / A | code entropy W | "
        "zero weights | s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['target']} | {r['seed']} | – | – | – | – | – | – | {r['status']} |")
            continue
        lines.append(
            f"| {r['method']} | {r['target']} | {r['seed']} | {r['top1']:.2f} | "
            f"{'yes' if r['converged'] else 'NO'} | {r['ns_top1']:.2f} | {r['avg_bits_w']:.2f} / "
            f"{r['avg_bits_a']:.2f} | {r['entropy_bits_w']:.2f} | {100 * r['sparsity_w']:.1f} % | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, target): mean ± sd of test top-1 and ns_top1 over seeds, converged count."""
    import statistics

    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            cells.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), rs in cells.items():
        top1 = [r["top1"] for r in rs]
        ns = [r["ns_top1"] for r in rs]
        out.append(
            {
                "method": method,
                "target": target,
                "n": len(rs),
                "seeds": [r["seed"] for r in rs],
                "top1_mean": statistics.fmean(top1),
                "top1_sd": statistics.stdev(top1) if len(rs) > 1 else 0.0,
                "ns_top1_mean": statistics.fmean(ns),
                "converged": sum(bool(r["converged"]) for r in rs),
                "full_levels": sum(bool(r.get("full_levels")) for r in rs),
            }
        )
    return out


def summary_table(rows: list[dict]) -> str:
    """method × target grid of 'mean ± sd' test top-1 (ns_top1: non-converged runs count 0), converged k/n."""
    summ = {(c["method"], c["target"]): c for c in summarize(rows)}
    targets = [t for t in (f"W{w}A{a}" for w, a in TARGETS) if any(k[1] == t for k in summ)]
    methods = [m for m in METHODS + PEERS if any(k[0] == m for k in summ)]
    lines = ["| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            c = summ.get((m, t))
            if c is None:
                cells.append("–")
                continue
            conv = "" if c["converged"] == c["n"] else f" (converged {c['converged']}/{c['n']})"
            cells.append(f"{c['top1_mean']:.2f} ± {c['top1_sd']:.2f}{conv}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [f"W{w}A{a}" for w, a in TARGETS]
    methods = [m for m in METHODS + PEERS if any(r["method"] == m and r["status"] == "ok" for r in rows)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(methods))
    labelled = set()
    for i, m in enumerate(methods):
        for j, t in enumerate(targets):
            r = next((r for r in rows if r["method"] == m and r["target"] == t and r["status"] == "ok"), None)
            if r is None:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            style = dict(color=f"C{i}", hatch=None if r["converged"] else "//", edgecolor="k", linewidth=0.4)
            ax.bar(x, r["top1"], width, label=None if m in labelled else m, **style)
            labelled.add(m)
            bx.bar(x, r["entropy_bits_w"], width, **style)
    fp = next((r["fp_top1"] for r in rows if r["status"] == "ok"), None)
    if fp is not None:
        ax.axhline(fp, color="k", linestyle="--", linewidth=0.8, label=f"FP {fp:.1f}")
    for a, title in ((ax, "test top-1 (%)  — hatched: not converged"), (bx, "weight code entropy (bits / weight)")):
        a.set_xticks(range(len(targets)), targets)
        a.set_title(title, fontsize=10)
        a.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, 100)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=len(methods) + 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict], out: Path, protocol: dict) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(
        json.dumps({"protocol": protocol, "rows": rows, "summary": summarize(rows)}, indent=2)
    )
    (out / "results.md").write_text(summary_table(rows) + "\n\n" + markdown_table(rows) + "\n")
    plot(rows, out / "results.png")


# ------------------------------------------------------------------------------------ ImageNet job files

IMAGENET_BASE = {
    "model": {"name": "resnet18", "pretrained": True},
    "data": {
        "kind": "ffcv",
        "train_path": "/data/imagenet/train_500_0.50_90.beton",
        "val_path": "/data/imagenet/val_500_0.50_90.beton",
        "batch_size": 250,
        "num_workers": 8,
    },
    "quant": {
        "init_bits": 10,
        "per_channel": True,
        "keep_first_conv": True,
        "keep_classifier": True,
        "keep_pointwise": True,
        "batchnorm": "keep",
        "calib_batches": 4,
    },
    "objective": {"distill": "jeffreys"},
    "schedule": {"mode": "absolute", "warmup_steps": 1000, "scale_t": 2.0, "anneal": 0.999},
    "optim": {"name": "radam", "lr": 3e-4},
    "train": {"epochs": 30, "patience": 0, "precision": "bf16", "channels_last": True},
    "ray": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8},
    "tracking": {"experiment": "compare-imagenet-resnet18"},
}


def imagenet_jobs() -> dict[str, dict]:
    """One complete job per method x target: the same recipe (the reference ImageNet set-up) for everyone."""
    import copy

    jobs = {}
    for method in METHODS:
        for w, a in TARGETS:
            if method in ONLY_AT and (w, a) not in ONLY_AT[method]:
                continue
            if method == "codeq" and w < 2:
                continue  # a 1-bit grid has no zero level to prune to
            job = {"name": f"compare-imagenet-resnet18-{method}-w{w}a{a}", **copy.deepcopy(IMAGENET_BASE)}
            job["quant"] = {"method": method, "target_w": w, "target_a": a, **job["quant"]}
            jobs[f"{method}_w{w}a{a}.yaml"] = job
    return jobs


def write_jobs(folder: Path) -> list[Path]:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    header = (
        "# Generated by benchmarks/compare_methods.py --write-jobs jobs/compare; edit the generator, not this file.\n"
        "# ImageNet ResNet-18 comparison: same FP model (timm pretrained), FFCV data, recipe and budget for every\n"
        "# method; stem conv and classifier FP, per-channel weights. Run: gdnsq train <this file>\n"
    )
    paths = []
    for name, job in imagenet_jobs().items():
        path = folder / name
        path.write_text(header + yaml.safe_dump(job, sort_keys=False))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/compare", help="output folder (teacher.pt, results.*)")
    p.add_argument("--epochs", type=int, default=8, help="QAT epochs of every run (8 = 432 steps, the middle budget)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (same for every run)")
    p.add_argument("--quick", action="store_true", help="reduced budget for 2 CPU cores: 3 epochs of 30 steps")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    p.add_argument("--targets", default="W4A4,W3A3,W2A2,W1A1", help="comma-separated subset of targets")
    p.add_argument("--seeds", type=int, default=1, help="runs per cell, seeds --seed .. --seed+N-1 (one teacher)")
    p.add_argument("--model", default=None, help="student/teacher model name for every run (default: the recipe's)")
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help="fixed FP teacher epochs (default: the recipe's train.teacher_epochs rule)",
    )
    p.add_argument("--retrain-teacher", action="store_true", help="train a new teacher even if out/teacher.pt exists")
    p.add_argument("--anneal", type=float, default=None, help="override schedule.anneal for every run")
    p.add_argument("--recipe", default=None, help="job YAML shared by every run (default: the packaged quick start)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides of the recipe for every run, e.g. schedule.scale_t=50",
    )
    p.add_argument("--seed", type=int, default=0, help="the teacher's seed, and the first run seed")
    p.add_argument(
        "--seed-list",
        default=None,
        metavar="S,S,...",
        help="run exactly these seeds (the teacher stays --seed's): finish the missing cells of an earlier run",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--write-jobs", default=None, metavar="DIR", help="only write the ImageNet job files to DIR")
    p.add_argument(
        "--record",
        default=str(provenance.RESULTS / "methods.csv"),
        metavar="CSV",
        help="append one row per finished run here (default: the committed results/methods.csv)",
    )
    p.add_argument("--no-record", action="store_true", help="append no rows (smoke runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.max_steps = 3, args.max_steps or 30
    try:
        args.run_seeds = (
            [int(s) for s in args.seed_list.split(",") if s.strip()]
            if args.seed_list is not None
            else list(range(args.seed, args.seed + args.seeds))
        )
    except ValueError:
        p.error(f"--seed-list: {args.seed_list!r} is not a comma-separated list of integers")
    if not args.run_seeds:
        p.error("--seed-list: no seed given")
    return args


def cache_bundled_data() -> None:
    """Decode the bundled digits once per process, not twice per run (the split is fixed and seeded)."""
    import functools

    from gdnsq.data import bundled

    if not hasattr(bundled.load_bundled, "cache_info"):
        bundled.load_bundled = functools.lru_cache(maxsize=1)(bundled.load_bundled)


def settings_of(args) -> str:
    """What this run changed from the shipped recipe besides method, target, epochs and seed ('' = none)."""
    parts = list(args.set)
    if args.recipe:
        parts.insert(0, f"recipe={args.recipe}")
    if args.anneal is not None:
        parts.append(f"schedule.anneal={args.anneal}")
    if args.max_steps:
        parts.append(f"train.max_steps_per_epoch={args.max_steps}")
    if args.teacher_epochs is not None:
        parts.append(f"teacher_epochs={args.teacher_epochs}")
    return " ".join(parts)


def record_row(args, row: dict, teacher: Path, stamp: dict) -> None:
    """Append a finished run to the committed CSV (results/methods.csv), with where it came from."""
    if args.no_record or row.get("status") != "ok":
        return
    provenance.record(
        "methods.csv",
        [
            {
                **row,
                **stamp,
                "teacher": f"harness:{provenance.digest(teacher)}",
                "teacher_top1": row["fp_top1"],
                "model": args.model or stamp["model"],
                "minutes": round(row["seconds"] / 60, 2),
            }
        ],
        Path(args.record),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from gdnsq.config import to_dict
    from gdnsq.errors import GdnsqError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.write_jobs:
        for path in write_jobs(Path(args.write_jobs)):
            print(path)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        unknown = sorted(set(methods) - set(METHODS) - set(PEERS))
        if unknown:
            raise GdnsqError(f"--methods: unknown {unknown[0]!r}; choose from {', '.join(METHODS + PEERS)}")
        if "brevitas" in methods:
            import brevitas_arm

            brevitas_arm.register()
    except GdnsqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stamp = {
        "date": provenance.today(),
        "commit": provenance.commit(),  # the code this process loaded, whatever HEAD does meanwhile
        "source": "measured",
        "command": provenance.command(["benchmarks/compare_methods.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": settings_of(args),
    }
    torch.set_num_threads(args.threads)
    cache_bundled_data()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = [tuple(int(v) for v in t.upper().lstrip("W").split("A")) for t in args.targets.split(",")]
    recipe = load_recipe(args)
    teacher = train_teacher(args, recipe, out)
    shared = to_dict(job_config(recipe, job_overrides(args, "gdnsq", (2, 2), str(teacher))))
    stamp["model"] = shared["model"]["name"]
    protocol = {
        "data": "bundled MNIST-5k (3500 train / 500 val / 1000 test)",
        "model": shared["model"]["name"],
        "seeds": args.run_seeds,
        "teacher": str(teacher),
        "teacher_epochs": args.teacher_epochs,
        "epochs": args.epochs,
        "max_steps_per_epoch": args.max_steps,
        "recipe_file": str(args.recipe or quickstart_path()),
        "overrides": args.set,
        "selection": "val ns_top1",
        "reported": "test top-1",
        "recipe": {k: shared[k] for k in ("quant", "objective", "schedule", "optim", "train")},
    }
    rows = []
    for target in targets:
        for method in methods:
            if method in ONLY_AT and target not in ONLY_AT[method]:
                continue
            for seed in args.run_seeds:
                rows.append(run_one(args, recipe, method, target, teacher, seed))
                record_row(args, rows[-1], teacher, stamp)
                write_results(rows, out, protocol)  # partial results survive an interrupted run
    print(markdown_table(rows))
    print()
    print(summary_table(rows))
    print(f"\nwritten: {out / 'results.csv'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
