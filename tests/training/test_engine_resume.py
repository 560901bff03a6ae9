"""A resumed run continues exactly where it stopped (engine + pipeline, no Ray)."""

import copy

import pytest
import torch

from gdnsq.config import load_config
from gdnsq.training.job import run_job

OVERRIDES = {
    "train.epochs": 2,
    "train.max_steps_per_epoch": 4,
    "data.batch_size": 128,
    "train.teacher_epochs": 1,
    "schedule.warmup_steps": 2,
    "ray.enabled": False,
    "tracking.enabled": False,
    "optim.name": "adamw",
    "optim.quant_lr": 0.05,
    "schedule.scale_t": 10.0,
}


def _run(epochs, resume=None, **extra):
    cfg = load_config(None, {**OVERRIDES, "train.epochs": epochs, **extra})
    saved = {}

    def on_epoch(metrics, table, get_checkpoint):
        saved["ckpt"] = copy.deepcopy(get_checkpoint())  # the live state keeps training / is restored later
        saved.setdefault("ckpts", []).append(saved["ckpt"])
        saved.setdefault("epochs", []).append(metrics["epoch"])

    summary = run_job(cfg, resume=resume, on_epoch=on_epoch)
    return summary, saved


@pytest.mark.timeout(1200)
def test_resume_is_exact():
    # the planned schedule depends on the whole run's steps: resume the same 2-epoch job from its epoch-1 state
    full, full_saved = _run(2)
    resumed, resumed_saved = _run(2, resume=full_saved["ckpts"][0])
    assert resumed_saved["epochs"] == [2]  # no epoch repeated
    a, b = full_saved["ckpt"]["engine"], resumed_saved["ckpt"]["engine"]
    assert a["schedule"] == b["schedule"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full["top1"] == resumed["top1"] and full["layers"] == resumed["layers"]


@pytest.mark.timeout(1200)
def test_resume_is_exact_with_batchnorm_reestimation():
    extra = {"train.bn_reestimate_batches": 2}
    full, full_saved = _run(2, **extra)
    resumed, resumed_saved = _run(2, resume=full_saved["ckpts"][0], **extra)
    a, b = full_saved["ckpt"]["engine"]["model"], resumed_saved["ckpt"]["engine"]["model"]
    tracked = [k for k in a if k.endswith("num_batches_tracked")]
    assert tracked and all(int(a[k]) == 2 for k in tracked)  # re-estimated from 2 batches before validation
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["top1"] == resumed["top1"]
