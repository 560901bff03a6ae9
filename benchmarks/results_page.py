"""Build docs/results.md from the committed CSVs under results/ and nothing else.

    python benchmarks/results_page.py            # rewrite docs/results.md
    python benchmarks/results_page.py --check    # exit 1 if docs/results.md is not what the CSVs give

One table per question (the quick start's accuracy, the methods, mixed precision, speed, deployment, the
decisions), each with the command that reproduces it, read from the rows' ``command`` column. Means and
standard deviations are computed here from the per-seed rows; nothing is typed in. tests/test_results_page.py
fails when the page and the CSVs disagree.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

PAGE = provenance.ROOT / "docs" / "results.md"
TARGETS = ("W4A4", "W3A3", "W2A2", "W1A1")
# Issue 11's goals for the quick start: 3-seed mean gap to the FP teacher, in points.
GOALS = {"W4A4": -0.3, "W2A2": -1.0, "W1A1": -3.0}
QUICKSTART_STEPS = "2160"  # the shipped recipe's budget: 40 epochs of 54 steps
ARM_ORDER = ("gdnsq", "brevitas", "lsq", "pege", "codeq", "dorefa", "pact", "bnnpp")


def load(name: str, folder: Path = provenance.RESULTS) -> list[dict]:
    with open(folder / name, newline="") as f:
        return list(csv.DictReader(f))


def num(v: str) -> float:
    return float(v)


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: list[float]) -> str:
    m, sd = stats(values)
    return f"{m:.2f} ± {sd:.2f}" if len(values) > 1 else f"{m:.2f}"  # one seed has no spread to show


def difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """mean(a) − mean(b) and its standard error sqrt(sd_a²/n_a + sd_b²/n_b) (None unless both have 2+ seeds)."""
    (ma, sa), (mb, sb) = stats(a), stats(b)
    return ma - mb, (None if min(len(a), len(b)) < 2 else (sa**2 / len(a) + sb**2 / len(b)) ** 0.5)


def verdict(margin: float, se: float | None) -> str:
    if se is None:
        return "one seed"
    return "ahead" if margin > 2 * se else "behind" if margin < -2 * se else "level"


def seeds(rows: list[dict]) -> str:
    s = sorted({int(r["seed"]) for r in rows})
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 2 else ", ".join(map(str, s))


def whole_run(cmd: str, commands: set[str]) -> str:
    """A ``--seed-list`` command that finished the missing cells of a run in the same ``--out`` folder (same
    teacher.pt) is shown as that run: its one command reproduces every cell."""
    if "--seed-list" not in cmd:
        return cmd
    folder = re.search(r"--out (\S+)", cmd)
    for other in sorted(commands):
        if folder and "--seed-list" not in other and re.search(rf"--out {re.escape(folder[1])}(\s|$)", other):
            return other
    return cmd


def commands(rows: list[dict]) -> list[str]:
    """The rows' distinct commands; per-seed commands of one kind (``--train.seed 3``) shown once, seed as S."""
    out: dict[str, set[int]] = {}
    every = {r["command"] for r in rows}
    for r in rows:
        seed = r.get("seed", "")
        cmd = whole_run(r["command"], every)
        if seed and f"--train.seed {seed} " in cmd + " ":
            cmd = re.sub(rf"(--train\.seed |_s){seed}\b", r"\1S", cmd)
            out.setdefault(cmd, set()).add(int(seed))
        else:
            out.setdefault(cmd, set())
    lines = []
    for cmd, seen in out.items():
        lines.append(cmd if not seen else f"{cmd}  # S = {seeds([{'seed': s} for s in seen])}")
    return lines


def code_block(cmds: list[str]) -> list[str]:
    return ["```bash", *cmds, "```"]


def teacher_label(rows: list[dict]) -> str:
    t = {r["teacher_top1"] for r in rows}
    return f"{num(t.pop()):.2f} %" if len(t) == 1 else "per seed"


def newest_teacher(rows: list[dict]) -> str:
    """The teacher of the most recently dated rows (ties: the one with the most rows)."""
    by = defaultdict(list)
    for r in rows:
        by[r["teacher"]].append(r)
    return max(by, key=lambda t: (max(r["date"] for r in by[t]), len(by[t])))


