"""`--dry-run`: every check a run makes before its executor starts, and nothing else (no training, no Ray, no
folder, no MLflow store)."""

from __future__ import annotations

import pytest

from gdnsq.cli import main
from gdnsq.config import load_config, to_dict
from gdnsq.training.checkpoint import save_checkpoint


def test_a_dry_run_reports_its_checks_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--dry-run", "--name", "dry", "--data.batch_size", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gdnsq run dry: gdnsq_smallcnn -> W2A2 (gdnsq), 40 epochs, Ray Train")
    assert "  data: 3,500 training / 500 validation samples, 10 classes" in out
    assert f"  storage: {tmp_path / 'runs' / 'dry'} (new)" in out
    assert out[-1].endswith("nothing trained: --dry-run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fresh, says", [(False, "quant.target_w 1 -> 2"), (True, None)])
def test_a_dry_run_checks_the_stored_run_as_a_run_would(tmp_path, capsys, fresh, says):
    stored = to_dict(load_config(None, {"name": "r", "quant.target_w": 1, "quant.target_a": 1}))
    save_checkpoint({"config": stored, "engine": {"epoch": 1, "model": {}}}, tmp_path / "runs" / "r" / "checkpoint.pt")
    before = sorted(p.name for p in (tmp_path / "runs").rglob("*"))
    argv = ["quickstart", "--no-ray", "--dry-run", "--name", "r", "--ray.storage_path", str(tmp_path / "runs")]
    rc = main(argv + (["--fresh"] if fresh else []))
    captured = capsys.readouterr()
    if says:
        assert rc == 2 and captured.err.count("\n") == 1 and says in captured.err
    else:
        assert rc == 0 and "(set aside by --fresh, then new)" in captured.out
    assert sorted(p.name for p in (tmp_path / "runs").rglob("*")) == before  # --fresh moves nothing in a dry run
    assert main(["quickstart", "--dry-run", "--resume", "nosuch", "--ray.storage_path", str(tmp_path / "runs")]) == 2
    assert "--resume: no run 'nosuch'" in capsys.readouterr().err
