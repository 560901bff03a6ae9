"""gdnsq.quantize: a user's nn.Module and DataLoaders in one call, in-process and on Ray Train (2 workers);
the README's example runs as written; wrong batches are one gdnsq line before anything trains."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gdnsq
from gdnsq.errors import ConfigError, DataError
from gdnsq.quant.layers import iter_quantized
from gdnsq.training.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[2]


def digits(n_train: int = 1500):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images, labels = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
    return TensorDataset(images[:n_train], labels[:n_train]), TensorDataset(images[n_train:], labels[n_train:])


def small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


# quant.fused off: these tests are about the API, not the C++ kernel (built on first use, minutes on a busy machine)
SHORT = {"train.max_steps_per_epoch": 4, "train.teacher_epochs": 1, "train.device": "cpu", "quant.fused": False}


def test_readme_example_runs_as_written_and_converges(tmp_path):
    code = re.search(r"```python\n(.*?gdnsq\.quantize\(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"FP ([\d.]+) %, W4A4 ([\d.]+) %, converged (True|False), (\d+) bytes", line)
    assert m, line
    fp, q, conv = float(m[1]), float(m[2]), m[3] == "True"
    assert conv and fp > 90 and q > fp - 3, line


def test_in_process_returns_the_quantized_model_the_summary_describes():
    train, val = digits()
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gdnsq.quantize(
        model,
        DataLoader(train, batch_size=64, shuffle=True),
        val,
        target="W3A3",
        trained=False,
        epochs=2,
        settings=SHORT | {"train.short_run": "allow"},
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    layers = dict(iter_quantized(result.model))
    assert list(layers) == ["3"]  # first conv and last linear stay FP, as a timm model's stem and classifier
    s = result.summary
    assert (s["target_w"], s["target_a"], s["epochs_run"], s["split"]) == (3, 3, 2, "val")
    top1 = evaluate(result.model, DataLoader(val, batch_size=100), torch.device("cpu"))["top1"]
    assert round(top1, 2) == s["top1"]


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([{"x": torch.zeros(2, 1, 8, 8), "y": torch.zeros(2)}], "train: a batch must be (images, labels), got a dict"),
        (
            [(torch.zeros(2, 8, 8), torch.zeros(2, dtype=torch.long))],
            "train: images must be a float tensor (N, C, H, W), got a torch.float32 tensor of shape (2, 8, 8); add",
        ),
        (
            [(torch.zeros(2, 1, 8, 8), torch.zeros(2))],
            "train: labels must be an integer tensor (N,) of class indices, got a torch.float32 tensor",
        ),
        ([(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))], "train: the model cannot take a batch"),
    ],
)
def test_wrong_batches_are_one_gdnsq_line_before_training(batches, message):
    _, val = digits()
    with pytest.raises(DataError) as e:
        gdnsq.quantize(small_model(), batches, val, settings=SHORT)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_argument_mistakes_are_one_line():
    train, val = digits()
    with pytest.raises(ConfigError, match=r"^target: expected W<bits>A<bits> such as W2A2, got 'W2'$"):
        gdnsq.quantize(small_model(), train, val, target="W2")
    with pytest.raises(ConfigError, match=r"^loaders: ray_workers needs loaders="):
        gdnsq.quantize(small_model(), train, val, ray_workers=2)


@pytest.mark.integration
def test_the_same_call_on_ray_train_with_two_workers(tmp_path):
    pytest.importorskip("ray.train")
    sys.path.insert(0, str(Path(__file__).parent))
    from ray_cluster import LocalCluster

    def loaders(rank: int, world_size: int):
        # Self-contained: Ray pickles this closure by value, and this test module is not importable on a worker.
        import torch
        from sklearn.datasets import load_digits
        from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

        x, y = load_digits(return_X_y=True)
        images, labels = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
        train, val = TensorDataset(images[:1500], labels[:1500]), TensorDataset(images[1500:], labels[1500:])
        sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, seed=0)
        return DataLoader(train, batch_size=32, sampler=sampler, drop_last=True), DataLoader(val, batch_size=100)

    with LocalCluster(nodes=1, cpus_per_node=2) as cluster:
        cluster.connect()
        result = gdnsq.quantize(
            small_model(),
            loaders=loaders,
            ray_workers=2,
            target="W4A4",
            trained=False,
            epochs=2,
            settings=SHORT | {"train.short_run": "allow", "ray.storage_path": str(tmp_path)},
        )
    s = result.summary
    assert s["epochs_run"] == 2 and s["steps"] == 8 and Path(s["checkpoint"]).is_dir()
    _, val = digits()
    top1 = evaluate(result.model, DataLoader(val, batch_size=100), torch.device("cpu"))["top1"]
    assert round(top1, 2) == s["top1"]  # the student rebuilt here is the one the workers trained
