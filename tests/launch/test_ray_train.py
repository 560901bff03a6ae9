"""Ray Train edge on a real two-node local Ray cluster (1 CPU per node): DDP, recovery, placement.

One cluster serves the module (starting it costs ~25 s). Runs are kept short: a 1-epoch teacher,
a few steps per epoch. The tracked runs write to a throwaway sqlite MLflow store. The whole file
takes ~5 min at a load average of 7 on 2 cores, ~10 min at 15 (timeouts allow for that).
"""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("ray.train")

from ray_cluster import LocalCluster  # noqa: E402

from gdnsq.config import JobConfig, load_config  # noqa: E402
from gdnsq.errors import ConfigError
from gdnsq.launch.faults import KillWorker  # noqa: E402
from gdnsq.launch.ray_train import fit  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    # numba's dispatcher finalizer raises when a dropped FFCV loader is collected; not ours.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

STEPS = 6  # optimizer steps per epoch
SUMMARY_KEYS = {
    "model",
    "split",
    "fp_top1",
    "top1",
    "top5",
    "fp_val_top1",
    "val_top1",
    "target_w",
    "target_a",
    "avg_bits_w",
    "avg_bits_a",
    "converged",
    "ns_top1",
    "best_epoch",
    "epochs_run",
    "steps",
    "protocol",
    "layers",
    "checkpoint",
}


@pytest.fixture(scope="module")
def cluster():
    # The controller polls workers every 2 s by default; faster polls shorten every report and restart.
    with LocalCluster(nodes=2, cpus_per_node=1, node_env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}) as c:
        c.connect()
        yield c


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def job(cluster: LocalCluster, storage, name: str, **overrides) -> JobConfig:
    settings = {
        "name": name,
        "ray.address": cluster.address,
        "ray.storage_path": str(storage),
        "ray.num_workers": 2,
        "ray.cpus_per_worker": 1,
        "ray.checkpoints_to_keep": 10,
        "train.epochs": 2,
        "train.teacher_epochs": 1,
        "train.max_steps_per_epoch": STEPS,
        "data.batch_size": 64,
        "quant.calib_batches": 2,
        "tracking.enabled": False,
    }
    settings.update(overrides)
    return load_config(None, settings)


def epoch_reports(storage, name: str) -> list[dict]:
    """Rank 0's report of every checkpointed epoch, oldest first, read back from storage."""
    from ray.train import Result

    result = Result.from_path(os.path.join(storage, name))
    return sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])


def assert_replicas(reports: list[dict], world: int = 2, nodes: int = 2) -> None:
    for m in reports:
        sums = [m[f"dist/checksum/r{r}"] for r in range(world)]
        assert len(set(sums)) == 1 and m["dist/replicas_equal"] == 1.0, f"DDP replicas differ: {m}"
        assert m["dist/num_nodes"] == nodes, "the two workers must run on two different nodes"


# ------------------------------------------------------------------------------ two nodes, DDP


@pytest.fixture(scope="module")
def bundled_run(cluster, tmp_path_factory, mlflow_uri):
    """An uninterrupted 2-worker run on the bundled digits, tracked and registered."""
    storage = tmp_path_factory.mktemp("runs")
    # 8-bit targets: the calibrated student is feasible at once, so the run converges and registers.
    cfg = job(
        cluster,
        storage,
        "ddp",
        **{
            "quant.target_w": 8,
            "quant.target_a": 8,
            "quant.init_bits": 8,
            "tracking.enabled": True,
            "tracking.uri": mlflow_uri,
            "tracking.experiment": "ray-tests",
        },
    )
    return fit(cfg), storage


