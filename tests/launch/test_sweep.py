"""Ray Tune sweeps (gdnsq.launch.sweep.tune) on a real local Ray cluster and a throwaway sqlite MLflow store.

One single-node cluster (3 logical CPUs: two 1-worker trials plus their drivers, with headroom)
serves the module. Trials are kept tiny: an FP teacher trained once in a fixture and passed as
``model.checkpoint``, 3 epochs of 3 steps, 8-bit targets. The deterministic part of the space is
``quant.init_bits``: students calibrated at 5 bits meet the 8-bit targets at once, students at 12
bits cannot come down 4 bits in 9 steps, so they never converge and their ns_top1 stays 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.tune")

from ray_cluster import LocalCluster  # noqa: E402

from gdnsq.errors import SweepError
from gdnsq.launch.sweep.plan import load_sweep  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[2]
SWEEP_FILE = ROOT / "jobs" / "cpu_smallcnn_sweep.yaml"
EPOCHS = 3


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(nodes=1, cpus_per_node=3) as c:
        c.connect()
        yield c


def settings(cluster: LocalCluster, tmp: Path, teacher: str, name: str, space: dict, **extra) -> dict[str, str]:
    """Dotted overrides (as the CLI passes them: strings) for a tiny sweep of the shipped CPU sweep file."""
    out = {
        "model.checkpoint": teacher,
        "ray.address": cluster.address,
        "ray.storage_path": str(tmp / "runs"),
        "train.epochs": str(EPOCHS),
        "train.max_steps_per_epoch": "3",
        "quant.calib_batches": "1",
        "quant.target_w": "8",
        "quant.target_a": "8",
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
        # The sweep machinery is under test, not the method: without the level guard a student calibrated
        # below its 8-bit target stays there (converged from step 0), while the guard would lift it to the
        # edge of 8 bits, where 9 steps of weight updates without penalty (warm-up) can push it to 9.
        "quant.level_guard": "false",
        "tracking.experiment": "sweep-tests",
        "tracking.registered_name": f"{name}-model",
        "sweep.name": name,
        "sweep.space": json.dumps(space),
    }
    out.update(extra)
    return out


def live_placement_groups() -> list[dict]:
    from ray.util.placement_group import placement_group_table

    return [p for p in placement_group_table().values() if p["state"] != "REMOVED"]


# ---------------------------------------------------------------------------------- ASHA + registry


@pytest.mark.timeout(900)
def test_asha_sweep_stops_weak_trials_and_registers_the_best(cluster, teacher, tmp_path, caplog):
    from mlflow import MlflowClient

    from gdnsq.launch.sweep.tune import run_sweep

    space = {"quant.init_bits": {"grid": [5, 12]}, "optim.lr": {"grid": [0.002, 0.001]}}
    over = settings(
        cluster,
        tmp_path,
        teacher,
        "asha",
        space,
        **{
            "sweep.max_concurrent_trials": "2",
            "sweep.scheduler": json.dumps({"type": "asha", "grace_period": 1, "reduction_factor": 2}),
        },
    )
    caplog.set_level(logging.INFO, logger="gdnsq")
    summary = run_sweep(SWEEP_FILE, over)

    trials = summary["trials"]
    assert len(trials) == 4 and summary["counts"]["error"] == 0, summary["counts"]
    # The grid runs init_bits 5 first; a 12-bit student (ns_top1 0) reaching the first rung after a
    # converged one is below the rung's median and ASHA stops it there.
    weak = [t for t in trials if t["params"]["quant.init_bits"] == 12]
    strong = [t for t in trials if t["params"]["quant.init_bits"] == 5]
    assert all(not t["converged"] and t["ns_top1"] == 0 for t in weak)
    assert all(t["converged"] and t["ns_top1"] > 0 for t in strong)
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped and all(t["status"] == "stopped" and t["epochs"] < EPOCHS for t in stopped)
    assert all(t["stopped_early"] and t["epochs"] == 1 for t in weak)
    for t in trials:
        if t["status"] == "completed":  # ran to the end: test-split summary written by the Train run
            assert t["epochs"] == EPOCHS and t["test_ns_top1"] is not None

    best = next(t for t in trials if t["best"])
    assert best["trial_id"] == summary["best_trial"] and best in strong
    assert best["score"] == max(t["score"] for t in trials)
    assert summary["registered_model"] == "asha-model/1 (champion)"

    # Files: table as CSV + JSON + PNG next to the experiment.
    for kind in ("csv", "json", "png"):
        assert Path(summary["files"][kind]).stat().st_size > 0
    assert len(Path(summary["files"]["csv"]).read_text().strip().splitlines()) == 5

    # MLflow: a parent run with the table, one nested run per trial, the champion from the best trial.
    client = MlflowClient(over["tracking.uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["gdnsq.best_trial"] == best["trial_id"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "sweep_summary.csv",
        "sweep_summary.json",
        "sweep_summary.png",
    }
    exp = client.get_experiment_by_name("sweep-tests")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {t["run_name"] for t in trials}
    for t in trials:
        run = by_name[t["run_name"]]
        assert run.data.tags["gdnsq.sweep_status"] == t["status"]
        assert run.info.status == ("KILLED" if t["stopped_early"] else "FINISHED")
    champion = client.get_model_version_by_alias("asha-model", "champion")
    assert champion.run_id == by_name[best["run_name"]].info.run_id

    # ray#54305: a stopped trial's worker placement group outlives its killed Train controller (Ray's
    # own cleaner needs the dashboard); the sweep removed each one, and none is left.
    reaped = [r for r in caplog.records if r.getMessage().startswith("removing the placement group left by")]
    assert len(reaped) == len(stopped)
    deadline = time.monotonic() + 60
    while live_placement_groups() and time.monotonic() < deadline:
        time.sleep(1)
    assert live_placement_groups() == []


# ------------------------------------------------------------------------------- driver killed


def experiment_trials(experiment: Path) -> dict[str, str]:
    """Trial id -> status, as Tune last persisted them to the experiment folder."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):  # being rewritten
        return {}
    out = {}
    for state, _ in data["trial_data"]:
        trial = json.loads(state) if isinstance(state, str) else state
        out[trial["trial_id"]] = trial["status"]
    return out


