"""ray.cpus_per_worker: None = a node's CPUs shared by its workers (the quick start uses the machine's cores)."""

import pytest

from gdnsq.config import load_config
from gdnsq.errors import ConfigError
from gdnsq.launch.placement import check_resources, cpus_per_worker


def _node(cpu, gpu=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": float(cpu), **({"GPU": float(gpu)} if gpu else {})}}


def _cfg(**kw):
    return load_config(None, {f"ray.{k}": v for k, v in kw.items()})


def test_explicit_share_is_kept():
    assert cpus_per_worker(_cfg(cpus_per_worker=3), False, [_node(16)]) == 3


def test_unset_share_takes_the_node():
    # Train V2's controller reserves no CPU: one worker on a 2-core machine gets both (and is placed).
    cfg = _cfg(cpus_per_worker=None)
    assert cpus_per_worker(cfg, False, [_node(2)]) == 2
    check_resources(cfg, False, [_node(2)])
    assert cpus_per_worker(_cfg(cpus_per_worker=None, num_workers=2), False, [_node(2)]) == 1
    assert cpus_per_worker(_cfg(cpus_per_worker=None, num_workers=4), False, [_node(16), _node(8)]) == 4
    assert cpus_per_worker(_cfg(cpus_per_worker=None), False, [_node(8, alive=False), _node(4)]) == 4
    # GPU workers: only GPU nodes count, one worker per GPU.
    cfg = _cfg(cpus_per_worker=None, num_workers=8, use_gpu=True)
    assert cpus_per_worker(cfg, True, [_node(64, gpu=8), _node(32)]) == 8
    assert cpus_per_worker(_cfg(cpus_per_worker=None), False, []) == 1


def test_quickstart_uses_the_machine_and_bad_share_is_named():
    from importlib.resources import files

    cfg = load_config(str(files("gdnsq") / "configs" / "quickstart.yaml"))
    assert cfg.ray.cpus_per_worker is None
    with pytest.raises(ConfigError, match="ray.cpus_per_worker"):
        _cfg(cpus_per_worker=0)