@pytest.mark.timeout(600)  # ~2 min on a quiet machine; this one is shared
def test_two_nodes_ddp_bundled(bundled_run, mlflow_uri):
    from mlflow import MlflowClient

    summary, storage = bundled_run
    assert SUMMARY_KEYS <= set(summary)
    assert summary["epochs_run"] == 2 and summary["steps"] == 2 * STEPS and summary["converged"]
    assert os.path.isfile(os.path.join(storage, "ddp", "summary.json"))
    reports = epoch_reports(storage, "ddp")
    assert [m["epoch"] for m in reports] == [1.0, 2.0]
    assert_replicas(reports)
    # rank 0 tracked the run; the driver registered the best student from the final checkpoint
    run = MlflowClient(mlflow_uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["epoch"] == 2 and "dist/replicas_equal" in run.data.metrics
    assert summary["registered_model"].startswith("gdnsq_smallcnn-w8a8/")


@pytest.mark.timeout(420)
def test_two_nodes_ddp_ffcv(cluster, tmp_path):
    pytest.importorskip("ffcv")
    from gdnsq.data.ffcv_io import write_imagenet
    from gdnsq.data.synthetic import make_jpeg_imagefolder

    jpegs = make_jpeg_imagefolder(tmp_path / "jpegs", classes=4, per_class=16, val_per_class=4, size=(48, 40))
    train, val = write_imagenet(jpegs, tmp_path / "betons", max_resolution=40, num_workers=1, progress=False)
    cfg = job(
        cluster,
        tmp_path / "runs",
        "ffcv",
        **{
            "data.kind": "ffcv",
            "data.train_path": str(train),
            "data.val_path": str(val),
            "data.img_size": 32,
            "data.val_resize": 36,
            "data.batch_size": 8,
            "data.num_workers": 1,
            "train.max_steps_per_epoch": 3,
        },
    )
    summary = fit(cfg)
    gc.collect()  # drop FFCV loaders here, where numba's finalizer noise is filtered
    assert SUMMARY_KEYS <= set(summary) and summary["split"] == "val" and summary["epochs_run"] == 2
    reports = epoch_reports(tmp_path / "runs", "ffcv")
    assert [m["epoch"] for m in reports] == [1.0, 2.0]
    assert_replicas(reports)


@pytest.mark.timeout(300)
def test_same_name_other_settings_refuses_on_the_driver_and_same_settings_return_the_run(bundled_run, cluster):
    """Issue 12: a W1A1 job under the name of the finished W8A8 run is refused before Ray trains anything
    (never registered as a W1A1 champion); the same job again returns the stored summary."""
    from gdnsq.errors import RunIdentityError

    summary, storage = bundled_run
    folders = sorted(p.name for p in (storage / "ddp").iterdir())
    other = job(cluster, storage, "ddp", **{"quant.target_w": 1, "quant.target_a": 1, "quant.init_bits": 8})
    with pytest.raises(RunIdentityError, match=r"^name: run 'ddp' .*quant\.target_w 8 -> 1.*--name NEW"):
        fit(other)
    same = job(
        cluster,
        storage,
        "ddp",
        **{"quant.target_w": 8, "quant.target_a": 8, "quant.init_bits": 8, "ray.num_workers": 1},
    )  # worker count is harmless
    again = fit(same)
    assert again["checkpoint"] == summary["checkpoint"] and again["top1"] == summary["top1"]
    assert sorted(p.name for p in (storage / "ddp").iterdir()) == folders, "nothing may have trained"


# ------------------------------------------------------------------------------------ recovery


@pytest.mark.timeout(600)
def test_killed_worker_resumes_from_checkpoint(cluster, tmp_path, bundled_run, mlflow_uri):
    from mlflow import MlflowClient

    epochs, kill_step = 3, STEPS + 2  # SIGKILL rank 0 mid-epoch 2, after epoch 1's checkpoint
    marker = tmp_path / "killed"
    reference, _ = bundled_run
    # FP weights from the first run's checkpoint (its teacher): no teacher training here
    cfg = job(
        cluster,
        tmp_path / "runs",
        "fault",
        **{
            "model.checkpoint": os.path.join(reference["checkpoint"], "checkpoint.pt"),
            "train.epochs": epochs,
            "ray.max_failures": 1,
            "tracking.enabled": True,
            "tracking.uri": mlflow_uri,
            "tracking.experiment": "ray-fault",
            "tracking.register": False,
        },
    )
    summary = fit(cfg, kill=KillWorker(step=kill_step, marker=str(marker)))

    assert marker.exists(), "the worker was never killed"
    reports = epoch_reports(tmp_path / "runs", "fault")
    # each epoch reported once: the restart resumed after epoch 1 instead of starting over
    assert [m["epoch"] for m in reports] == [1.0, 2.0, 3.0]
    assert [m["run/resumed_from_epoch"] for m in reports] == [0.0, 1.0, 1.0]
    folders = [p for p in (tmp_path / "runs" / "fault").glob("checkpoint_*") if p.is_dir()]
    assert len(folders) == epochs, "a checkpoint reported just before the kill was lost"
    assert [m["train/global_step"] for m in reports] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert_replicas(reports)
    assert summary["epochs_run"] == epochs and summary["steps"] == epochs * STEPS
    assert set(summary) - {"registered_model"} == set(reference) - {"registered_model"}
    # same fields, same types (descent_end_step is None for a run that never passed its true-bit check)
    mismatched = [
        k
        for k, v in reference.items()
        if k != "registered_model" and None not in (v, summary[k]) and type(summary[k]) is not type(v)
    ]
    assert not mismatched, {k: (reference[k], summary[k]) for k in mismatched}
    # the restarted rank 0 reattached to the same MLflow run (no orphan left RUNNING)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-fault").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "epoch")) == [1, 2, 3]


@pytest.mark.timeout(600)
def test_torn_latest_checkpoint_resumes_from_the_one_before(cluster, tmp_path, caplog):
    """The latest Ray checkpoint cut in half: the driver's identity check and the workers' resume both fall
    back to the checkpoint before it (kept: ray.checkpoints_to_keep >= 2), losing only the torn epoch."""
    import logging

    runs = tmp_path / "runs"
    fit(job(cluster, runs, "torn", **{"train.epochs": 2}))
    latest = max((p for p in (runs / "torn").glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    ckpt = latest / "checkpoint.pt"
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) // 2)
    with caplog.at_level(logging.WARNING, logger="gdnsq"):
        summary = fit(job(cluster, runs, "torn", **{"train.epochs": 3}))
    assert "unreadable" in caplog.text
    assert summary["epochs_run"] == 3 and summary["steps"] == 3 * STEPS
    newest = max(epoch_reports(runs, "torn"), key=lambda m: (m["epoch"], m["run/resumed_from_epoch"]))
    assert newest["epoch"] == 3.0 and newest["run/resumed_from_epoch"] == 1.0  # epoch 2 redone from epoch 1


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.timeout(300)
def test_user_error_in_a_worker_is_one_line_and_not_retried(cluster, tmp_path):
    """A teacher file that exists (the driver's check passes) but is not a state dict fails inside the
    workers: it comes back as the worker's one-line ConfigError, not as a WorkerGroupError after
    ray.max_failures identical retries."""
    import time

    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a state dict")
    cfg = job(cluster, tmp_path / "runs", "bad-teacher", **{"model.checkpoint": str(bad), "ray.max_failures": 3})
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^model\.checkpoint: cannot read .*teacher\.pt") as e:
        fit(cfg)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 120


@pytest.mark.timeout(180)
def test_more_workers_than_cluster_fails_before_training(cluster, tmp_path):
    cfg = job(cluster, tmp_path / "runs", "too-big", **{"ray.num_workers": 3})
    with pytest.raises(ConfigError, match=r"^ray\.num_workers: .*room for 2 worker"):
        fit(cfg)
    cfg = job(cluster, tmp_path / "runs", "too-fat", **{"ray.num_workers": 1, "ray.cpus_per_worker": 2})
    with pytest.raises(ConfigError, match=r"^ray\.num_workers: .*room for 0 worker"):
        fit(cfg)
    assert not (tmp_path / "runs").exists(), "nothing may start before the check"