def results(experiment: Path, run: str) -> list[dict]:
    """The epoch results Tune recorded for a trial (synced to the experiment folder)."""
    path = experiment / run / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.mark.timeout(900)
def test_killed_driver_resumes_without_rerunning_finished_trials(cluster, teacher, tmp_path):
    space = {"optim.lr": {"grid": [0.002, 0.001]}}
    over = settings(
        cluster,
        tmp_path,
        teacher,
        "resumed",
        space,
        **{
            "sweep.scheduler": json.dumps({"type": "fifo"}),
            "sweep.max_concurrent_trials": "1",
            "tracking.enabled": "false",
            "quant.init_bits": "5",
        },
    )
    args = [sys.executable, "-m", "gdnsq.cli", "sweep", str(SWEEP_FILE)]
    for k, v in over.items():
        args += [f"--{k}", v]
    env = {**os.environ, **cluster.env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # persist Tune's state every second
    experiment = tmp_path / "runs" / "resumed"

    # Kill the driver once one trial has finished and the next has reported (and checkpointed) an epoch.
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            done = running = None
            while not (done and running) and time.monotonic() < deadline and driver.poll() is None:
                time.sleep(1)
                states = experiment_trials(experiment)
                done = next((t for t, s in states.items() if s == "TERMINATED"), None)
                running = next(
                    (t for t, s in states.items() if s != "TERMINATED" and results(experiment, f"resumed-{t}")), None
                )
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)  # its trials, controllers and workers die with its Ray job
            driver.wait(30)
    first_log = (tmp_path / "first.log").read_text(errors="replace")[-3000:]
    assert done and running, f"not one finished and one running trial (driver rc {driver.returncode}):\n{first_log}"
    assert driver.returncode == -signal.SIGKILL
    done_summary = experiment / "trials" / f"resumed-{done}" / "summary.json"
    before = (done_summary.stat().st_mtime_ns, results(experiment, f"resumed-{done}"))
    assert [r["epoch"] for r in before[1]] == [1, 2, 3]

    out = tmp_path / "summary.json"
    r = subprocess.run(
        args + ["--resume", "--summary-json", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    assert "trials: 2 completed" in r.stdout
    # The finished trial was not run again: the same summary file, the same three epoch results.
    assert (done_summary.stat().st_mtime_ns, results(experiment, f"resumed-{done}")) == before
    # The unfinished one continued its Train run (same name) from its checkpoint, not from epoch 0.
    rows = results(experiment, f"resumed-{running}")
    epochs = [r["epoch"] for r in rows]
    assert epochs == sorted(set(epochs)) and epochs[-1] == EPOCHS
    assert rows[-1]["run/resumed_from_epoch"] >= 1
    # Starting the same sweep again without --resume is refused (its trials would be mixed up).
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "pass --resume" in again.stderr


# --------------------------------------------------------------------------- rejected up front


def write_sweep(tmp_path: Path, space, **sweep) -> Path:
    import yaml

    data = yaml.safe_load(SWEEP_FILE.read_text())
    data["sweep"] = {"name": "bad", **sweep, "space": space}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BAD_SPACES = {
    "unknown_key": ({"optim.learning_rate": {"grid": [0.1]}}, "sweep.space.optim.learning_rate: unknown setting"),
    "empty": ({}, "sweep.space: empty"),
    "not_a_mapping": ([], "sweep.space: must be a mapping"),
    "no_distribution": ({"optim.lr": 0.1}, "sweep.space.optim.lr: expected one of"),
    "unknown_distribution": ({"optim.lr": {"normal": [0, 1]}}, "sweep.space.optim.lr: expected one of"),
    "empty_grid": ({"optim.lr": {"grid": []}}, "sweep.space.optim.lr: grid needs a non-empty list"),
    "invalid_value": (
        {"quant.init_bits": {"grid": [8, 30]}},
        "sweep.space.quant.init_bits: value 30 makes an invalid job",
    ),
    "bad_choice": (
        {"objective.distill": {"choice": ["jeffreys", "mse"]}},
        "sweep.space.objective.distill: value 'mse'",
    ),
    "reversed_range": ({"optim.lr": {"loguniform": [1e-2, 1e-4]}}, "sweep.space.optim.lr: loguniform needs lo < hi"),
    "log_of_zero": ({"optim.lr": {"loguniform": [0, 1e-2]}}, "sweep.space.optim.lr: loguniform needs lo > 0"),
    "float_on_int": ({"schedule.warmup_steps": {"uniform": [10, 100]}}, "use {randint: [lo, hi]}"),
    "fixed_section": ({"ray.num_workers": {"grid": [1, 2]}}, "sweep.space.ray.num_workers: cannot be swept"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_is_rejected_with_one_line_naming_the_key(case, tmp_path):
    space, message = BAD_SPACES[case]
    search = "random" if case in ("reversed_range", "log_of_zero", "float_on_int", "bad_choice") else "grid"
    with pytest.raises(SweepError) as e:
        load_sweep(write_sweep(tmp_path, space, search=search))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"search": "grid", "space": {"optim.lr": {"uniform": [1e-4, 1e-2]}}}, "search: grid takes only {grid"),
        ({"search": "optuna", "space": {"optim.lr": {"grid": [1e-3]}}}, "optuna cannot enumerate a grid"),
        ({"scheduler": {"type": "hyperband"}}, "sweep.scheduler.type: must be one of asha, fifo"),
        ({"scheduler": {"max_t": 99}}, "sweep.scheduler.max_t: 99 exceeds train.epochs"),
        ({"max_concurrent_trials": 0}, "sweep.max_concurrent_trials: must be >= 1"),
        ({"space": {"train.epochs": {"grid": [2, 4]}}}, "sweep.space.train.epochs: cannot be swept with ASHA"),
        ({"metric_typo": 1}, "sweep.metric_typo: unknown setting"),
    ],
)
def test_bad_sweep_settings_are_rejected(sweep, message, tmp_path):
    sweep = {"space": {"optim.lr": {"grid": [1e-3]}}, **sweep}
    space = sweep.pop("space")
    with pytest.raises(SweepError) as e:
        load_sweep(write_sweep(tmp_path, space, **sweep))
    assert message in str(e.value)


