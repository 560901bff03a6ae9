"""What a newcomer trips on (issue 28, item 8): commands that name this install's gdnsq and Python, outputs as
readable as any other, sizes that say why they differ, and a smoke job that is plainly one."""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path

import torch

from gdnsq.cli import main
from gdnsq.cli.export import EXAMPLES
from gdnsq.config import JobConfig, ModelConfig, QuantConfig, load_config, to_dict
from gdnsq.launch import footer
from gdnsq.launch.storage import write_json_atomic
from gdnsq.training.surgery import build_student, calibrate_model

ROOT = Path(__file__).resolve().parents[2]


def test_readme_commands_call_the_installed_gdnsq():
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            assert not line.startswith("gdnsq "), f"not on PATH after make: {line}"
    assert "source .venv/bin/activate" in text


def test_the_footer_names_this_python_and_this_gdnsq(capsys):
    cfg = load_config(None, {"tracking.enabled": "false"})
    footer.footer(cfg, {"registered_model": "m-w2a2/3 (champion)"})
    load = next(line for line in capsys.readouterr().out.splitlines() if "load it" in line)
    assert f"{shlex.quote(sys.executable)} -c \"import gdnsq; m = gdnsq.load_model('m-w2a2@champion')\"" in load
    footer.footer(cfg, {"checkpoint": "/tmp/r/checkpoint.pt"})
    export = next(line for line in capsys.readouterr().out.splitlines() if "export it" in line)
    command = export.split("export it", 1)[1].split(" export ")[0].strip()
    assert command == "gdnsq" or shlex.split(command)[0] in (str(Path(sys.executable).parent / "gdnsq"), sys.executable)


def test_a_summary_file_is_written_like_any_other_output(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "out" / "quickstart.json", {"top1": 1.0})
        (tmp_path / "other.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "quickstart.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "other.txt").stat().st_mode & 0o777 == 0o644


def test_rays_token_warning_is_off_by_default_and_back_with_v():
    from gdnsq.launch.console import setup_logging

    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    try:
        setup_logging(0)
        assert not token.isEnabledFor(logging.WARNING)
        setup_logging(1)
        assert token.isEnabledFor(logging.WARNING)
    finally:
        token.setLevel(logging.NOTSET)


def test_the_smoke_job_says_so_and_registers_under_its_own_name():
    job = ROOT / "jobs" / "cpu_smallcnn_w2a2.yaml"
    assert job.read_text().startswith("# SMOKE TEST, not a result")
    smoke = load_config(job).tracking.registered_name
    from gdnsq.tracking.registry import registered_name

    quickstart = registered_name(load_config(ROOT / "gdnsq" / "configs" / "quickstart.yaml"))
    assert smoke == "gdnsq_smallcnn-w2a2-smoke" and smoke != quickstart


def _checkpoint(path: Path) -> Path:
    cfg = JobConfig(model=ModelConfig(name="gdnsq_smallcnn"), quant=QuantConfig(target_w=2, target_a=2))
    model = build_student(cfg, 10, 1)
    calibrate_model(model, [torch.randn(8, 1, 28, 28) for _ in range(2)], init_bits=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": to_dict(cfg), "engine": {"model": model.state_dict()}, "best": {"ns_top1": -1.0, "state": None}}
    torch.save(state, path)
    return path


def test_export_takes_a_run_folder_as_the_help_shows_and_says_why_sizes_differ(tmp_path, capsys):
    ray_run = tmp_path / "runs" / "r"  # Ray Train: checkpoint_<time>/checkpoint.pt, the latest is exported
    _checkpoint(ray_run / "checkpoint_2026-01-05_10-42-07.123456" / "checkpoint.pt")
    _checkpoint(ray_run / "checkpoint_2026-01-05_10-43-09.000001" / "checkpoint.pt")
    local_run = tmp_path / "runs" / "l"  # in-process: checkpoint.pt
    _checkpoint(local_run / "checkpoint.pt")
    sizes = {}
    for run in (ray_run, local_run):
        assert main(["export", str(run), "--out", str(tmp_path / "x" / run.name)]) == 0
        out = capsys.readouterr().out
        file_b, payload_b, rest_b = re.search(
            r"file ([\d,]+) B .*\n\s+= payload ([\d,]+) B .* \+ header and manifest ([\d,]+) B", out
        ).groups()
        file_b, payload_b, rest_b = (int(x.replace(",", "")) for x in (file_b, payload_b, rest_b))
        assert file_b == payload_b + rest_b and (tmp_path / "x" / run.name / "model.gdnsq").stat().st_size == file_b
        sizes[run.name] = payload_b
    assert sizes["r"] == sizes["l"]  # one model, one payload, whatever the path it came by
    assert re.search(r"runs/\S+/checkpoint_\d{4}-\d\d-\d\d_[\d.-]+/checkpoint\.pt", EXAMPLES)  # what Ray Train writes
