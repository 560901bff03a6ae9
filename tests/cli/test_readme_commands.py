"""Every command README.md shows runs as written (with short settings), so the README cannot rot.

In a temporary folder with ``jobs/`` linked in and a ``gdnsq`` (and ``.venv/bin/gdnsq``) that runs this
checkout, each ``bash`` line of the README runs through bash:

* the Makefile's quick start first, through Ray (short: 1 epoch of 3 steps): its captured output must
  hold no Ray result dicts, no ANSI codes and no duplicate lines, and stay short;
* the other training commands with ``--no-ray`` and the same short settings;
* cluster commands that need a cluster (``submit``, ``jobs``, ``sweep``, ``data write``) are validated
  here instead: ``submit --dry-run`` and ``sweep``'s plan check read the real job files, the others must
  parse;
* the registry commands against the quick start's local store, after registering its student (a
  3-step run does not converge, so the test marks it converged to get a registry entry), and once from
  an empty folder with ``--tracking-uri``, which must create nothing there;
* the Python block that loads the registered model.

Total: ~3 minutes on 2 idle cores (most of it the Ray start and MLflow's model logging).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--train.epochs", "1", "--train.max_steps_per_epoch", "3", "--train.teacher_epochs", "1"]
NEEDS_CLUSTER = ("submit", "jobs", "sweep", "data")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def readme_commands() -> list[str]:
    """The command lines of README.md's bash blocks (comments dropped), plus the Makefile's quick start."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def quickstart_recipe() -> str:
    make = (ROOT / "Makefile").read_text()
    return re.search(r"^quickstart:.*\n\t(.+)$", make, flags=re.M).group(1).strip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "jobs").symlink_to(ROOT / "jobs")
    shim = f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gdnsq.cli "$@"\n'
    for folder in (d / "bin", d / ".venv" / "bin"):
        folder.mkdir(parents=True)
        (folder / "gdnsq").write_text(shim)
        (folder / "gdnsq").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("GDNSQ_")}
    env.update(PATH=f"{d / 'bin'}{os.pathsep}{env['PATH']}", PYTHONPATH=str(ROOT))
    return d, env


