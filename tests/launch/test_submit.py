"""``gdnsq submit`` / ``gdnsq jobs`` against a real Ray head with its job server and token auth on.

One single-node cluster (dashboard on 127.0.0.1, a private token) serves the module. The submitting
processes get the token the way a laptop would (``RAY_AUTH_TOKEN_PATH``, with ``RAY_AUTH_MODE`` unset and
an empty HOME), so these tests fail if gdnsq stops sending it. Total ~2-3 minutes on 2 shared cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission")

from ray._private.utils import get_dashboard_dependency_error  # noqa: E402
from ray_cluster import LocalCluster  # noqa: E402

from gdnsq.cli import main  # noqa: E402
from gdnsq.errors import ConfigError  # noqa: E402
from gdnsq.launch import job_server as js  # noqa: E402
from gdnsq.launch import submit as sm  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning"),  # inside Ray's log tail
]

ROOT = Path(__file__).resolve().parents[2]
CPU_JOB = ROOT / "jobs" / "cpu_smallcnn_w2a2.yaml"
QUICK = [
    "--train.epochs",
    "1",
    "--train.max_steps_per_epoch",
    "3",
    "--train.teacher_epochs",
    "1",
    "--ray.enabled",
    "false",
    "--tracking.enabled",
    "false",
]
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def cluster():
    if (missing := get_dashboard_dependency_error()) is not None:
        # The head's job server is part of ray[default]; ray[train,tune] lacks it (cluster images have it).
        pytest.skip(f"a local Ray job server needs ray[default] ({missing})")
    # The job's entrypoint is the `gdnsq` console script, as on a cluster image: put ours on the nodes' PATH.
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        with LocalCluster(nodes=1, cpus_per_node=2, dashboard=True, start_timeout=300) as c:
            yield c
    finally:
        mp.undo()


@pytest.fixture
def laptop_env(cluster, tmp_path, monkeypatch):
    """The submitting side: the token file only; RAY_ADDRESS points at the GCS (the --address must win)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_TOKEN_PATH=str(cluster.token_path), RAY_ADDRESS=cluster.address)
    for k in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    return env


