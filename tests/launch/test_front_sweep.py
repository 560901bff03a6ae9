"""The front from one sweep: ``gdnsq sweep`` over byte budgets on real local Ray and a real ``mlflow server``.

Four budgets on the shipped CPU front sweep (jobs/cpu_smallcnn_mixed_front_sweep.yaml), one epoch of 3 steps each,
the FP teacher of tests/launch/conftest.py, activations bounded at 8 bits. So short a plan calibrates each student
just above the whole width k of its budget's uniform equivalent (the budgets sit between uniform widths, so k is
clear), and learning rates of ~0 keep it there: 5,620 + 2,144·k bytes. The budget of 7,000 bytes is below the
1-bit student's 7,764, so that trial cannot converge: the smallest point, never on the front, never registered.
Measured with five budgets on this 2-core box (load average 5-7 from other work): 3.5-4 minutes, ~280-330
CPU-seconds; four budgets save one round of trials. Each trial's
Ray Train run (controller, worker, synchronization, dataset and preemption actors, each a fresh process) takes
~40 s of wall time before its MLflow run starts and ~5 s after; the four registrations ~4.6 s each.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("ray.tune")

from mlflow_server import MlflowServer
from ray_cluster import LocalCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[2]
FRONT_FILE = ROOT / "jobs" / "cpu_smallcnn_mixed_front_sweep.yaml"
# bytes: infeasible, then uniform W1.5, W2.5, W3.5 (four trials = two rounds of two; the shipped file has six)
BUDGETS = [7000, 8836, 10980, 13124]
NAME = "front-model"


def non_dominated(rows: list[dict], cost: str) -> set[str]:
    """The test's own front: converged trials that no other converged trial beats (>= top-1, <= cost, one strict)."""
    pts = [
        (float(r["test_top1"]), float(r[cost]), r["trial_id"])
        for r in rows
        if r["test_converged"] == "True" and r[cost] not in ("", None)
    ]
    return {t for a, c, t in pts if not any(a2 >= a and c2 <= c and (a2 > a or c2 < c) for a2, c2, _ in pts)}


@pytest.mark.timeout(600)
def test_budget_sweep_logs_the_front_and_tags_its_versions(teacher, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from gdnsq.cli.main import main

    monkeypatch.setenv("GDNSQ_OUTBOX_DIR", str(tmp_path / "outbox"))
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        with LocalCluster(nodes=1, cpus_per_node=3) as cluster:
            cluster.connect()
            over = {
                "model.checkpoint": teacher,
                "ray.address": cluster.address,
                "ray.storage_path": str(tmp_path / "runs"),
                "train.epochs": "1",
                "train.max_steps_per_epoch": "3",
                "quant.calib_batches": "1",
                "quant.target_a": "8",
                # Learning rates ~0: each student stays where calibration put it (the front's machinery is under
                # test, not the descent; 3 steps at the planned quantizer LR moved bits across widths).
                "optim.lr": "1e-9",
                "optim.quant_lr": "1e-9",
                # The penalty allocation: with lr ~0 the probe's per-layer widths could never be reached.
                "quant.budget.allocate": "penalty",
                "tracking.uri": server.url,
                "tracking.experiment": "front-tests",
                "tracking.registered_name": NAME,
                "sweep.name": "front",
                "sweep.max_concurrent_trials": "2",
                "sweep.space": json.dumps({"quant.budget.value": {"grid": BUDGETS}}),
            }
            argv = ["sweep", str(FRONT_FILE), "--summary-json", str(tmp_path / "summary.json")]
            for k, v in over.items():
                argv += [f"--{k}", v]
            assert main(argv) == 0
        out = capsys.readouterr().out
        summary = json.loads((tmp_path / "summary.json").read_text())
        trials = {t["trial_id"]: t for t in summary["trials"]}
        assert len(trials) == len(BUDGETS) and summary["counts"]["completed"] == len(BUDGETS), summary["counts"]
        by_budget = {t["params"]["quant.budget.value"]: t for t in trials.values()}
        assert not by_budget[7000]["test_converged"] and by_budget[7000]["bytes_payload"] >= 7764
        converged = [t for t in trials.values() if t["test_converged"]]
        assert len(converged) >= 3 and len({t["bytes_payload"] for t in converged}) >= 3
        assert all(t["bytes_payload"] <= t["params"]["quant.budget.value"] for t in converged)

        # The front's files on the sweep's parent run: CSV (every trial with size figures) and PNG.
        client = MlflowClient(server.url)
        parent = summary["parent_run_id"]
        assert {"pareto_front.csv", "pareto_front.png"} <= {a.path for a in client.list_artifacts(parent)}
        local = client.download_artifacts(parent, "pareto_front.csv", str(tmp_path / "dl"))
        rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
        assert {r["trial_id"] for r in rows} == set(trials)
        assert Path(client.download_artifacts(parent, "pareto_front.png", str(tmp_path / "dl"))).stat().st_size > 1000
        for flag, cost in (("front_bytes", "bytes_payload"), ("front_bops", "bops")):
            front = {r["trial_id"] for r in rows if r[flag] == "True"}
            assert front and front == non_dominated(rows, cost), (flag, rows)
            assert front == set(summary["front"][flag.removeprefix("front_")])
        front = {r["trial_id"] for r in rows if r["front_bytes"] == "True"}
        assert len(front) >= 2 and by_budget[7000]["trial_id"] not in front
        assert "front, test top-1 vs bytes: " in out
        assert client.get_run(parent).data.tags["gdnsq.pareto_front"] == ",".join(summary["front"]["bytes"])

        # Every converged trial is a registered version; the front's carry pareto_front=true, found by a tag filter.
        registered = {t["trial_id"]: t["registered"] for t in converged}
        assert all(registered.values()) and by_budget[7000]["registered"] is None
        found = client.search_model_versions(f"name='{NAME}' AND tags.pareto_front='true'")
        exp = client.get_experiment_by_name("front-tests")
        run_ids = {
            r.info.run_name: r.info.run_id
            for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
        }
        assert {v.run_id for v in found} == {run_ids[trials[t]["run_name"]] for t in front}
        assert {f"{NAME}/{v.version}" for v in found} == {registered[t].split()[0] for t in front}
        assert len(client.search_model_versions(f"name='{NAME}'")) == len(converged)
        csv_rows = {r["trial_id"]: r for r in rows}
        for v in found:
            t = next(t for t in front if registered[t].split()[0] == f"{NAME}/{v.version}")
            assert v.tags["sweep"] == "front" and v.tags["pareto_front_bytes"] == "true"
            assert (
                v.tags["budget_kind"] == "bytes"
                and float(v.tags["budget_value"]) == trials[t]["params"]["quant.budget.value"]
            )
            # the registry card's size figures are the exporter's, the same rule as the run summary's
            assert int(v.tags["bytes_payload"]) == int(csv_rows[t]["bytes_payload"])
            assert int(v.tags["bops"]) == int(csv_rows[t]["bops"])
            assert float(v.tags["top1"]) == float(csv_rows[t]["test_top1"])
            assert {"bytes_packed", "avg_bits_w"} <= set(v.tags)
    finally:
        server.kill()
