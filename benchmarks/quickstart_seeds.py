"""The quick start itself, per target and seed: ``gdnsq quickstart`` run as a user runs it, one row per run.

    python benchmarks/quickstart_seeds.py --targets W4A4,W3A3,W2A2,W1A1 --seeds 0,1,2
    python benchmarks/quickstart_seeds.py --targets W1A1 --seeds 0-5 -- --schedule.descent_end_a 0.3

Each run is ``python -m gdnsq.cli quickstart --target T --train.seed S --fresh --summary-json ...
--ray.address local`` in its own process (Ray and MLflow as the quick start has them; every seed trains its own
FP teacher in-run), then its summary becomes a row of ``results/quickstart.csv``: the command, commit, date,
seed, the in-run teacher's test top-1 and the quantized one, the gap, converged, steps and minutes. Arguments
after ``--`` go to every run (they are the row's ``settings``). Runs one after the other; a failed run is
reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    if "-" in text and "," not in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",") if v]


def run_one(target: str, seed: int, extra: list[str], out: Path, stamp: dict) -> dict | None:
    summary = out / f"{target}_s{seed}.json"
    cli = ["quickstart", "--target", target, "--train.seed", str(seed), "--fresh", "--summary-json", str(summary)]
    if "--no-ray" not in extra and "--ray.address" not in extra:
        # A fresh local Ray instance per run, as on a user's machine: never join a `ray start` cluster that
        # other work on a shared machine may have left running (and may stop mid-run). Numerics unchanged.
        cli += ["--ray.address", "local"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gdnsq.cli", *cli, *extra], cwd=provenance.ROOT)
    minutes = (time.perf_counter() - t0) / 60
    if done.returncode != 0 or not summary.is_file():
        print(f"{target} seed {seed}: failed (exit {done.returncode}); no row", file=sys.stderr)
        return None
    s = json.loads(summary.read_text())
    return {
        **stamp,
        "command": shlex.join(["gdnsq", *cli, *extra]),
        "target": target,
        "seed": seed,
        "settings": " ".join(extra),
        "teacher": f"in-run, seed {seed}",
        "teacher_top1": s["fp_top1"],
        "top1": s["top1"],
        "gap": round(s["top1"] - s["fp_top1"], 2),
        "converged": s["converged"],
        "steps": s["steps"],
        "minutes": round(minutes, 2),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="W4A4,W3A3,W2A2,W1A1")
    p.add_argument("--seeds", default="0,1,2", help="comma list or a range like 0-5")
    p.add_argument("--out", default="out/quickstart", help="folder for the runs' summary JSON files")
    p.add_argument("--record", default=str(provenance.RESULTS / "quickstart.csv"), metavar="CSV")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"date": provenance.today(), "commit": provenance.commit(), "source": "measured"}
    for target in args.targets.split(","):
        for seed in parse_seeds(args.seeds):
            row = run_one(target.strip().upper(), seed, extra, out, stamp)
            if row is None:
                continue
            print(f"{row['target']} seed {seed}: top-1 {row['top1']} (FP {row['teacher_top1']}, gap {row['gap']:+.2f})")
            if not args.no_record:
                provenance.record("quickstart.csv", [row], Path(args.record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
