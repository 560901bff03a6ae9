"""Budget-aware defaults (issue 27): the optimizer follows the planned steps, and pre-flight plans the steps
the descent needs (more epochs, said in the header) or refuses in one line, before anything trains."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gdnsq.config import load_config
from gdnsq.data.synthetic import make_jpeg_imagefolder
from gdnsq.errors import ConfigError
from gdnsq.launch import console
from gdnsq.launch.preflight import preflight
from gdnsq.training.engine import RADAM_MIN_STEPS, create_optimizer
from gdnsq.training.schedules import steps_needed


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 4 classes x 40 = 160 training images: 5 steps an epoch at batch 32.
    return make_jpeg_imagefolder(tmp_path_factory.mktemp("small"), classes=4, per_class=40, size=(32, 32))


def _cfg(folder, **over):
    base = {
        "data.kind": "imagefolder",
        "data.train_path": str(folder / "train"),
        "data.val_path": str(folder / "val"),
        "data.img_size": 32,
        "data.val_resize": 32,
        "data.batch_size": 32,
        "ray.enabled": False,
    }
    return load_config(None, base | over)


def test_short_run_is_extended_to_the_steps_the_descent_needs_and_the_header_says_so(folder, capsys):
    cfg, facts = preflight(_cfg(folder))
    assert facts.train.size == 160
    need = steps_needed(cfg.schedule)
    assert cfg.train.epochs == -(-need // 5)  # ceil: 5 steps an epoch
    assert (cfg.train.epochs - 1) * 5 < need <= cfg.train.epochs * 5
    console.header(dataclasses.replace(cfg, name="x"), devices="cpu")
    out = capsys.readouterr().out
    assert f"plan      train.epochs 10 -> {cfg.train.epochs}: 10 epochs of 5 steps (160 images, batch 32)" in out
    assert f"{cfg.train.epochs} epochs, data imagefolder" in out


def test_short_run_stop_is_one_line_naming_the_setting(folder):
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(folder, **{"train.short_run": "stop"}))
    msg = str(e.value)
    assert msg.startswith("train.epochs: 10 epochs of 5 steps") and "\n" not in msg
    assert f"set train.epochs >= {-(-steps_needed(load_config().schedule) // 5)}" in msg


@pytest.mark.parametrize(
    "over",
    [
        {"train.short_run": "allow"},
        {"train.max_steps_per_epoch": 2},  # a deliberately short (test) run
        {"quant.method": "lsq"},  # a fixed-bit method has no descent
        {"schedule.mode": "absolute"},
        {"train.epochs": 200},  # enough steps already
    ],
)
def test_runs_that_need_no_more_steps_keep_their_epochs(folder, over):
    cfg = _cfg(folder, **over)
    assert preflight(cfg)[0].train.epochs == cfg.train.epochs


def test_steps_needed_follows_the_descent_window():
    s = load_config().schedule
    assert steps_needed(s) == 400  # a 180-step window at warm-up 0.05, descent_end 0.5
    assert steps_needed(dataclasses.replace(s, descent_end=0.95)) == 200
    assert steps_needed(dataclasses.replace(s, descent_end_a=0.3)) == 720


def test_auto_optimizer_is_adamw_for_a_short_run_and_radam_for_a_long_one():
    model = nn.Linear(3, 2)
    optim = load_config().optim
    assert optim.name == "auto"
    assert type(create_optimizer(model, optim, [], 432)) is torch.optim.AdamW
    assert type(create_optimizer(model, optim, [], None)) is torch.optim.AdamW
    assert type(create_optimizer(model, optim, [], RADAM_MIN_STEPS)) is torch.optim.RAdam
    explicit = dataclasses.replace(optim, name="radam")
    assert type(create_optimizer(model, explicit, [], 100)) is torch.optim.RAdam
