"""The run fingerprint: harmless settings leave it alone, every defining one changes it."""

import pytest

from gdnsq.config import load_config, to_dict
from gdnsq.errors import RunIdentityError
from gdnsq.training.checkpoint import check_identity, defining_settings, fingerprint, identity_mismatch


def cfg_dict(**overrides):
    return to_dict(load_config(None, overrides))


@pytest.mark.parametrize(
    "key, value",
    [
        ("name", "other"),
        ("train.epochs", 99),
        ("train.patience", 3),
        ("train.device", "cpu"),
        ("data.num_workers", 7),
        ("data.os_cache", False),
        ("ray.num_workers", 4),
        ("ray.cpus_per_worker", 3),
        ("ray.address", "10.0.0.1:6379"),
        ("ray.storage_path", "/elsewhere"),
        ("ray.max_failures", 9),
        ("tracking.uri", "http://127.0.0.1:5000"),
        ("tracking.enabled", False),
        ("tracking.experiment", "x"),
    ],
)
def test_harmless_settings_keep_the_fingerprint(key, value):
    assert fingerprint(cfg_dict(**{key: value})) == fingerprint(cfg_dict())
    assert identity_mismatch(cfg_dict(**{key: value}), {"config": cfg_dict()}) == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("quant.target_w", 3),
        ("quant.target_a", 1),
        ("quant.method", "lsq"),
        ("quant.estimator", "lsq"),
        ("quant.per_channel", False),
        ("model.name", "resnet18"),
        ("optim.lr", 0.1),
        ("schedule.scale_t", 3.0),
        ("objective.distill", "kl"),
        ("train.seed", 1),
        ("train.teacher_epochs", 1),
        ("data.batch_size", 7),
        ("train.max_steps_per_epoch", 3),
        ("quant.rules", [{"pattern": "fc", "skip": True}]),
    ],
)
def test_defining_settings_change_the_fingerprint(key, value):
    assert fingerprint(cfg_dict(**{key: value})) != fingerprint(cfg_dict())
    diff = identity_mismatch(cfg_dict(**{key: value}), {"config": cfg_dict()})
    assert diff and all(k.startswith(key) for k in diff)


def test_refusal_is_one_line_naming_the_keys_and_the_ways_on():
    with pytest.raises(RunIdentityError) as e:
        check_identity(cfg_dict(name="r", **{"quant.target_w": 3}), {"config": cfg_dict(name="r")}, "/runs/r")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("name: run 'r'")
    assert "quant.target_w 2 -> 3" in msg and "--name NEW" in msg and "--fresh" in msg


def test_old_checkpoints_compare_through_renamed_and_missing_keys():
    stored = cfg_dict()
    stored["objective"] = {("l1" if k == "penalty_weight" else k): v for k, v in stored["objective"].items()}
    del stored["quant"]["method_args"]  # a setting added after the checkpoint was written: its default
    assert defining_settings(stored) == defining_settings(cfg_dict())
