"""Every shipped job file parses and validates; broken ones fail with one line naming the field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gdnsq.cli import main
from gdnsq.config import config_from_dict, load_config
from gdnsq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
JOB_FILES = sorted(p for p in JOBS.rglob("*") if p.suffix in (".yaml", ".yml"))
IMAGENET = [
    p for p in sorted(JOBS.glob("imagenet_resnet18_w*a*.yaml")) if "sweep" not in p.stem
]  # a sweep sizes its trials differently


def _id(path: Path) -> str:
    return path.relative_to(JOBS).as_posix()


def test_the_shipped_jobs_are_found():
    names = {_id(p) for p in JOB_FILES}
    assert {"cpu_smallcnn_w2a2.yaml", *(f"imagenet_resnet18_w{b}a{b}.yaml" for b in (1, 2, 3, 4))} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=_id)
def test_every_job_file_validates(path):
    data = yaml.safe_load(path.read_text())
    cfg = load_config(path)  # a sweep file's `sweep:` section is dropped here; the rest is a job
    assert cfg.name
    # Data paths are the cluster's; only model.checkpoint is checked for existence, so none is shipped.
    assert cfg.model.checkpoint is None, "shipped jobs must not depend on a local checkpoint file"
    if "sweep" in data:
        assert data["sweep"], "a sweep file needs a non-empty sweep: section"


def test_configs_stored_with_the_old_objective_keys_still_load():
    # Checkpoints and registered models written before the rename carry objective: {l1, l2}.
    cfg = config_from_dict({"objective": {"l1": 2.0, "l2": 3.0}})
    assert (cfg.objective.penalty_weight, cfg.objective.task_weight) == (2.0, 3.0)
    with pytest.raises(ConfigError, match="objective.l3: unknown setting"):
        config_from_dict({"objective": {"l3": 1.0}})


@pytest.mark.parametrize("path", IMAGENET, ids=_id)
def test_imagenet_jobs_follow_the_paper_protocol(path):
    cfg = load_config(path)
    bits = int(re.search(r"_w(\d+)a\1", path.stem).group(1))  # imagenet_resnet18_w2a2[_sweep]
    assert (cfg.quant.target_w, cfg.quant.target_a) == (bits, bits)
    assert cfg.model.name.startswith("resnet18") and cfg.model.pretrained
    q = cfg.quant
    assert q.keep_first_conv and q.keep_classifier and q.per_channel and q.init_bits == 10
    assert q.keep_pointwise  # the reference code kept 1x1 shortcut convs FP
    assert q.estimator == ("aewgs" if bits == 1 else "ste")
    assert cfg.objective.distill == "jeffreys"
    s = cfg.schedule
    assert s.mode == "absolute" and (s.warmup_steps, s.scale_t, s.anneal) == (1000, 2.0, 0.9995)
    assert cfg.optim.name == "radam" and cfg.optim.weight_decay == 0 and cfg.optim.quant_lr is None
    # The paper's lr 5e-4 belongs to a global batch of 1000: per-worker batch x world size.
    assert cfg.optim.lr == 5e-4 and cfg.data.batch_size * cfg.ray.num_workers == 1000
    d = cfg.data
    assert (d.kind, d.train_path, d.val_path, d.img_size) == (  # the cluster mount (cluster/README.md)
        "ffcv",
        "/mnt/gdnsq/datasets/imagenet-ffcv/train.beton",
        "/mnt/gdnsq/datasets/imagenet-ffcv/val.beton",
        224,
    )
    assert cfg.ray.enabled and cfg.ray.num_workers == 8 and cfg.ray.use_gpu
    assert cfg.ray.storage_path == "/mnt/gdnsq/runs"
    # The MLflow server comes from the cluster's MLFLOW_TRACKING_URI: one job file for VMs and KubeRay.
    assert cfg.tracking.enabled and cfg.tracking.uri is None
    assert cfg.name == path.stem  # one run (and resume point) per job file
    # GPU speed without touching the grids: bf16 autocast around convs (quantizers stay fp32), channels_last.
    assert cfg.train.precision == "bf16" and cfg.train.channels_last and not cfg.train.compile


def test_cpu_job_is_small():
    cfg = load_config(JOBS / "cpu_smallcnn_w2a2.yaml")
    assert cfg.data.kind == "bundled" and cfg.ray.num_workers == 1 and cfg.ray.use_gpu is False
    assert cfg.train.device == "cpu" and cfg.train.max_steps_per_epoch


BROKEN = {
    "unknown_key": ("quant:\n  target_bits: 2\n", "quant.target_bits: unknown setting"),
    "bad_yaml": ("quant: [1, 2\n", "config: "),
    "target_0": ("quant:\n  target_w: 0\n", "quant.target_w: must be an integer in [1, 16]"),
    "target_17": ("quant:\n  target_a: 17\n", "quant.target_a: must be an integer in [1, 16]"),
    "target_fraction": ("quant:\n  target_w: 2.5\n", "quant.target_w: must be an integer, got 2.5"),
    "estimator": ("quant:\n  estimator: magic\n", "quant.estimator: unknown estimator 'magic'"),
}


@pytest.fixture(params=sorted(BROKEN))
def broken(request, tmp_path):
    text, expected = BROKEN[request.param]
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\n" + text)
    return path, expected


def test_broken_config_is_one_line_naming_the_field(broken):
    path, expected = broken
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_cli_train_rejects_a_broken_job_before_doing_anything(broken, tmp_path, capsys):
    path, expected = broken
    summary = tmp_path / "out" / "summary.json"
    assert main(["train", str(path), "--summary-json", str(summary)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gdnsq: error: {expected}")
    assert not summary.exists() and not summary.parent.exists()


def test_cli_override_errors_name_the_field(tmp_path, capsys):
    assert main(["train", str(JOBS / "cpu_smallcnn_w2a2.yaml"), "--quant.estimator", "magic"]) == 2
    assert capsys.readouterr().err.startswith("gdnsq: error: quant.estimator: unknown estimator")
    assert main(["train", str(JOBS / "cpu_smallcnn_w2a2.yaml"), "--quant.nope", "1"]) == 2
    assert capsys.readouterr().err.startswith("gdnsq: error: quant.nope: unknown setting")


def test_cli_exit_status_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nquant:\n  target_w: 17\n")
    summary = tmp_path / "summary.json"
    r = subprocess.run(
        [sys.executable, "-m", "gdnsq.cli", "train", str(bad), "--summary-json", str(summary)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["gdnsq: error: quant.target_w: must be an integer in [1, 16] bits, got 17"]
    assert not summary.exists() and r.stdout == ""


def test_mixed_precision_jobs_budget_uniform_w2a2_bytes_and_sweep_a_front():
    """The mixed job's byte budget is uniform W2A2's packed payload; the front sweep spans >= 5 budgets."""
    from gdnsq.launch.sweep.plan import load_sweep
    from gdnsq.training.budget import uniform_value
    from gdnsq.training.surgery import build_student

    mixed = load_config(JOBS / "imagenet_resnet18_mixed_w2bytes.yaml")
    uniform = load_config(JOBS / "imagenet_resnet18_w2a2.yaml")
    assert mixed.quant.budget.kind == "bytes" and mixed.quant.target_a == 2
    for key in ("keep_first_conv", "keep_classifier", "keep_pointwise", "per_channel", "init_bits", "batchnorm"):
        assert getattr(mixed.quant, key) == getattr(uniform.quant, key), key  # the same protocol otherwise
    uniform.model.pretrained = False  # the structure is what counts; no weights download
    student = build_student(uniform, num_classes=1000, in_chans=3)
    assert mixed.quant.budget.value == uniform_value("bytes", student, 2, 2, None)
    front = yaml.safe_load((JOBS / "imagenet_resnet18_mixed_front_sweep.yaml").read_text())
    values = front["sweep"]["space"]["quant.budget.value"]["grid"]
    load_sweep(JOBS / "imagenet_resnet18_mixed_front_sweep.yaml")  # the space validates against the job
    assert len(values) >= 5 and mixed.quant.budget.value in values
    for k in (1, 3, 4):
        assert uniform_value("bytes", student, k, 2, None) in values


def test_cpu_front_sweep_spans_uniform_w1_to_w4_bytes_of_the_small_cnn():
    """The CPU front sweep's budgets are the small CNN's uniform W1..W4 (A2) packed payloads plus midpoints."""
    from gdnsq.launch.sweep.plan import load_sweep
    from gdnsq.training.budget import uniform_value
    from gdnsq.training.surgery import build_student

    plan = load_sweep(JOBS / "cpu_smallcnn_mixed_front_sweep.yaml")
    assert plan.job.quant.budget.kind == "bytes" and plan.sweep.scheduler.type == "fifo"
    assert plan.job.data.kind == "bundled" and plan.job.ray.use_gpu is False
    values = plan.sweep.space["quant.budget.value"]["grid"]
    student = build_student(plan.job, num_classes=10, in_chans=1)
    uniform = [uniform_value("bytes", student, k, 2, None) for k in (1, 2, 3, 4)]
    assert sorted(values) == sorted([*uniform, (uniform[0] + uniform[1]) / 2, (uniform[1] + uniform[2]) / 2])
    assert plan.job.quant.budget.value == uniform[1]
