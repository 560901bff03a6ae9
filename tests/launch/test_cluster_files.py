"""The cluster definitions in cluster/ hold what gdnsq relies on: GPUs where training runs, the
shared volume, Ray token auth on every Ray process and client, a `gdnsq` job entrypoint whose
overrides are real settings, and an MLflow server with a secret backend store, proxied S3
artifacts, basic auth and a Host allow-list that admits the URI the Ray pods use.
"""

import configparser
import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SHARED = "/mnt/gdnsq"
TOKEN_SECRET_KEY = "auth_token"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def assert_token_env(env: dict[str, dict], where: str) -> str:
    """RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret's auth_token key; returns the Secret name."""
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE must be token"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert ref.get("key") == TOKEN_SECRET_KEY and ref.get("name"), f"{where}: RAY_AUTH_TOKEN must come from a Secret"
    return ref["name"]


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict) and ("kind" in doc or "cluster_name" in doc)


# ------------------------------------------------------------------------------ Ray cluster launcher


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())


def test_launcher_file_passes_rays_own_validation(launcher):
    util = pytest.importorskip("ray.autoscaler._private.util")
    # What `ray up` does: fill in the AWS provider's defaults, then check schema and node types.
    util.validate_config(util.prepare_config(copy.deepcopy(launcher)))


