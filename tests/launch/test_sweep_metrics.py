"""A sweep metric is validated against the keys runs really report (run_job's epoch metrics)."""

import pytest

from gdnsq.config import load_config
from gdnsq.errors import SweepError
from gdnsq.launch.sweep.plan import check_metric
from gdnsq.training.job import EPOCH_METRICS, run_job


@pytest.mark.timeout(300)
def test_epoch_metrics_list_is_what_run_job_reports():
    cfg = load_config(
        None,
        {
            "ray.enabled": False,
            "train.epochs": 1,
            "train.max_steps_per_epoch": 2,
            "train.teacher_epochs": 1,
            "quant.calib_batches": 1,
            "data.batch_size": 64,
        },
    )
    seen = []
    run_job(cfg, on_epoch=lambda metrics, table, ckpt: seen.append(set(metrics)))
    assert seen and seen[0] <= set(EPOCH_METRICS)
    assert set(EPOCH_METRICS) - seen[0] <= {"train/extra_loss"}  # only zoo methods with an extra loss add it


@pytest.mark.parametrize("metric", ["val/ns_top1", "val/top1", "bits/avg_w", "sys/wall_s", "dist/checksum/r1"])
def test_reported_metrics_pass(metric):
    check_metric(metric)


@pytest.mark.parametrize("metric, hint", [("val/ns_top", "did you mean val/ns_top1"), ("accuracy", "e.g. val/ns_top1")])
def test_misspelled_metric_is_one_line(metric, hint):
    with pytest.raises(SweepError, match=rf"^sweep\.metric: trials do not report '{metric}'; {hint}"):
        check_metric(metric)