def gdnsq(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gdnsq.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


def wait_for(url: str, submission_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = js.job_info(url, submission_id)
        if info["status"] in js.TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(2)


def test_submit_runs_the_job_and_its_logs_have_the_summary(cluster, laptop_env, tmp_path, capsys):
    url = cluster.dashboard_url
    # As `ray job submit`: an address without a scheme, and it waits, streaming the job's logs.
    r = gdnsq(
        "submit",
        "-c",
        str(CPU_JOB),
        "--address",
        url.removeprefix("http://"),
        "--name",
        "smoke",
        *QUICK,
        env=laptop_env,
        timeout=JOB_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    submission_id = r.stdout.strip().splitlines()[0]
    assert submission_id.startswith("gdnsq-smoke-")
    assert "quantized top-1" in r.stdout and f"{submission_id} SUCCEEDED" in r.stderr
    assert "\x1b[" not in r.stdout  # RAY_COLOR_PREFIX=0 in the job's environment
    assert "Reporting training result" not in r.stdout and "(RayTrainWorker pid=" not in r.stdout

    info = wait_for(url, submission_id, JOB_TIMEOUT)
    assert info["status"] == "SUCCEEDED", f"{info}\n{js.job_logs(url, submission_id)[-3000:]}"
    assert info["entrypoint"].startswith("gdnsq train cpu_smallcnn_w2a2.yaml --train.epochs=1 ")
    assert info["metadata"]["gdnsq_name"] == "smoke"

    logs = gdnsq("jobs", "logs", submission_id, "--address", url, env=laptop_env)
    assert logs.returncode == 0, logs.stderr
    assert "quantized top-1" in logs.stdout and "model gdnsq_smallcnn  target W2A2" in logs.stdout

    assert main(["jobs", "logs", submission_id, "--follow", "--address", url]) == 0  # websocket, same token
    followed = capsys.readouterr()
    assert "quantized top-1" in followed.out and f"{submission_id} SUCCEEDED" in followed.err

    assert main(["jobs", "list", "--address", url]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [submission_id, "SUCCEEDED", "smoke"] in listed
    assert main(["jobs", "stop", submission_id, "--address", url]) == 0
    assert capsys.readouterr().out.strip() == f"{submission_id}: already ended"


def test_a_broken_job_never_reaches_the_cluster(cluster, laptop_env, tmp_path, capsys):
    url = cluster.dashboard_url
    bad = tmp_path / "bad.yaml"
    bad.write_text(CPU_JOB.read_text() + "quant_typo: 1\n")
    before = js.list_jobs(url)
    r = gdnsq("submit", str(bad), "--address", url, env=laptop_env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gdnsq: error: quant_typo: unknown setting; did you mean quant? "
        "(known here: name, model, data, quant, objective, schedule, optim, "
        "train, ray, tracking)"
    ]
    assert r.stdout == ""
    # A bad override is refused the same way.
    assert main(["submit", str(CPU_JOB), "--address", url, "--quant.target_w", "17"]) == 2
    assert capsys.readouterr().err.startswith("gdnsq: error: quant.target_w: must be an integer in [1, 16]")
    assert len(js.list_jobs(url)) == len(before)


def test_token_auth_is_enforced_and_errors_are_one_line(cluster, laptop_env, monkeypatch, capsys):
    url = cluster.dashboard_url
    # A fresh process (Ray caches tokens per process); HOME is empty: no ~/.ray/auth_token either.
    no_token = {k: v for k, v in laptop_env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    r = gdnsq("jobs", "list", "--address", url, env=no_token)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Authentication required" in r.stderr and "RAY_AUTH_TOKEN" in r.stderr

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["jobs", "list", "--address", url]) == 2
    assert "Authentication failed" in capsys.readouterr().err

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    assert main(["jobs", "status", "gdnsq-no-such-job", "--address", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "404" in err and "gdnsq-no-such-job" in err


# ------------------------------------------------------------------ the submission, built without a cluster


def test_submission_of_a_sweep_file_runs_gdnsq_sweep(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(CPU_JOB.read_text() + "sweep:\n  optim.lr: [0.001, 0.002]\n")
    sub = sm.build_submission(sweep, {"train.epochs": "2"}, submission_id="s1")
    assert sub.entrypoint == "gdnsq sweep sweep.yaml --train.epochs=2"
    assert sub.runtime_env["working_dir"] == str(tmp_path)
    assert (sub.submission_id, sub.entrypoint_num_cpus, sub.entrypoint_num_gpus) == ("s1", 0, 0)


def test_submission_layout_resources_and_shipped_code(tmp_path):
    sub = sm.build_submission(CPU_JOB, {"ray.enabled": "false"}, name="a b", working_dir=ROOT, ship_code=True)
    assert sub.entrypoint == "gdnsq train jobs/cpu_smallcnn_w2a2.yaml --ray.enabled=false '--name=a b'"
    assert sub.submission_id.startswith("gdnsq-a-b-")
    assert {".venv", ".git", "runs", "out", ".gdnsq", "/gdnsq"} <= set(sub.runtime_env["excludes"])
    assert sub.runtime_env["py_modules"] == [str(ROOT / "gdnsq")]
    assert sub.entrypoint_num_cpus == 1  # no Ray Train: the driver trains, so it reserves the worker's CPU
    with pytest.raises(ConfigError, match="^--working-dir: .* does not contain the job file"):
        sm.build_submission(CPU_JOB, working_dir=tmp_path)


def test_addresses_and_runtime_env_as_ray_job_submit_takes_them(tmp_path, monkeypatch):
    for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert js.resolve_address("head:8265") == "http://head:8265"
    assert js.resolve_address("https://ray.example.org/") == "https://ray.example.org"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert js.resolve_address(None) == "http://10.0.0.5:8265"
    with pytest.raises(ConfigError, match="^RAY_ADDRESS: .* GCS port"):
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
        js.resolve_address(None)
    env = tmp_path / "env.yaml"
    env.write_text("env_vars: {MLFLOW_TRACKING_URI: http://mlflow:5000}\npip: [onnx]\n")
    sub = sm.build_submission(CPU_JOB, runtime_env=sm.read_runtime_env(str(env), None))
    env_vars = sub.runtime_env["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env_vars["RAY_COLOR_PREFIX"] == "0"
    assert env_vars["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and env_vars["PYTHONUNBUFFERED"] == "1"
    assert sub.runtime_env["pip"] == ["onnx"] and ".venv" in sub.runtime_env["excludes"]
    with pytest.raises(ConfigError, match="^--runtime-env-json: not valid JSON"):
        sm.read_runtime_env(None, "{nope")


def test_a_checkpoint_only_the_cluster_sees_is_left_to_the_cluster(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        CPU_JOB.read_text().replace(
            "  name: gdnsq_smallcnn", "  name: gdnsq_smallcnn\n  checkpoint: /mnt/cluster-only/fp.pth"
        )
    )
    sub = sm.build_submission(job)
    assert sub.warnings == [
        "model.checkpoint: no such file '/mnt/cluster-only/fp.pth' here; it must exist on the cluster"
    ]
    assert sub.entrypoint == "gdnsq train job.yaml"
    with pytest.raises(ConfigError, match="^quant.target_w"):  # every other error still stops here
        sm.build_submission(job, {"quant.target_w": "0"})
