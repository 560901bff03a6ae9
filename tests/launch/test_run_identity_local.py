"""Issue 12's two-run case, in-process (``--no-ray``): W1A1 then W3A3 in the same folder never hands back
W1A1 weights. Default names differ; a shared name refuses in one line; the same settings return the
finished run's summary without training; --fresh sets the old run aside; --resume needs the run."""

import json
import logging
import os

import pytest

from gdnsq.cli import main

SECRET_ENV = {
    "MLFLOW_TRACKING_PASSWORD": "mlflowPw-7f3Kq9Zr",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
}
CONFIG_TOKEN = "rayTok-9d8e7f6a5b"  # a token inside a config value (a harmless setting for --no-ray)
SHORT = [
    "--no-ray",
    "--train.epochs",
    "1",
    "--train.max_steps_per_epoch",
    "3",
    "--train.teacher_epochs",
    "1",
    "--quant.calib_batches",
    "1",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for key, value in SECRET_ENV.items():  # real-looking credentials in the environment: never logged
        monkeypatch.setenv(key, value)
    return tmp_path


def quickstart(target, *extra):
    return main(["quickstart", "--target", target, *SHORT, *extra])


@pytest.mark.timeout(600)
def test_second_target_in_the_same_folder_trains_its_own_run_or_refuses(in_tmp, capsys, caplog):
    caplog.set_level(logging.INFO, logger="gdnsq")
    assert (
        quickstart("W1A1", "--summary-json", "w1.json", "--ray.address", f"ray://alice:{CONFIG_TOKEN}@10.0.0.1:10001")
        == 0
    )
    assert quickstart("W3A3", "--summary-json", "w3.json") == 0
    w1, w3 = (json.loads((in_tmp / f).read_text()) for f in ("w1.json", "w3.json"))
    assert (w3["target_w"], w3["target_a"]) == (3.0, 3.0) and all(r["target_w"] == 3.0 for r in w3["layers"])
    assert w1["checkpoint"] != w3["checkpoint"] and len(os.listdir(in_tmp / "runs")) == 2
    # --no-ray tracks too: each run is its own finished MLflow run in the default local store
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{in_tmp / '.gdnsq' / 'mlflow.db'}")
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("gdnsq").experiment_id])}
    assert set(runs) == {w1["mlflow_run_id"], w3["mlflow_run_id"]}
    assert all(r.info.status == "FINISHED" and r.data.metrics["epoch"] == 1 for r in runs.values())
    assert runs[w3["mlflow_run_id"]].data.params["quant.target_w"] == "3"
    # no secret in the store (params, tags, artifacts: every byte under .gdnsq/), the logs or the output
    assert runs[w1["mlflow_run_id"]].data.params["ray.address"] == "ray://alice:***@10.0.0.1:10001"
    stored = b"".join(p.read_bytes() for p in (in_tmp / ".gdnsq").rglob("*") if p.is_file())
    out = capsys.readouterr()
    for secret in [*SECRET_ENV.values(), CONFIG_TOKEN]:
        assert secret.encode() not in stored and secret not in caplog.text + out.out + out.err, secret
    capsys.readouterr()

    # one shared name: the W1A1 run is not resumed as a W3A3 one
    (in_tmp / "runs" / "shared").symlink_to(os.path.dirname(w1["checkpoint"]))
    before = os.path.getmtime(w1["checkpoint"])
    assert quickstart("W3A3", "--name", "shared", "--summary-json", "bad.json") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gdnsq: error: name: run 'shared'")
    assert "quant.target_w 1 -> 3" in err and "--name NEW" in err and "--fresh" in err
    assert not (in_tmp / "bad.json").exists() and os.path.getmtime(w1["checkpoint"]) == before

    # the same settings again: the finished run says so and returns its summary, nothing trained
    caplog.set_level(logging.INFO, logger="gdnsq")
    caplog.clear()
    assert quickstart("W3A3", "--summary-json", "again.json") == 0
    assert "already finished" in caplog.text and "teacher" not in caplog.text
    assert json.loads((in_tmp / "again.json").read_text()) == w3

    # --fresh: the W1A1 run under the shared name is set aside (kept), and W3A3 trains there
    assert quickstart("W3A3", "--name", "shared", "--fresh", "--summary-json", "fresh.json") == 0
    assert json.loads((in_tmp / "fresh.json").read_text())["target_w"] == 3.0
    aside = [p for p in (in_tmp / "runs").iterdir() if p.name.startswith("shared.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint.pt").is_file()
    assert quickstart("W3A3", "--resume", "shared") == 0  # finished, same settings: its summary
    capsys.readouterr()
    assert quickstart("W1A1", "--resume", "nosuch") == 2
    assert capsys.readouterr().err.strip() == f"gdnsq: error: --resume: no run 'nosuch' under {in_tmp / 'runs'}"