def test_overrides_reach_the_base_job_and_the_sweep_section():
    plan = load_sweep(
        SWEEP_FILE,
        {
            "train.epochs": "3",
            "sweep.max_concurrent_trials": "2",
            "sweep.space.optim.lr": "{loguniform: [1.0e-4, 1.0e-2]}",
            "sweep.search": "random",
        },
    )
    assert plan.job.train.epochs == 3 and plan.max_t == 3 and plan.sweep.max_concurrent_trials == 2
    assert plan.sweep.space["optim.lr"] == {"loguniform": [1e-4, 1e-2]} and "schedule.scale_t" in plan.sweep.space
    with pytest.raises(SweepError, match=r"^quant.target_w: must be an integer in \[1, 16\] bits"):
        load_sweep(SWEEP_FILE, {"quant.target_w": "0"})


def test_cli_rejects_a_bad_space_before_ray_starts(tmp_path):
    """Exit status 2, one line on stderr, in a fresh process that never imports Ray."""
    code = (
        "import sys\nfrom gdnsq.cli.main import main\nrc = main(sys.argv[1:])\n"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\nsys.exit(rc)\n"
    )
    for space, message in (BAD_SPACES["unknown_key"], BAD_SPACES["empty"]):
        path = write_sweep(tmp_path, space)
        t0 = time.monotonic()
        argv = [sys.executable, "-c", code, "sweep", str(path), "--ray.storage_path", str(tmp_path / "runs")]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gdnsq: error: ") and message in lines[0]
        assert "NO_RAY" in r.stdout
        assert not (tmp_path / "runs").exists()
        assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("name", ["cpu_smallcnn_sweep.yaml", "imagenet_resnet18_w2a2_sweep.yaml"])
def test_shipped_sweeps_validate(name):
    plan = load_sweep(ROOT / "jobs" / name)
    assert plan.sweep.metric == "val/ns_top1" and plan.sweep.mode == "max" and plan.sweep.space
    assert plan.sweep.scheduler.type == "asha" and plan.job.ray.enabled