# ------------------------------------------------------------------------------------ sections


def quickstart_section(methods: list[dict], quick: list[dict], speed: list[dict]) -> list[str]:
    out = [
        "## What the quick start gets",
        "",
        f"`gdnsq quickstart --target WxAy`: the bundled digits, the small CNN, {int(QUICKSTART_STEPS):,} QAT steps",
        "from an 8-bit start, distilled from an FP teacher (test top-1 %, mean ± sd over seeds; gap = quantized −",
        "FP, per seed, averaged). *Harness* rows are the quick start's recipe run by `benchmarks/compare_methods.py",
        "--epochs 40` against one saved teacher; *quick start* rows are `gdnsq quickstart` itself, each seed with",
        "its own in-run teacher.",
        "",
        "| target | how | seeds | top-1 | FP teacher | gap to FP | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    used = []
    for target in TARGETS:
        harness = [r for r in methods if r["method"] == "gdnsq" and r["steps"] == QUICKSTART_STEPS]
        harness = [r for r in harness if not r["settings"]]
        harness = [r for r in harness if r["target"] == target]
        if harness:
            t = newest_teacher(harness)
            harness = [r for r in harness if r["teacher"] == t]
        itself = [r for r in quick if r["target"] == target and not r["settings"]]
        for how, rows in (("harness", harness), ("quick start", itself)):
            if not rows:
                continue
            used += rows
            gaps = [num(r["top1"]) - num(r["teacher_top1"]) for r in rows]
            gap = statistics.fmean(gaps)
            goal = GOALS.get(target)
            mark = "–" if goal is None else f"≥ {goal:+.1f} {'✓' if gap >= goal else '✗'}"
            fp = teacher_label(rows) if how == "harness" else f"{pm([num(r['teacher_top1']) for r in rows])}"
            out.append(
                f"| **{target}** | {how} | {seeds(rows)} | {pm([num(r['top1']) for r in rows])} | {fp} | "
                f"**{gap:+.2f}** | {mark} |"
            )
    wall = [r for r in speed if r["benchmark"] == "make_quickstart" and "quick start" in r["variant"]]
    took = f" (`make quickstart` end to end: {num(wall[-1]['value']):g} {wall[-1]['unit']}, {wall[-1]['load']})"
    out += ["", f"Reproduce one seed: `gdnsq quickstart --target W2A2`{took if wall else ''}; the rows above:", ""]
    return out + code_block(commands(used)) + [""]


def methods_section(methods: list[dict]) -> list[str]:
    plain = [r for r in methods if not r["settings"] and r["source"] == "measured"]
    if not plain:
        return []
    teacher = max({r["teacher"] for r in plain}, key=lambda t: len({r["method"] for r in plain if r["teacher"] == t}))
    rows = [r for r in plain if r["teacher"] == teacher]
    cols = sorted({(r["steps"], r["target"]) for r in rows}, key=lambda c: (int(c[0]), TARGETS.index(c[1])))
    arms = [a for a in ARM_ORDER if any(r["method"] == a for r in rows)]
    cell = defaultdict(list)
    for r in rows:
        cell[(r["method"], r["steps"], r["target"])].append(r)
    out = [
        "## GDNSQ against the field",
        "",
        "Every method on the same data, the same saved FP teacher (`benchmarks/compare_methods.py`; test top-1",
        f"{teacher_label(rows)}, `{teacher}`), the quick start's recipe and the same steps; only the quantizers",
        "differ (`gdnsq/quant/zoo/`, and Brevitas's own learned-scale, MSE-initialised quantizers at the same",
        "layers: `benchmarks/brevitas_arm.py`). Test top-1 %, mean ± sd over seeds "
        f"{seeds(rows)}; (n): a cell with another",
        "number of seeds; *: a run that did not converge. The last row is GDNSQ's margin over the best other arm",
        "of each column (mean − mean, ± the standard error of that difference from the two cells' seed spreads).",
        "",
        "| method | " + " | ".join(f"{t}, {int(s):,} steps" for s, t in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    n_main = statistics.mode(len(v) for v in cell.values())
    for arm in arms:
        cells = []
        for s, t in cols:
            rs = cell.get((arm, s, t))
            if not rs:
                cells.append("–")
                continue
            text = pm([num(r["top1"]) for r in rs])
            text += "" if len(rs) == n_main else f" ({len(rs)})"
            text += "" if all(r["converged"] == "True" for r in rs) else " *"
            cells.append(f"**{text}**" if arm == "gdnsq" else text)
        out.append(f"| {arm} | " + " | ".join(cells) + " |")
    margins, verdicts = [], defaultdict(list)
    for s, t in cols:
        g = cell.get(("gdnsq", s, t))
        others = {a: statistics.fmean(num(r["top1"]) for r in cell[(a, s, t)]) for a in arms if (a, s, t) in cell}
        others.pop("gdnsq", None)
        if not g or not others:
            margins.append("–")
            continue
        best = max(others, key=others.get)
        margin, se = difference([num(r["top1"]) for r in g], [num(r["top1"]) for r in cell[(best, s, t)]])
        margins.append(f"**{margin:+.2f}**" + ("" if se is None else f" ± {se:.2f}") + f" vs {best}")
        verdicts[verdict(margin, se)].append(f"{t} {int(s):,}")
    out.append("| GDNSQ − best other arm | " + " | ".join(margins) + " |")
    said = {"ahead": "ahead by more than two standard errors", "level": "level within two", "behind": "behind"}
    said["one seed"] = "not judged (one seed)"
    summary = " and ".join(f"{said[v]} ({', '.join(verdicts[v])} steps)" for v in said if verdicts[v])
    out += ["", f"Against the best other arm of each column, GDNSQ is {summary}.", "", "Reproduce:", ""]
    return out + code_block(commands(rows)) + [""]


def mixed_section(mixed: list[dict]) -> list[str]:
    def label(r):
        if r["arm"] != "mixed":
            return f"uniform {r['arm']} W{r['bits']}A{r['bits']}"
        what = "weights + inputs" if "act_budget" in r["settings"].split() else "weights only"
        frac = "" if num(r["fraction"]) == 1.0 else f", {num(r['fraction']):.0%} of the bytes"
        return f"mixed ({what}{frac})"

    def family(r):  # runs compared with each other: same teacher, width and recipe (act_budget is the arm's)
        return r["teacher"], r["bits"], " ".join(w for w in r["settings"].split() if w != "act_budget")

    out = [
        "## Mixed precision against uniform widths at equal bytes",
        "",
        "`benchmarks/mixed_vs_uniform.py`: the budget is the packed bytes of the uniform GDNSQ WkAk student;",
        "*mixed* learns each layer's weight width (and with `--act-budget` the inputs' widths, k bits per input",
        "element on average) within it. Digits CNN, "
        + " / ".join(f"{int(v):,}" for v in sorted({r["steps"] for r in mixed}, key=int))
        + " steps, test top-1 %, mean ± sd.",
        "",
        "| teacher | budget | recipe | arm | seeds | top-1 | mixed − best uniform |",
        "|---|---|---|---|---|---|---|",
    ]
    # Per budget width, the rows of the teacher with the most runs (arms x seeds): runs on different teachers
    # are not comparable, and one teacher per budget answers the question; the others' rows stay in the CSV.
    runs = Counter((r["bits"], r["teacher"]) for r in mixed)
    chosen = {bits: max((t for b, t in runs if b == bits), key=lambda t: runs[bits, t]) for bits, _ in runs}
    mixed = [r for r in mixed if r["teacher"] == chosen[r["bits"]]]
    groups = defaultdict(list)
    for r in mixed:
        groups[family(r)].append(r)
    newest_first = sorted(groups.items(), key=lambda kv: (max(r["date"] for r in kv[1]), -int(kv[0][1])), reverse=True)
    for (_, bits, recipe), rs in newest_first:
        arms = defaultdict(list)
        for r in rs:
            arms[label(r)].append(r)
        uniform = [stats([num(r["top1"]) for r in a])[0] for k, a in arms.items() if k.startswith("uniform")]
        for name, a in sorted(arms.items(), key=lambda kv: (not kv[0].startswith("mixed"), kv[0])):
            delta = ""
            if name.startswith("mixed") and uniform:
                delta = f"**{stats([num(r['top1']) for r in a])[0] - max(uniform):+.2f}**"
            out.append(
                f"| {teacher_label(a)} | W{bits} bytes | {recipe or 'shipped'} | {name} | {seeds(a)} | "
                f"{pm([num(r['top1']) for r in a])} | {delta} |"
            )
    out += [
        "",
        "Per budget, the teacher with the most runs; the other teachers' rows are in `results/mixed.csv`.",
        "Reproduce (one folder per seed set; `--report` prints the tables of a folder again):",
        "",
    ]
    return out + code_block(commands(mixed)) + [""]


def robustness_section(rows: list[dict]) -> list[str]:
    out = [
        "## Robustness: shipped defaults on data gdnsq has never seen",
        "",
        "`benchmarks/robustness.py`: datasets built on the machine (bundled digits as an ImageFolder at several sizes,",
        "resolutions, grey/RGB, distorted; synthetic shapes) x models, each run with only the data flags. Teacher:",
        "the in-run FP teacher (val top-1); reference: the same model trained long (2,000 steps, one-cycle) on the",
        "same loaders (its row has target FP); quantized: val top-1 of the selected student. Means over the seeds.",
        "",
    ]
    if not rows:
        return out + ["No rows yet.", ""]
    all_rows = rows
    # A cell measured again (later code) replaces its earlier row on the page; the CSV keeps both.
    rows = list({(r["dataset"], r["model"], r["target"], r["seed"]): r for r in rows}.values())
    out += [
        "| dataset | model | target | seeds | teacher | reference | teacher - ref | quantized | quant - teacher "
        "| converged | optimizer | steps | minutes |",
        "|---" * 13 + "|",
    ]
    refs = {(r["dataset"], r["model"]): num(r["top1"]) for r in rows if r["target"] == "FP"}
    groups = defaultdict(list)
    for r in rows:
        if r["target"] != "FP":
            groups[(r["dataset"], r["model"], r["target"])].append(r)
    n_ok, worst = 0, 0.0
    for (dataset, model, target), rs in groups.items():
        teacher, top1 = (stats([num(r[k]) for r in rs])[0] for k in ("teacher_top1", "top1"))
        ref = refs.get((dataset, model))
        conv = all(r["converged"] == "True" for r in rs)
        n_ok, worst = n_ok + conv, max(worst, teacher - top1)
        out.append(
            f"| {dataset} | {model} | {target} | {seeds(rs)} | {teacher:.2f} | "
            f"{'not run' if ref is None else f'{ref:.2f}'} | {'' if ref is None else f'{teacher - ref:+.2f}'} | "
            f"{top1:.2f} | {top1 - teacher:+.2f} | {'yes' if conv else 'NO'} | {rs[-1]['optimizer']} | "
            f"{rs[-1]['steps']} | {sum(num(r['minutes']) for r in rs):.1f} |"
        )
    alone = sorted(set(refs) - {(d, m) for d, m, _ in groups})
    if alone:
        listed = "; ".join(f"{d} / {m} {refs[(d, m)]:.2f}" for d, m in alone)
        out += ["", f"References without quantized cells yet: {listed}."]
    out += [
        "",
        f"`defaults converged in {n_ok}/{len(groups)} cells, worst gap to teacher {worst:.1f} points`",
        "",
        "Done when (issue 27): every cell converges, every teacher within 2 points of its reference, W4A4 within 1",
        "point and W2A2 within 3 points of its teacher (2-seed means). Rows whose commit differs measured different",
        "code: the CSV's commit column says which; a cell measured again shows its latest row.",
        "",
    ]
    rows = all_rows
    return out + code_block(commands(rows)) + [""]


def speed_section(speed: list[dict]) -> list[str]:
    out = [
        "## Speed",
        "",
        "Measured on the shared 2-core CPU machine (indicative: the load is given); no GPU figures yet",
        "(`bash benchmarks/gpu_check.sh` produces them on one GPU).",
        "",
        "| benchmark | variant | metric | values (load) | date |",
        "|---|---|---|---|---|",
    ]
    groups = defaultdict(list)
    for r in speed:
        groups[(r["benchmark"], r["variant"], r["metric"])].append(r)
    for (bench, variant, metric), rs in groups.items():
        vals = ", ".join(f"{num(r['value']):g} {r['unit']}" + (f" ({r['load']})" if r["load"] else "") for r in rs)
        out.append(f"| {bench} | {variant} | {metric} | {vals} | {', '.join(sorted({r['date'] for r in rs}))} |")
    out += ["", "Reproduce:", ""]
    return out + code_block(commands(speed)) + [""]


def deployment_section(rows: list[dict]) -> list[str]:
    out = ["## Deployment", ""]
    if not rows:
        return out + ["No rows yet: `results/deployment.csv` has its columns and waits for the export benchmark.", ""]
    out += ["| model | method | target | format | runtime | device | top-1 | FP | bytes | ms |", "|---" * 10 + "|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['method']} | {r['target']} | {r['format']} | {r['runtime']} | {r['device']} | "
            f"{r['top1']} | {r['fp_top1']} | {r['bytes']} | {r['latency_ms']} |"
        )
    return out + ["", *code_block(commands(rows)), ""]


def decisions_section(rows: list[dict]) -> list[str]:
    out = [
        "## Decisions",
        "",
        "Options tried, what they measured against the run without them (test top-1 %, mean over the seeds given),",
        "and whether they ship. The commands are in `results/decisions.csv`.",
        "",
        "| option | setting | cell | before → with | kept | why |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        r = {k: v.replace("|", "\\|") for k, v in r.items()}  # a | inside a cell would split it
        out.append(
            f"| {r['option']} | `{r['setting']}` | {r['target']}, {int(r['steps']):,} steps, seeds {r['seeds']}"
            + (f", teacher {r['teacher_top1']}" if r["teacher_top1"] else "")
            + f" | {num(r['baseline']):.2f} → {num(r['measured']):.2f} "
            f"(**{num(r['delta']):+.2f}**) | {r['kept']} | {r['why']} |"
        )
    return out + [""]


HEADER = [
    "# Results",
    "",
    "<!-- Generated by benchmarks/results_page.py from results/*.csv; edit the CSVs or the script, not this file. -->",
    "",
    "Every number below is computed from a row of the CSVs under `results/` (one per question), and every row",
    "carries the commit, the command, the seed, the date and the FP teacher it was measured with. Older",
    "exploration (six passes, other teachers) is in [lab-notebook.md](lab-notebook.md); nothing here depends on it.",
    "",
]

FOOTER = [
    "## How these were measured",
    "",
    "- Data: the bundled MNIST-5k digits (3,500 train / 500 val / 1,000 test, fixed split), batch 64, 54 steps an",
    "  epoch; model `gdnsq_smallcnn` (FP stem conv and classifier, per-channel weights, per-tensor inputs).",
    "- Harness teacher: trained once per folder by `compare_methods.py` (seeded, to a validation plateau) and",
    "  passed to every run; `teacher` in a row is the SHA-256 prefix of its weights.",
    "- Selection on the validation split (`ns_top1`: non-converged runs count 0); test top-1 reported.",
    "- One torch thread per run, one run at a time, on a 2-core CPU shared with other work.",
    "- Migrated rows (`source` starts with `migrated:`) were read from the old page at the commit named; their",
    "  per-run files were not kept.",
    "",
]


def build(folder: Path = provenance.RESULTS) -> str:
    methods, quick = load("methods.csv", folder), load("quickstart.csv", folder)
    speed = load("speed.csv", folder)
    lines = HEADER + quickstart_section(methods, quick, speed) + methods_section(methods)
    lines += mixed_section(load("mixed.csv", folder)) + robustness_section(load("robustness.csv", folder))
    lines += speed_section(speed)
    lines += deployment_section(load("deployment.csv", folder)) + decisions_section(load("decisions.csv", folder))
    return "\n".join(lines + FOOTER)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from the CSVs' page")
    args = p.parse_args(argv)
    page = build()
    if args.check:
        same = PAGE.is_file() and PAGE.read_text() == page
        print("docs/results.md is up to date" if same else "docs/results.md differs: run benchmarks/results_page.py")
        return 0 if same else 1
    PAGE.write_text(page)
    print(f"written: {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
