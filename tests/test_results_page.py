"""docs/results.md is what benchmarks/results_page.py builds from the committed CSVs, and every CSV has its columns."""

from __future__ import annotations

import csv
import shutil
import statistics
from pathlib import Path

import pytest
from benchmark_modules import ROOT, load

RESULTS = ROOT / "results"


page, provenance = load("results_page"), load("provenance")
ACCURACY = ("methods.csv", "quickstart.csv", "mixed.csv", "deployment.csv", "robustness.csv")


def rows(name: str) -> list[dict]:
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))


def test_the_page_is_what_the_csvs_give():
    expected = page.build()
    assert (ROOT / "docs" / "results.md").read_text() == expected, (
        "docs/results.md differs from the committed CSVs: run python benchmarks/results_page.py"
    )


@pytest.mark.parametrize("name", sorted(provenance.SCHEMAS))
def test_every_csv_has_its_columns_and_every_row_its_provenance(name):
    with open(RESULTS / name, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == provenance.SCHEMAS[name]
    for i, r in enumerate(rows(name), start=2):
        assert None not in r and all(v is not None for v in r.values()), f"{name}:{i}: wrong number of fields"
        for key in ("date", "commit", "source", "command"):
            assert r[key].strip(), f"{name}:{i}: empty {key}"
        if name in ACCURACY:
            for key in ("teacher", "teacher_top1", "seed", "top1"):
                assert r[key].strip(), f"{name}:{i}: empty {key}"
            assert 0.0 <= float(r["top1"]) <= 100.0


def test_no_results_csv_without_a_schema():
    assert {p.name for p in RESULTS.glob("*.csv")} == set(provenance.SCHEMAS)


def test_a_changed_row_changes_the_page(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    data = rows("methods.csv")
    data[0]["top1"] = str(float(data[0]["top1"]) - 10.0)
    with open(folder / "methods.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=provenance.SCHEMAS["methods.csv"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)
    assert page.build(folder) != page.build(RESULTS)


def test_rows_are_appended_under_the_files_own_header_only(tmp_path):
    path = tmp_path / "speed.csv"
    provenance.record("speed.csv", [{"date": "d", "value": 1}], path)
    provenance.record("speed.csv", [{"date": "e", "value": 2}], path)
    assert [r["value"] for r in csv.DictReader(open(path))] == ["1", "2"]
    with pytest.raises(ValueError, match="header"):
        provenance.record("mixed.csv", [{"date": "f"}], path)


def write_methods(folder: Path, data: list[dict]) -> None:
    with open(folder / "methods.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=provenance.SCHEMAS["methods.csv"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)


def margin_row(text: str) -> list[str]:
    line = next(li for li in text.splitlines() if li.startswith("| GDNSQ − best other arm |"))
    return [c.strip() for c in line.strip("|").split("|")[1:]]


def test_the_margin_is_over_the_best_other_arm_of_each_column(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    data = rows("methods.csv")
    cell = [r for r in data if r["method"] == "brevitas" and r["target"] == "W2A2" and r["steps"] == "432"]
    cell = [r for r in cell if not r["settings"] and r["source"] == "measured"]
    assert cell, "the method table has a Brevitas W2A2 432-step cell"
    before = margin_row(page.build(folder))[0]
    for r in cell:
        r["top1"] = "99.9"  # Brevitas now leads that column by far
    write_methods(folder, data)
    text = page.build(folder)
    after = margin_row(text)[0]
    assert after != before
    assert "behind (W2A2 432" in text and "behind (W2A2 432" not in page.build(RESULTS)  # the sentence follows
    gdnsq = [
        float(r["top1"])
        for r in data
        if r["method"] == "gdnsq"
        and (r["target"], r["steps"]) == ("W2A2", "432")
        and r["teacher"] == cell[0]["teacher"]
        and not r["settings"]
    ]
    mean, se = statistics.fmean(gdnsq) - 99.9, statistics.stdev(gdnsq) / len(gdnsq) ** 0.5  # Brevitas's sd is 0
    assert after == f"**{mean:+.2f}** ± {se:.2f} vs brevitas"  # a lead over GDNSQ: a negative margin


def test_a_seed_list_run_that_finished_a_folder_is_shown_as_that_folders_command():
    full = "python benchmarks/compare_methods.py --out out/x --epochs 40 --seeds 3 --methods gdnsq,lsq"
    rest = "python benchmarks/compare_methods.py --out out/x --epochs 40 --seed-list 1,2 --methods lsq"
    other = "python benchmarks/compare_methods.py --out out/x2 --epochs 40 --seed-list 1,2 --methods lsq"
    shown = page.commands([{"command": c, "seed": "0"} for c in (full, rest, other)])
    assert shown == [full, other]  # out/x2 is another folder (another teacher.pt): its command stays
