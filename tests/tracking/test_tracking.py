"""MLflow tracking and registry against a real ``mlflow server`` on 127.0.0.1 (no mocks).

One server (sqlite backend, proxied artifacts in a tmp dir) serves the module; the run test kills
it mid-run and restarts it on the same port and backend.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from mlflow_server import MlflowServer  # tests/mlflow_server.py

from gdnsq.config import JobConfig, load_config
from gdnsq.errors import RegistryError
from gdnsq.tracking import registry
from gdnsq.tracking.names import is_secret_key, metric_key, scrub_value
from gdnsq.tracking.registry import parse_ref
from gdnsq.tracking.run import create_tracker
from gdnsq.training.bits import bits_table
from gdnsq.training.surgery import build_student, calibrate_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Network only to 127.0.0.1: MLflow's usage telemetry would try the internet.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SECRETS = ("hunter2", "SECRET123", "s3cr3t-sig")


# ------------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill(signal.SIGTERM)


@pytest.fixture(autouse=True)
def _fast_http(monkeypatch, tmp_path):
    # Fail fast while the server is down (the outbox retries); keep outboxes out of the repo.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("GDNSQ_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------- tiny training


def make_cfg(uri: str, **quant) -> JobConfig:
    cfg = JobConfig(name="tracking-test")
    cfg.tracking.uri = uri
    cfg.tracking.experiment = "gdnsq-tests"
    cfg.quant.target_w, cfg.quant.target_a = quant.get("w", 2.0), quant.get("a", 2.0)
    cfg.train.epochs = 3
    # secrets that must never reach MLflow params/tags/artifacts
    cfg.data.train_path = "postgresql://alice:hunter2@db.internal:5432/images"
    cfg.data.val_path = "https://bucket.example/val.beton?X-Amz-Signature=s3cr3t-sig&token=SECRET123"
    return cfg


def train_student(cfg: JobConfig, steps: int = 3):
    """A real quantized student: calibrated, then a few SGD steps on random digits."""
    model = build_student(cfg, num_classes=10, in_chans=1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    calibrate_model(model, [x], init_bits=6.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def run_epoch(tracker, model, epoch: int, steps: int = 4) -> None:
    for s in range(steps):
        tracker.log_metrics({"train/loss": 1.0 / (1 + epoch * steps + s), "train/lr": 0.01}, step=epoch * steps + s)
    tracker.log_epoch(epoch, {"val/top1": 0.5 + 0.1 * epoch, "val/ns_top1": 0.45 + 0.1 * epoch}, bits_table(model))


# -------------------------------------------------------------------------------------- unit


def test_names_and_scrubbing():
    assert metric_key("bits/w/blocks.0.attn:qkv") == "bits/w/blocks.0.attn_qkv"
    assert metric_key("/a//../b/") == "a/_/b"
    assert scrub_value("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert scrub_value("http://127.0.0.1:5000/x") == "http://127.0.0.1:5000/x"
    assert "s3cr3t" not in scrub_value("s3://b/k?X-Amz-Signature=s3cr3t&x=1")
    assert is_secret_key("db.password") and is_secret_key("api_key") and is_secret_key("aws.secret_access_key")
    assert not is_secret_key("model.num_tokens") and not is_secret_key("quant.keep_pointwise")
    assert parse_ref("models:/resnet18-w2a2@champion") == ("resnet18-w2a2", None, "champion")
    assert parse_ref("m/3") == ("m", "3", None) and parse_ref("m") == ("m", None, None)
    with pytest.raises(RegistryError, match="version must be a number"):
        parse_ref("m/Production")
    mixed = {"ray.enabled": False, "quant.budget.kind": "bytes", "quant.budget.value": 9908.0}
    assert registry.registered_name(load_config(None, mixed)) == "gdnsq_smallcnn-mixed-bytes-a2"
    mixed["quant.budget.value_a"] = 2.5  # the activation budget, not the inputs' upper bound (max_bits)
    assert registry.registered_name(load_config(None, mixed)) == "gdnsq_smallcnn-mixed-bytes-a2.5"


# ------------------------------------------------------------------------------ tracking run


def test_run_survives_worker_restart_and_server_outage(server):
    from mlflow import MlflowClient

    cfg = make_cfg(server.url)
    model, _ = train_student(cfg)
    client = MlflowClient(server.url)

    # A worker starts the run, logs epoch 0, then dies (its atexit marks the run FAILED).
    a = create_tracker(cfg, tags={"api_token": "SECRET123"})
    assert a.run_id is not None
    a.log_config(cfg, fp_layers=["stem.0", "head"])
    a.log_checkpoint_uri("s3://ckpt/run/epoch_0?token=SECRET123", epoch=0)
    run_epoch(a, model, 0)
    state = a.state_dict()
    assert a.finish("FAILED") is True
    assert client.get_run(a.run_id).info.status == "FAILED"

    # The server goes down; the restarted worker reattaches by run id and keeps training.
    server.kill()
    t0 = time.time()
    b = create_tracker(cfg, state=state, start_timeout=1.0)
    for epoch in (1, 2):
        run_epoch(b, model, epoch)
    assert time.time() - t0 < 5.0, "logging must not block while the server is down"
    assert b.outbox.pending() > 0

    server.start()
    b.log_summary(
        {
            "fp_top1": 0.8,
            "top1": 0.7,
            "top5": 0.95,
            "ns_top1": 0.69,
            "target_w": 2.0,
            "target_a": 2.0,
            "avg_bits_w": 2.0,
            "avg_bits_a": 2.0,
            "converged": True,
            "layers": bits_table(model),
        }
    )
    assert b.finish() is True
    assert b.run_id == a.run_id

    run = client.get_run(a.run_id)
    assert run.info.status == "FINISHED"
    # every metric point, including those logged while the server was down
    assert [m.step for m in client.get_metric_history(a.run_id, "train/loss")] == list(range(12))
    layers = [r["name"] for r in bits_table(model)]
    for name in layers:
        assert len(client.get_metric_history(a.run_id, f"bits/w/{name}")) == 3
        assert len(client.get_metric_history(a.run_id, f"bits/a/{name}")) == 3
    assert {"val/top1", "bits/mean_w", "final/top1", "final/fp_top1"} <= set(run.data.metrics)
    # params: the whole config, dotted
    assert run.data.params["quant.target_w"] == "2.0" and run.data.params["model.name"] == "gdnsq_smallcnn"
    assert run.data.params["data.train_path"] == "postgresql://alice:***@db.internal:5432/images"
    tags = run.data.tags
    assert tags["gdnsq.model"] == "gdnsq_smallcnn" and tags["gdnsq.target_w"] == "2"
    assert "per-channel" in tags["gdnsq.protocol"] and tags["gdnsq.fp_layers"] == "stem.0, head"
    assert tags["gdnsq.fp_checkpoint"] and tags["gdnsq.version"]
    assert tags["api_token"] == "***"
    # artifacts: per-epoch tables, plots, config
    root = [f.path for f in client.list_artifacts(a.run_id)]
    assert {
        "bits_evolution.png",
        "accuracy_vs_bits.png",
        "bits_per_layer.png",
        "config.json",
        "summary.json",
        "bits",
    } <= set(root)
    assert {f"bits/epoch_00{e}.{ext}" for e in range(3) for ext in ("json", "csv")} <= {
        f.path for f in client.list_artifacts(a.run_id, "bits")
    }
    table = json.loads(Path(client.download_artifacts(a.run_id, "bits/epoch_002.json")).read_text())
    assert [r["name"] for r in table] == layers
    # no secret anywhere
    config_json = Path(client.download_artifacts(a.run_id, "config.json")).read_text()
    blob = json.dumps([run.data.params, run.data.tags]) + config_json
    assert not any(s in blob for s in SECRETS)
    assert not any(Path(os.environ["GDNSQ_OUTBOX_DIR"]).glob("*/journal.jsonl")), "a delivered outbox is removed"


# ---------------------------------------------------------------------------------- registry


def test_registry_champion_load_pull(server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)  # registry functions resolve the store from it
    cfg = make_cfg(server.url, w=3.0, a=4.0)
    name = registry.registered_name(cfg)
    assert name == "gdnsq_smallcnn-w3a4"
    x = torch.randn(3, 1, 28, 28)

    results = []
    for i, ns in enumerate((0.50, 0.70, 0.60)):
        torch.manual_seed(i)
        model, _ = train_student(cfg, steps=1 + i)
        tracker = create_tracker(cfg)
        tracker.log_config(cfg)
        summary = {
            "fp_top1": 0.9,
            "top1": ns + 0.01,
            "top5": 0.99,
            "ns_top1": ns,
            "converged": True,
            "avg_bits_w": 3.0,
            "avg_bits_a": 4.0,
            "layers": bits_table(model),
        }
        if i == 1:  # registering after the run ended works as well
            tracker.finish()
        model.train()
        res = registry.register_model(model, cfg, summary, x[:1], tracker_or_run_id=tracker)
        assert model.training, "registering must leave the caller's model as it was"
        tracker.finish()
        with torch.no_grad():
            results.append((res, model, model.eval()(x)))
    (r1, m1, y1), (r2, m2, y2), (r3, _, _) = results
    assert [r["version"] for r, _, _ in results] == ["1", "2", "3"]
    assert [r["champion"] for r, _, _ in results] == [True, True, False]
    assert r3["champion_version"] == "2"

    # the champion rebuilt as the gdnsq student gives the trained model's outputs
    loaded = registry.load_model(f"{name}@champion")
    assert type(loaded) is type(m2) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), y2)

    # pull + offline load of version 1
    pulled = registry.pull_model(f"models:/{name}/1", tmp_path / "pulled")
    assert {"state_dict.safetensors", "config.json", "manifest.json", "layers.csv"} <= set(pulled["files"])
    with torch.no_grad():
        assert torch.equal(registry.load_model(pulled["dir"])(x), y1)

    # plain MLflow: the exported graph loads and runs, no gdnsq code involved
    graph = mlflow.pytorch.load_model(f"models:/{name}@champion")
    with torch.no_grad():
        assert torch.allclose(graph(x), y2, atol=1e-5)

    # model card, tags, manifest
    shown = registry.show_model(f"{name}@champion")
    assert shown["version"] == "2" and shown["aliases"] == ["champion"]
    assert shown["tags"]["ns_top1"] == "0.7" and shown["tags"]["bits.features.0"].startswith("w")
    assert "| layer |" in shown["description"] and "BOPs" in shown["description"]
    man = shown["manifest"]
    assert man["bytes_packed"] < man["bytes_fp32"] and man["bops"] < man["bops_fp32"]
    assert [r["name"] for r in man["layers"]] == [r["name"] for r in bits_table(m2)]
    assert all(r["macs"] > 0 for r in man["layers"]) and {r["name"] for r in man["fp_layers"]} == {"stem.0", "head"}
    listed = {m["name"]: m for m in registry.list_models()}
    assert listed[name]["latest_version"] == "3" and listed[name]["champion"]["version"] == "2"

    # one-line errors for bad references
    for ref, msg in (
        ("nope@champion", "unknown model 'nope'"),
        (f"{name}@staging", "has no alias 'staging'"),
        (f"{name}/99", "has no version 99"),
    ):
        with pytest.raises(RegistryError, match=msg) as err:
            registry.load_model(ref)
        assert "\n" not in str(err.value)


def test_pull_the_most_accurate_version_within_a_byte_budget(server, tmp_path, monkeypatch, capsys):
    """Mixed-precision versions carry their exported size; ``models pull --max-bytes`` picks by budget."""
    from mlflow import MlflowClient

    from gdnsq.cli.main import main
    from gdnsq.export import export_packed
    from gdnsq.quant.layers import iter_quantized

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    cfg = make_cfg(server.url)
    cfg.quant.budget.kind, cfg.quant.budget.value = "bytes", 1e4
    name = "budget-pick-test"
    x = torch.randn(2, 1, 28, 28)
    sizes = []
    # (shift of log2 steps = fewer bits, top-1): the smallest model is the least accurate
    for i, (shift, top1) in enumerate(((0.0, 0.95), (2.0, 0.93), (4.0, 0.80))):
        torch.manual_seed(i)
        model, _ = train_student(cfg, steps=1)
        with torch.no_grad():
            for j, (_, layer) in enumerate(iter_quantized(model)):
                layer.weight_quant.log_s.add_(shift + 0.5 * j)  # layers at different widths
        report = export_packed(model, tmp_path / f"v{i}.gdnsq", example_input=x)
        assert report["bytes_file"] == os.path.getsize(tmp_path / f"v{i}.gdnsq")
        summary = {
            "fp_top1": 0.97,
            "top1": top1,
            "top5": 0.99,
            "ns_top1": top1,
            "converged": True,
            "avg_bits_w": 2.0,
            "avg_bits_a": 2.0,
            "layers": bits_table(model),
        }
        tracker = create_tracker(cfg)
        tracker.log_config(cfg)
        res = registry.register_model(model, cfg, summary, x[:1], tracker_or_run_id=tracker, stats=report, name=name)
        tracker.finish()
        sizes.append(report["bytes_file"])
        tags = MlflowClient(server.url).get_model_version(name, res["version"]).tags
        # the registry's figure is the exported file's size; the other searchable figures are there too
        assert tags["bytes_packed"] == str(report["bytes_file"]) and tags["bytes_payload"] == str(
            report["bytes_payload"]
        )
        assert {"bops", "avg_bits_w", "avg_bits_w_params", "top1", "fp_top1", "budget_kind"} <= set(tags)
    assert sizes[0] > sizes[1] > sizes[2]

    assert registry.select_by_budget(name, max_bytes=sizes[0])["version"] == "1"  # everything fits: the best
    assert registry.select_by_budget(name, max_bytes=sizes[0] - 1)["version"] == "2"
    assert registry.select_by_budget(name, max_bytes=sizes[1] - 1)["version"] == "3"
    with pytest.raises(RegistryError, match="no converged version"):
        registry.select_by_budget(name, max_bytes=sizes[2] - 1)
    bops = float(MlflowClient(server.url).get_model_version(name, "3").tags["bops"])
    assert registry.select_by_budget(name, max_bops=bops)["version"] == "3"

    # the same query with plain MLflow: the documented filter, numeric bounds on the returned tags
    versions = MlflowClient(server.url).search_model_versions(registry.budget_filter(name))
    fits = [v for v in versions if float(v.tags["bytes_packed"]) <= sizes[1]]
    assert max(fits, key=lambda v: float(v.tags["top1"])).version == "2"

    assert main(["models", "pull", name, "--max-bytes", str(sizes[1]), "--out", str(tmp_path / "pulled")]) == 0
    assert json.loads((tmp_path / "pulled" / "source.json").read_text())["version"] == "2"
    out = capsys.readouterr().out
    assert f"chose {name}/2" in out and f"pulled {name} version 2" in out