def test_launcher_gpus_on_workers_only(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert workers
    for name, t in workers.items():
        gpus, cpus = t["resources"].get("GPU", 0), t["resources"].get("CPU", 0)
        assert gpus >= 1, f"{name} has no GPU"
        assert cpus >= 4 * gpus, f"{name}: too few CPUs per GPU for FFCV decoding"
        assert 0 <= t["min_workers"] <= t["max_workers"]


def test_launcher_token_auth_and_private_dashboard(launcher):
    assert launcher["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert re.search(r"RAY_AUTH_MODE=token ray start --head\b", head_start)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token ray start --address=" in " ".join(launcher["worker_start_ray_commands"])


def test_launcher_shared_storage_and_gdnsq_install(launcher):
    assert f"--volume {SHARED}:{SHARED}" in launcher["docker"]["run_options"]
    assert any("mount" in c and SHARED in c for c in launcher["initialization_commands"])
    setup = " ".join(launcher["setup_commands"])
    for pkg in ("libopencv-dev", "libturbojpeg0-dev", "pkg-config"):
        assert pkg in setup, f"FFCV's build needs {pkg}"
    assert launcher["file_mounts"].get("~/gdnsq") == "."
    assert re.search(r"pip install .*-e ~/gdnsq", setup)


def test_images_match_pinned_ray(launcher):
    version = pinned_ray_version()
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{version}-py311")
    assert f"FROM rayproject/ray:{version}-py311" in (CLUSTER / "Dockerfile").read_text()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = load_docs(CLUSTER / "kuberay" / name)[-1 if name == "rayjob.yaml" else 1]
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == version


# ------------------------------------------------------------------------------------------ KubeRay


def ray_pods(cluster_spec: dict):
    """(where, pod spec) for the head and every worker group."""
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for g in cluster_spec["workerGroupSpecs"]:
        yield f"worker group {g['groupName']}", g["template"]["spec"]


def check_kuberay_cluster(spec: dict, name: str) -> set[str]:
    secrets = set()
    for where, pod in ray_pods(spec):
        where = f"{name} {where}"
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert "gdnsq-shared" in claims.values(), f"{where}: shared PVC not mounted"
        for c in pod["containers"]:
            secrets.add(assert_token_env(env_of(c), f"{where} {c['name']}"))
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims.get(mounts.get(SHARED)) == "gdnsq-shared", f"{where}: {SHARED} is not the shared PVC"
            assert env_of(c)["MLFLOW_TRACKING_URI"]["value"].startswith("http://mlflow.")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{name} worker group {g['groupName']} has no GPU"
        assert g["minReplicas"] <= g["maxReplicas"]
    return secrets


def test_raycluster_gpu_workers_shared_pvc_and_token_everywhere():
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    pvc = one(path, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "gdnsq-shared" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = one(path, "RayCluster")
    secrets = check_kuberay_cluster(cluster["spec"], "RayCluster")
    if cluster["spec"].get("enableInTreeAutoscaling"):
        autoscaler_env = {e["name"]: e for e in cluster["spec"]["autoscalerOptions"]["env"]}
        secrets.add(assert_token_env(autoscaler_env, "autoscaler sidecar"))
    assert len(secrets) == 1, f"one token Secret for the whole cluster, got {secrets}"
    assert "authOptions" not in cluster["spec"], "use authOptions or explicit env, not both"
    policy = one(path, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] == cluster["metadata"]["name"]


def test_job_files_and_cluster_files_agree_on_mounts_and_mlflow(launcher):
    """Every path a job file names is under the cluster mount, and every cluster gives the job its MLflow
    server through MLFLOW_TRACKING_URI (job files leave tracking.uri unset); docs cite files that exist."""
    options = " ".join(launcher["docker"]["run_options"])
    assert f"--volume {SHARED}:{SHARED}" in options and "--env MLFLOW_TRACKING_URI=http" in options
    for path in sorted((ROOT / "jobs").glob("imagenet_*.yaml")):
        text = path.read_text()
        data = yaml.safe_load(text)
        paths = [data["ray"]["storage_path"], data["data"]["train_path"], data["data"]["val_path"]]
        paths += re.findall(r"(/mnt/\S+|/data/\S+)", text)
        assert all(p.startswith(SHARED + "/") for p in paths), (path.name, paths)
        assert "uri" not in data["tracking"], path.name
        for cited in re.findall(r"\b([\w/-]+\.md)\b", text):
            assert (ROOT / cited).is_file(), f"{path.name} cites {cited}, which does not exist"


def test_rayjob_runs_gdnsq_with_real_settings():
    from gdnsq.config import apply_overrides, config_from_dict, parse_cli_overrides

    job = one(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    spec = job["spec"]
    secrets = check_kuberay_cluster(spec["rayClusterSpec"], "RayJob")
    for c in spec["submitterPodTemplate"]["spec"]["containers"]:
        secrets.add(assert_token_env(env_of(c), f"submitter {c['name']}"))
    assert len(secrets) == 1
    assert spec["shutdownAfterJobFinishes"] is True

    # `cd DIR && gdnsq train JOB --a.b v ...`: the job file exists and every override is a real setting.
    steps = [shlex.split(s) for s in spec["entrypoint"].split("&&")]
    train = steps[-1]
    assert train[:2] == ["gdnsq", "train"], spec["entrypoint"]
    job_file, overrides = train[2], parse_cli_overrides(train[3:])
    assert job_file == "jobs/imagenet_resnet18_w2a2.yaml"
    assert overrides["ray.storage_path"].startswith(SHARED + "/")
    assert all(v.startswith(SHARED + "/") for k, v in overrides.items() if k.startswith("data.") and "path" in k)
    config_from_dict(apply_overrides({"data": {"kind": "ffcv"}}, overrides))  # unknown keys raise
    if not (ROOT / job_file).is_file():
        pytest.skip(f"{job_file} (run by the RayJob) is not in the repository yet")
    config_from_dict(apply_overrides(yaml.safe_load((ROOT / job_file).read_text()), overrides))


def test_rayjob_pods_run_locked_down_inside_a_network_policy():
    """Every pod of the RayJob (submitter, head, workers) drops privileges and is selected by a
    NetworkPolicy that admits only this namespace (its generated cluster name escapes raycluster.yaml's)."""
    docs = load_docs(CLUSTER / "kuberay" / "rayjob.yaml")
    job = one(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    assert policies, "rayjob.yaml needs its own NetworkPolicy"
    spec = job["spec"]["rayClusterSpec"]
    templates = [
        job["spec"]["submitterPodTemplate"],
        spec["headGroupSpec"]["template"],
        *(g["template"] for g in spec["workerGroupSpecs"]),
    ]
    for t in templates:
        labels = (t.get("metadata") or {}).get("labels") or {}
        assert any(
            p["metadata"]["namespace"] == job["metadata"]["namespace"]
            and set(p["spec"]["podSelector"]["matchLabels"].items()) <= set(labels.items())
            and p["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]
            for p in policies
        ), labels
        for c in t["spec"]["containers"]:
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False and "ALL" in sc.get("capabilities", {}).get(
                "drop", []
            ), c["name"]


# ------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_container() -> dict:
    deployment = one(CLUSTER / "mlflow" / "mlflow.yaml", "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def mlflow_flags(container: dict) -> dict[str, str | None]:
    assert container["command"] == ["mlflow", "server"]
    out = {}
    for a in container["args"]:
        k, _, v = a.partition("=")
        out[k] = v or None
    return out


def test_mlflow_server_security_flags(mlflow_container):
    flags = mlflow_flags(mlflow_container)
    assert flags["--app-name"] == "basic-auth"
    assert flags["--artifacts-destination"].startswith("s3://")
    assert "--serve-artifacts" in flags and "--no-serve-artifacts" not in flags
    hosts = flags["--allowed-hosts"].split(",")
    assert hosts and "*" not in hosts


def test_mlflow_flags_exist_and_backend_store_comes_from_a_secret(mlflow_container):
    server = pytest.importorskip("mlflow.cli").server
    options = {opt: p for p in server.params for opt in p.opts}
    for flag in mlflow_flags(mlflow_container):
        assert flag in options, f"mlflow server has no option {flag}"
    # The URI is not on the command line: `mlflow server` reads it from this variable.
    assert "--backend-store-uri" not in mlflow_flags(mlflow_container)
    env = env_of(mlflow_container)
    assert options["--backend-store-uri"].envvar in env
    ref = env[options["--backend-store-uri"].envvar]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    auth_dir = str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).parent)
    assert auth_dir in {m["mountPath"] for m in mlflow_container["volumeMounts"]}


def test_mlflow_admits_the_uri_ray_pods_use(mlflow_container):
    security = pytest.importorskip("mlflow.server.security_utils")
    hosts = mlflow_flags(mlflow_container)["--allowed-hosts"].split(",")
    head = one(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")["spec"]["headGroupSpec"]
    uri = env_of(head["template"]["spec"]["containers"][0])["MLFLOW_TRACKING_URI"]["value"]
    host_header = uri.split("://", 1)[1].rstrip("/")
    assert security.is_allowed_host_header(hosts, host_header), f"{host_header} would get 'Invalid Host header'"
    assert not security.is_allowed_host_header(hosts, "evil.example.com")
    service = one(CLUSTER / "mlflow" / "mlflow.yaml", "Service")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert host_header == f"{name}.{namespace}.svc.cluster.local:{service['spec']['ports'][0]['port']}"


def test_postgres_and_auth_config_agree():
    postgres = CLUSTER / "mlflow" / "postgres.yaml"
    sts = one(postgres, "StatefulSet")
    env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    assert sts["spec"]["volumeClaimTemplates"], "the database needs a persistent volume"
    service = one(postgres, "Service")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    ini = configparser.ConfigParser()
    ini.read_string((CLUSTER / "mlflow" / "basic_auth.ini.example").read_text())
    uri = ini["mlflow"]["database_uri"]
    assert uri.startswith("postgresql://") and f"@{host}:5432/mlflow_auth" in uri
    assert "mlflow_auth" in one(postgres, "ConfigMap")["data"]["01-auth-db.sql"]
