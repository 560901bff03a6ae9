"""`gdnsq export` and `gdnsq models pull` write into --out: a file there, a file above it, a folder that refuses
writes, or an export that fails half-way is one line and exit 2, and leaves no folder it made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gdnsq.cli import main
from gdnsq.config import JobConfig, ModelConfig, QuantConfig, to_dict
from gdnsq.training.surgery import build_student, calibrate_model

UNWRITABLE = Path("/sys/gdnsq-out")  # sysfs takes no new entries, even from root (chmod does not stop root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = JobConfig(model=ModelConfig(name="gdnsq_smallcnn"), quant=QuantConfig(target_w=2, target_a=2))
    model = build_student(cfg, 10, 1)
    calibrate_model(model, [torch.randn(8, 1, 28, 28) for _ in range(2)], init_bits=2)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save(
        {"config": to_dict(cfg), "engine": {"model": model.state_dict()}, "best": {"ns_top1": -1.0, "state": None}},
        path,
    )
    return path


def _fails(argv: list[str], capsys, says: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gdnsq: error: --out: ") and says in err, err
    return err


def test_export_onto_a_file_or_under_one_is_one_line(checkpoint, tmp_path, capsys):
    target = tmp_path / "model.gdnsq"
    target.write_bytes(b"something the user keeps")
    _fails(["export", str(checkpoint), "--out", str(target)], capsys, "is a file, not a folder")
    _fails(["export", str(checkpoint), "--out", str(target / "sub")], capsys, "which is not a folder")
    assert target.read_bytes() == b"something the user keeps"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="no sysfs here")
def test_export_into_a_folder_that_refuses_writes_is_one_line(checkpoint, capsys):
    _fails(["export", str(checkpoint), "--out", str(UNWRITABLE)], capsys, "cannot write")
    _fails(["export", str(checkpoint), "--out", "/sys"], capsys, "cannot write into /sys (")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_export_into_a_read_only_folder_is_one_line(checkpoint, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _fails(["export", str(checkpoint), "--out", str(folder)], capsys, "Permission denied")
    finally:
        folder.chmod(0o755)


def test_a_failed_export_leaves_no_folder_it_made(checkpoint, tmp_path, capsys):
    out = tmp_path / "new" / "export"
    assert main(["export", str(checkpoint), "--out", str(out), "--onnx", "--opset", "7"]) == 2  # QDQ needs >= 13
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert (out / "model.gdnsq").is_file() and (out / "report.json").is_file()


def test_pull_checks_its_folder_before_the_store_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_registered_models()  # an empty store, created here
    capsys.readouterr()  # MLflow's own lines about creating that store (INFO when no gdnsq command ran before)
    target = tmp_path / "file"
    target.write_text("keep")
    base = ["models", "pull", "nosuch/1", "--tracking-uri", uri, "--out"]
    _fails([*base, str(target)], capsys, "is a file, not a folder")
    _fails([*base, str(target / "x")], capsys, "which is not a folder")
    if Path("/sys").is_dir():
        _fails([*base, str(UNWRITABLE)], capsys, "cannot write")
    assert main([*base, str(tmp_path / "new" / "model")]) == 2  # the reference is unknown
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and target.read_text() == "keep"


@pytest.mark.parametrize("flag, value", [("--input-size", "0"), ("--input-size", "100000"), ("--batch", "0")])
def test_export_sizes_are_checked(checkpoint, tmp_path, capsys, flag, value):
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gdnsq: error: {flag}: must be")
    assert not (tmp_path / "out").exists()
