"""The method harness's seed selection: --seed-list finishes an interrupted run's cells on the same teacher."""

from __future__ import annotations

import csv

import pytest
from benchmark_modules import load


def test_run_seeds_follow_seed_and_seeds_unless_a_list_is_given():
    compare = load("compare_methods")
    assert compare.parse_args(["--seed", "4", "--seeds", "3"]).run_seeds == [4, 5, 6]
    assert compare.parse_args(["--seed", "4", "--seed-list", "1,7"]).run_seeds == [1, 7]


@pytest.mark.parametrize("bad", ["1,x", ","])
def test_a_bad_seed_list_is_a_usage_error(bad, capsys):
    compare = load("compare_methods")
    with pytest.raises(SystemExit) as e:
        compare.parse_args(["--seed-list", bad])
    assert e.value.code == 2 and "--seed-list" in capsys.readouterr().err


def test_seed_list_runs_exactly_those_seeds_against_the_folder_teacher(tmp_path):
    compare, provenance = load("compare_methods"), load("provenance")
    out, record = tmp_path / "run", tmp_path / "methods.csv"
    tiny = ["--out", str(out), "--methods", "lsq", "--targets", "W2A2", "--epochs", "1", "--max-steps", "2"]
    tiny += ["--teacher-epochs", "1", "--record", str(record)]
    assert compare.main([*tiny, "--seeds", "1"]) == 0  # the interrupted run: seed 0 only, teacher trained
    teacher = provenance.digest(out / "teacher.pt")
    assert compare.main([*tiny, "--seed-list", "2,1"]) == 0  # its missing cells, in the same folder
    with open(record, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["0", "2", "1"]
    assert {r["teacher"] for r in rows} == {f"harness:{teacher}"}
    assert provenance.digest(out / "teacher.pt") == teacher  # reused, not retrained with another seed
    assert "--seed-list 2,1" in rows[-1]["command"]
