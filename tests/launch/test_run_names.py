"""A run name is one safe folder name under the storage path, checked before anything trains or moves: no '..',
no '/', no control characters, no leading dot, and short enough for '--fresh''s '.old-<time>' suffix."""

from __future__ import annotations

import os

import pytest

from gdnsq.cli import main
from gdnsq.config import RUN_NAME_BYTES, JobConfig, load_config, run_name_problem
from gdnsq.errors import ConfigError
from gdnsq.launch.identity import with_run_name

HOSTILE = ["..", ".", ".hidden", "a/b", "../escape", "a\\b", "tab\there", "nul\0", "line\nbreak", " lead", "x" * 201]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_names_are_refused_in_one_line_before_anything_runs(name, tmp_path, capsys):
    storage = tmp_path / "store" / "runs"
    storage.mkdir(parents=True)
    (tmp_path / "store" / "keep.txt").write_text("the folder above the storage path")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = main(["quickstart", "--no-ray", "--fresh", "--name", name, "--ray.storage_path", str(storage)])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("gdnsq: error: name: must"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing moved, made or written


def test_the_length_limit_leaves_room_for_the_set_aside_suffix():
    longest = "é" * (RUN_NAME_BYTES // 2)  # two bytes each
    assert run_name_problem(longest) is None
    assert len(f"{longest}.old-20260101-120000".encode()) <= 255  # NAME_MAX
    assert "200 bytes" in run_name_problem(longest + "x")
    with pytest.raises(ConfigError, match=r"^name: must be at most 200 bytes .* got 300$"):
        JobConfig(name="n" * 300)


def test_ordinary_names_pass():
    for name in ["cpu_smallcnn_w2a2", "r18-w2a2.v2", "run 1", "模型", "a..b"]:
        assert load_config(None, {"name": name}).name == name


@pytest.mark.parametrize("model", ["hf-hub:timm/.hidden", "..", "x" * 300, "é/ü"])
def test_a_default_name_is_always_a_safe_folder_name(model):
    cfg = JobConfig()
    cfg.model.name = model  # the name is derived before pre-flight looks the model up
    name = with_run_name(cfg).name
    assert run_name_problem(name) is None and name.endswith(f"-w2a2-{name[-8:]}")


def test_a_sweep_name_leaves_room_for_the_trial_id():
    from gdnsq.config import SweepConfig
    from gdnsq.errors import SweepError

    with pytest.raises(SweepError, match=r"^sweep\.name: must not start with '\.'"):
        SweepConfig(name="..")
    with pytest.raises(SweepError, match=r"^sweep\.name: must be at most 160 bytes"):
        SweepConfig(name="s" * 161)
