"""What every benchmark row records about where it came from, and appending rows to the committed CSVs.

A row is evidence only if it says which code measured it (``commit``: the short hash, ``-dirty`` when tracked
files outside ``results/`` differ from it), how (``command``: the exact command line), when (``date``) and,
for accuracy rows, against which teacher (``teacher``: a digest of the teacher's weights, ``teacher_top1``).
The CSVs live under ``results/`` and are committed; ``docs/results.md`` is generated from them
(``benchmarks/results_page.py``).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
NOT_CODE = (":!results", ":!docs", ":!*.md", ":!tests")  # git pathspecs that never change a measurement


def commit() -> str:
    """``git rev-parse --short HEAD``, plus ``-dirty`` when tracked files that can change a measurement differ
    from it (results/, docs, Markdown and tests excepted: the harness's own rows and the page generated from
    them must not mark the next row dirty); ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this benchmark, as a user would type it from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv[1:]])


def today() -> str:
    return datetime.date.today().isoformat()


def digest(path: Path) -> str:
    """First 10 hex digits of the file's SHA-256: the teacher's identity across folders and machines."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def append_rows(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written if the file is new). A file whose header differs
    from ``columns`` is an error: rows must not land under the wrong column names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != tuple(columns):
            raise ValueError(f"{path}: header {header} is not {list(columns)}")
        mode = "a"
    else:
        mode = "w"
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)


# The committed CSVs, one per question, and their columns (benchmarks/results_page.py reads them; the test
# tests/test_results_page.py checks every file against this table). Every row carries date, commit, source
# (``measured`` or where a migrated number was read) and command; accuracy rows the teacher and the seed.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "methods.csv": tuple(
        "date commit source command teacher teacher_top1 model method target steps seed settings top1 "
        "converged full_levels avg_bits_w avg_bits_a entropy_bits_w sparsity_w ns_top1 val_top1 "
        "best_epoch descent_end minutes".split()
    ),
    "quickstart.csv": tuple(
        "date commit source command target seed settings teacher teacher_top1 top1 gap converged steps minutes".split()
    ),
    "mixed.csv": tuple(
        "date commit source command teacher teacher_top1 model arm bits fraction seed settings "
        "budget_bytes bytes top1 converged ns_top1 layer_bits steps minutes".split()
    ),
    "speed.csv": tuple(
        "date commit source command benchmark machine load variant metric value unit seed notes".split()
    ),
    "deployment.csv": tuple(
        "date commit source command teacher teacher_top1 model method target seed format runtime device "
        "top1 fp_top1 bytes latency_ms notes".split()
    ),
    "decisions.csv": tuple(
        "option setting target steps seeds teacher teacher_top1 baseline measured delta kept why date "
        "commit source command".split()
    ),
}


def record(name: str, rows: list[dict], path: Path | None = None) -> Path:
    """Append ``rows`` to results/``name`` (or ``path``) under that file's schema; returns the path."""
    path = Path(path) if path is not None else RESULTS / name
    append_rows(path, SCHEMAS[name], rows)
    return path