def sh(command: str, cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{command}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r


def test_readme_lists_what_this_test_runs():
    cmds = readme_commands()
    assert any(c.startswith("make quickstart") for c in cmds)
    words = {shlex.split(c)[1] for c in cmds if c.split()[0].endswith("gdnsq")}
    assert {"quickstart", "train", "config", "submit", "jobs", "sweep", "data", "models", "export"} <= words


@pytest.mark.timeout(1800)
def test_every_readme_command_runs(workdir):
    d, env = workdir
    # 1. The quick start as `make quickstart` runs it, through Ray, output captured as in a log file.
    qs = quickstart_recipe().replace(".venv/bin/gdnsq", "gdnsq")
    r = sh(f"{qs} {shlex.join(SHORT)} --tracking.registered_name gdnsq_smallcnn-w2a2", d, env)
    out = r.stdout + r.stderr
    assert not ANSI.search(out), "ANSI codes in a redirected log"
    assert "Reporting training result" not in out and "metrics={" not in out and "TrainingReport" not in out
    assert "Checkpoint successfully created" not in out and "Downloading artifacts" not in out
    assert "(RayTrainWorker pid=" not in out
    assert "Token authentication is enabled" not in out  # Ray's own warning, back with -v
    assert (d / "out" / "quickstart.json").stat().st_mode & 0o777 == 0o666 & ~_umask()  # as any other output
    lines = [line for line in out.splitlines() if line.strip()]
    epoch_lines = [line for line in lines if line.startswith("epoch 1/1")]
    assert len(epoch_lines) == 1, epoch_lines  # once: no duplicated worker output
    assert len(lines) <= 40, "\n".join(lines)
    for word in (
        "gdnsq run gdnsq_smallcnn-w2a2-",
        "  run       new",
        "  tracking  sqlite:///",
        "quantized top-1",
        "  checkpoint ",
        "  MLflow UI   mlflow ui --backend-store-uri sqlite:///",
    ):
        assert word in out, word

    # The registry commands need a registered student: the run registered itself if it converged;
    # otherwise register its checkpoint as if it had.
    summary = json.loads((d / "out" / "quickstart.json").read_text())
    if not summary.get("registered_model"):
        _register(d, summary)
    assert summary.get("registered_model", "gdnsq_smallcnn-w2a2/1 (champion)") == "gdnsq_smallcnn-w2a2/1 (champion)"

    # 2. Every other README command.
    for command in readme_commands():
        argv = shlex.split(command)
        if argv[0] == "make" or argv[:2] == ["gdnsq", "quickstart"] and argv[2:] == []:
            continue
        if argv[0] not in ("gdnsq", ".venv/bin/gdnsq"):
            raise AssertionError(f"README command not covered by this test: {command}")
        sub = argv[1]
        if sub in ("quickstart", "train"):
            sh(f"{command} --no-ray {shlex.join(SHORT)}", d, env)
        elif sub in NEEDS_CLUSTER:
            _validate_cluster_command(argv, d, env)
        else:
            sh(command, d, env)
    assert (d / "out" / "model" / "manifest.json").is_file() and (d / "out" / "export" / "model.onnx").is_file()

    # 3. The registry from an empty folder: it lists the champion with its sizes and creates nothing there.
    empty = d / "empty"
    empty.mkdir()
    uri = f"sqlite:///{d / '.gdnsq' / 'mlflow.db'}"
    listed = sh(f"gdnsq models list --tracking-uri {uri}", empty, env).stdout
    assert "gdnsq_smallcnn-w2a2" in listed and "champion=1" in listed and " B " in listed, listed
    pulled = sh(f"MLFLOW_TRACKING_URI={uri} gdnsq models pull models:/gdnsq_smallcnn-w2a2/latest --out m", empty, env)
    assert f"into {empty / 'm'}" in pulled.stdout
    assert sorted(p.name for p in empty.iterdir()) == ["m"]

    # 4. The Python block that loads the registered model.
    code = re.search(r"```python\n(from gdnsq import load_model.*?)```", (ROOT / "README.md").read_text(), re.S)
    sh(f"{shlex.quote(sys.executable)} -c {shlex.quote(code.group(1))}", d, env)


def _register(d: Path, summary: dict) -> None:
    from gdnsq.config import load_config
    from gdnsq.launch.register import register_checkpoint
    from gdnsq.training.checkpoint import load_checkpoint

    cfg = load_config(
        ROOT / "gdnsq" / "configs" / "quickstart.yaml",
        {"tracking.uri": f"sqlite:///{d / '.gdnsq' / 'mlflow.db'}", "tracking.registered_name": "gdnsq_smallcnn-w2a2"},
    )
    ckpt = Path(summary["checkpoint"])
    state = load_checkpoint(ckpt / "checkpoint.pt" if ckpt.is_dir() else ckpt)
    ref = register_checkpoint(cfg, state, {**summary, "converged": True}, summary["mlflow_run_id"], what="readme")
    assert ref == "gdnsq_smallcnn-w2a2/1 (champion)"


def _validate_cluster_command(argv: list[str], d: Path, env: dict) -> None:
    from gdnsq.cli.main import build_parser

    argv = [a for a in argv if a != "--follow"]
    args, extra = build_parser().parse_known_args(argv[1:])
    assert not extra or argv[1] in ("submit", "sweep"), argv
    if argv[1] == "submit":
        i = argv.index("--address")
        r = sh(shlex.join(argv[:i] + argv[i + 2 :] + ["--dry-run"]), d, env)
        assert json.loads(r.stdout)["entrypoint"].startswith("gdnsq train ")
    elif argv[1] == "sweep":
        from gdnsq.launch.sweep.plan import load_sweep

        load_sweep(d / argv[2])


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
