"""The config layer checks every setting where its value enters: each field's declared bounds and its type's
rules (finite floats, int64 counts, strings without control characters), duplicate YAML keys, non-UTF-8 files
and directories given as job files: one line naming the field or file, before anything runs."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gdnsq.cli import main
from gdnsq.config import (
    INT_LIMIT,
    STR_LIMIT,
    JobConfig,
    OptimConfig,
    QuantConfig,
    _field_types,
    _unwrap_optional,
    config_from_dict,
    describe,
    load_config,
    parse_yaml,
    read_yaml,
)
from gdnsq.errors import ConfigError


def _declared(cls=JobConfig, prefix=""):
    """(dotted key, annotated type, Bounds) of every leaf setting that declares a range."""
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp, _ = _unwrap_optional(types[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _declared(tp, key)
        elif "bounds" in f.metadata:
            yield key, tp, f.metadata["bounds"]


DECLARED = list(_declared())
RANGED = [(k, tp, b) for k, tp, b in DECLARED if tp in (int, float) and {b.ge, b.gt, b.le, b.lt} != {None}]
FLOATS = [s.key for s in describe() if s.type.startswith("float")]


def _one_line_error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_the_bounds_cover_the_settings():
    assert len(RANGED) >= 40 and {"optim.lr", "data.img_size", "data.num_workers", "train.seed"} <= {
        k for k, _, _ in RANGED
    }
    assert len(FLOATS) >= 25


@pytest.mark.parametrize("key, tp, b", RANGED, ids=[k for k, _, _ in RANGED])
def test_a_value_just_outside_the_declared_range_names_the_field(key, tp, b):
    step = 1 if tp is int else 1e-9
    outside = []
    if b.ge is not None:
        outside.append(b.ge - step)
    if b.gt is not None:
        outside.append(b.gt)
    if b.le is not None:
        outside.append(b.le + step)
    if b.lt is not None:
        outside.append(b.lt)
    for value in outside:
        assert _one_line_error({key: str(value)}).startswith(f"{key}: must be"), value


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_no_float_setting_takes_nan_or_infinity(key, value):
    assert _one_line_error({key: value}).startswith(f"{key}: must be")


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("optim.lr", "inf", "optim.lr: must be a finite number, got inf"),
        ("data.img_size", "0", "data.img_size: must be an integer in [1, 8192], got 0"),
        ("train.max_steps_per_epoch", "0", "train.max_steps_per_epoch: must be >= 1, got 0"),
        ("data.num_workers", "-1", "data.num_workers: must be an integer in [0, 1024], got -1"),
        ("data.val_fraction", "1.5", "data.val_fraction: must be in (0, 0.5], got 1.5"),
        ("train.seed", "-1", "train.seed: must be an integer in [0, 2147483647]"),
        ("train.epochs", "1e30", "train.epochs: must be within"),
        ("train.epochs", "9" * 40, "train.epochs: must be within"),
        ("train.epochs", "9" * 5000, "train.epochs: must be an integer, got '9999"),
        ("quant.estimator", "magic", "quant.estimator: unknown estimator 'magic'; choose one of"),
        ("tracking.uri", "", "tracking.uri: must not be empty"),
        ("model.name", "a\nb", "model.name: must not contain control characters, got 'a\\nb'"),
        ("data.train_path", "x" * (STR_LIMIT + 1), f"data.train_path: must be at most {STR_LIMIT} characters"),
        ("quant.method_args", "{error_weight: nan}", "quant.method_args.error_weight: must be a finite number"),
        ("quant.method_args", "{a: [1", "quant.method_args: not valid YAML"),
        ("quant.rules", "[{pattern: conv, target_w: 0}]", "quant.rules[0].target_w: must be an integer in [1, 16]"),
        ("quant.rules", "[{pattern: conv, pattern: fc}]", "quant.rules: not valid YAML (duplicate key 'pattern'"),
        ("ray.checkpoints_to_keep", "1", "ray.checkpoints_to_keep: must be >= 2 (a torn latest checkpoint"),
    ],
)
def test_bad_values_are_one_line_naming_the_field(key, value, says):
    assert _one_line_error({key: value}).startswith(says)


def test_the_issue_cases_exit_2_on_the_command_line(capsys):
    for key, value in [
        ("optim.lr", "inf"),
        ("data.img_size", "0"),
        ("train.max_steps_per_epoch", "0"),
        ("data.num_workers", "-1"),
        ("data.val_fraction", "1.5"),
    ]:
        assert main(["config", "show", f"--{key}", value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"gdnsq: error: {key}: must be"), err


def test_values_inside_the_bounds_load_and_large_integers_stay_exact():
    cfg = load_config(None, {"train.epochs": str(2**62 + 1), "data.num_workers": "0", "optim.lr": "1e-300"})
    assert cfg.train.epochs == 2**62 + 1 and cfg.data.num_workers == 0 and cfg.optim.lr == 1e-300
    assert load_config(None, {"train.epochs": str(INT_LIMIT)}).train.epochs == INT_LIMIT
    assert load_config(None, {"quant.target_w": "3.0"}).quant.target_w == 3


def test_sections_built_in_python_are_checked_too():
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be a finite number, got inf$"):
        OptimConfig(lr=math.inf)
    with pytest.raises(ConfigError, match=r"^quant\.rules\[1\]\.target_a: must be an integer in \[1, 16\] bits"):
        QuantConfig(rules=[{"pattern": "a"}, {"pattern": "b", "target_a": 0}])
    with pytest.raises(ConfigError, match=r"^data\.batch_size: must be >= 1, got 0"):
        config_from_dict({"data": {"batch_size": 0}})


# ------------------------------------------------------------------------------------------ files


def test_a_duplicate_key_names_the_file_and_both_lines(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("optim:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(job)
    assert str(e.value) == f"config: {job}:4:3 is not valid YAML (duplicate key 'lr', first on line 2)"
    job.write_text("train: {epochs: 2}\ntrain: {seed: 1}\n")
    with pytest.raises(ConfigError, match=r"job\.yaml:2:1 is not valid YAML \(duplicate key 'train'"):
        load_config(job)


def test_merge_keys_may_still_be_overridden():
    assert parse_yaml("base: &b {lr: 0.1, name: sgd}\nmine:\n  <<: *b\n  lr: 0.2\n")["mine"] == {
        "lr": 0.2,
        "name": "sgd",
    }


def test_a_non_utf8_job_file_names_the_file_and_line(tmp_path):
    job = tmp_path / "latin1.yaml"
    job.write_bytes("train:\n  epochs: 2\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(job)
    assert str(e.value) == f"config: {job}:3 is not UTF-8 text (byte 0xe9); save it as UTF-8"


def test_a_directory_given_as_the_job_file_says_so(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"is a directory; give a YAML job file$"):
        read_yaml(tmp_path)
    assert main(["train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err and str(tmp_path) in err


def test_unreadable_and_hostile_paths_are_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train: {epochs: 2}\n")
    job.chmod(0)
    try:
        readable = _can_read(job)  # root reads anything
        if not readable:
            with pytest.raises(ConfigError, match=r"^config: cannot read .*job\.yaml \(Permission denied\)$"):
                load_config(job)
    finally:
        job.chmod(0o644)
    for path in ["x" * 5000, "a\0b"]:  # too long for the OS, a NUL byte: no OSError or ValueError escapes
        with pytest.raises(ConfigError, match="^config: no such file"):
            load_config(path)
    with pytest.raises(ConfigError, match="^model.checkpoint: no such file"):
        load_config(None, {"model.checkpoint": "y" * 4000})


def _can_read(path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False
