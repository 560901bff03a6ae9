"""benchmarks/robustness.py's bookkeeping: the order cells run in, and which rows a rerun may reuse."""

from __future__ import annotations

import csv
import subprocess

from benchmark_modules import ROOT, load

robustness = load("robustness")


def test_cheapest_cells_run_first_and_each_pair_has_one_reference():
    order = robustness.plan(robustness.FULL_DATASETS, robustness.FULL_MODELS, [4, 2], [0, 1])
    cost = [robustness.MODEL_COST[m] * d.cost for d, m, _, _ in order]
    assert cost == sorted(cost)
    assert order[0][1] == "gdnsq_smallcnn" and order[0][0].n_train == 500
    pairs = {(d.name, m) for d, m, _, _ in order}
    assert len(pairs) == len(robustness.FULL_DATASETS) * len(robustness.FULL_MODELS)
    assert sum(bits == "FP" for _, _, bits, _ in order) == len(pairs)
    assert len(order) == len(pairs) * (1 + 2 * 2)
    # Within a pair: the first seed of each target, the reference, then the other seed.
    assert [(b, s) for _, _, b, s in order[:5]] == [(4, 0), (2, 0), ("FP", 0), (4, 1), (2, 1)]


def _short(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_rerun_reuses_only_rows_of_the_same_clean_cell_code(tmp_path):
    head = _short("HEAD")
    # The commit before the last one that changed the package: its cell code differs from HEAD's.
    changed = subprocess.run(
        ["git", "log", "-n", "1", "--format=%h", "--", "gdnsq"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    older = _short(f"{changed}~1")
    assert robustness.same_code(head, head)
    assert not robustness.same_code(older, head)
    assert not robustness.same_code(head + "-dirty", head)
    assert not robustness.same_code(head, head + "-dirty")

    path = tmp_path / "robustness.csv"
    columns = robustness.provenance.SCHEMAS["robustness.csv"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        base = {"dataset": "digits-500-28px-grey", "model": "gdnsq_smallcnn", "seed": 0}
        w.writerow(base | {"commit": head, "target": "W4A4"})
        w.writerow(base | {"commit": older, "target": "W2A2"})
        w.writerow(base | {"commit": head + "-dirty", "target": "FP"})
    assert robustness.done_cells(path, head) == {("digits-500-28px-grey", "gdnsq_smallcnn", "W4A4", 0)}
    assert robustness.done_cells(path, head + "-dirty") == set()
    assert robustness.done_cells(tmp_path / "absent.csv", head) == set()


def test_the_table_counts_a_remeasured_cell_once_and_ends_with_the_verdict():
    row = {"dataset": "d", "model": "m", "target": "W4A4", "seed": "0", "teacher_top1": "90", "top1": "89"}
    rows = [
        row | {"converged": "False", "minutes": "1"},
        row | {"converged": "True", "top1": "88.5", "minutes": "2"},
        {"dataset": "d", "model": "m", "target": "FP", "seed": "0", "top1": "93"},
    ]
    lines = robustness.table(rows).splitlines()
    assert "| 90.00 | 93.00 | -3.00 | 88.50 | -1.50 | yes | 2.0 |" in lines[2]
    assert lines[-1] == "defaults converged in 1/1 cells, worst gap to teacher 1.5 points"


def test_a_subset_of_the_grid_is_named_and_an_unknown_name_is_one_line(capsys):
    datasets = robustness.pick(robustness.FULL_DATASETS, ["shapes-1000-32px-rgb"], lambda d: d.name, "--datasets")
    assert [d.name for d in datasets] == ["shapes-1000-32px-rgb"]
    assert robustness.main(["--models", "resnet10t,nonesuch", "--no-record"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("--models: unknown nonesuch")
