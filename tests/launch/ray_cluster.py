"""A real multi-node Ray cluster on this machine, for integration tests (no mocks).

Each node is its own ``ray start --block`` process group with its own temp dir, free ports and a
private token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``), so several clusters (other
engineers' tests) can live side by side. Teardown ends only this cluster's processes, by pid:
never ``ray stop``, which kills every Ray process on the machine.

    with LocalCluster(nodes=2, cpus_per_node=1) as cluster:
        cluster.connect()                 # ray.init in this process (token env set)
        ...                               # or pass cluster.address / cluster.env to subprocesses

``kill_node(i)`` loses a worker node (SIGKILL of everything on it); ``add_node()`` starts a replacement.

``LocalCluster(dashboard=True)`` also starts the dashboard / job server on ``cluster.dashboard_url``
(for ``JobSubmissionClient``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
IP = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((IP, 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((IP, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"GCS port {port} not open after {timeout:.0f}s:\n{_tail(log)}")


# Runs beside the test process: if that dies without stop() (killed, timed out, a broken pipe),
# it ends this cluster's processes (their process groups, and anything naming the cluster's
# root), by pid, then removes the root. It exits by itself once stop() has removed the root.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
parent, root = int(sys.argv[1]), sys.argv[2]
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while os.path.isdir(root) and alive(parent):
    time.sleep(0.2)
if os.path.isdir(root):
    try:
        groups = {int(x) for x in open(os.path.join(root, "pgids")).read().split()}
    except OSError:
        groups = set()
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        try:
            mine = os.getpgid(pid) in groups or (root + "/").encode() in open(f"/proc/{pid}/cmdline", "rb").read()
            if mine and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    time.sleep(1.0)
    shutil.rmtree(root, ignore_errors=True)
"""


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class LocalCluster:
    """``nodes`` Ray nodes on 127.0.0.1 (node 0 is the head), ``cpus_per_node`` CPUs each."""

    def __init__(
        self,
        nodes: int = 2,
        cpus_per_node: int = 1,
        *,
        dashboard: bool = False,
        object_store_mb: int = 200,
        start_timeout: float = 120.0,
        node_env: dict[str, str] | None = None,
    ):
        self.nodes, self.cpus_per_node, self.dashboard = nodes, cpus_per_node, dashboard
        self.extra_node_env = dict(node_env or {})  # e.g. Ray Train tunables, seen by every actor
        self.object_store_mb, self.start_timeout = object_store_mb, start_timeout
        # Short root: Ray's unix socket paths (<temp>/session_*/sockets/...) must stay under 107 chars.
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.port = free_port()
        self.address = f"{IP}:{self.port}"
        self.dashboard_port = free_port() if dashboard else None
        self.dashboard_url = f"http://{IP}:{self.dashboard_port}" if dashboard else None
        self.token_path = self.root / "auth_token"
        self.procs: list[subprocess.Popen] = []
        self._connected = False
        self._saved_env: dict[str, str | None] = {}
        self._watchdog: subprocess.Popen | None = None

    # ----------------------------------------------------------------------------- environment
    @property
    def env(self) -> dict[str, str]:
        """What a client of this cluster (driver, ``ray`` CLI, job submission) needs in its env."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_ADDRESS": self.address,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(self.env)
        env.pop("RAY_ADDRESS")
        env.update(self.extra_node_env)
        return env

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> LocalCluster:
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        self.token_path.write_text(generate_new_authentication_token())
        self.token_path.chmod(0o600)
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.root)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._start_node(0)
            _wait_port(self.port, self.start_timeout, self.procs[0], self.root / "node0.log")
            for i in range(1, self.nodes):
                self._start_node(i)
            self.wait_for_nodes(self.nodes, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, i: int) -> None:
        temp = self.root / f"n{i}"
        temp.mkdir()
        cmd = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={IP}",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--temp-dir={temp}",
            f"--object-store-memory={self.object_store_mb << 20}",
            "--disable-usage-stats",
            # Every fixed default port would collide with another cluster on this machine.
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        if i == 0:
            cmd += ["--head", f"--port={self.port}"]
            if self.dashboard:
                cmd += ["--include-dashboard=true", f"--dashboard-host={IP}", f"--dashboard-port={self.dashboard_port}"]
            else:
                cmd += ["--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        log = open(self.root / f"node{i}.log", "wb")
        # Own session = own process group: teardown signals exactly this node's processes.
        self.procs.append(
            subprocess.Popen(
                cmd,
                env=self._node_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        )
        with open(self.root / "pgids", "a") as f:
            f.write(f"{self.procs[-1].pid}\n")

    def wait_for_nodes(self, n: int, timeout: float) -> None:
        """Block until ``n`` nodes are alive (checked from a separate process)."""
        code = (
            "import ray, sys, time\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {timeout}\n"
            f"while sum(x['Alive'] for x in ray.nodes()) < {n} and time.monotonic() < deadline:\n"
            "    time.sleep(0.5)\n"
            f"sys.exit(0 if sum(x['Alive'] for x in ray.nodes()) >= {n} else 3)\n"
        )
        env = {**self._node_env(), "RAY_ADDRESS": self.address}
        try:
            r = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout + 60
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"cluster {self.address}: {n} nodes not alive after {timeout:.0f}s") from None
        if r.returncode != 0:
            logs = "\n".join(f"--- node{i}\n{_tail(self.root / f'node{i}.log')}" for i in range(len(self.procs)))
            raise TimeoutError(
                f"cluster {self.address}: {n} nodes not alive after {timeout:.0f}s "
                f"(rc {r.returncode})\n{r.stderr[-3000:]}\n{logs}"
            )

    def connect(self, **init_kwargs):
        """``ray.init`` this process to the cluster (the token env is set until ``stop``)."""
        import ray
        from ray._private.authentication.authentication_token_setup import (
            _enable_token_auth,
        )
        from ray._raylet import AuthenticationTokenLoader

        for k, v in self.env.items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        _enable_token_auth()  # re-reads RAY_AUTH_MODE in this process
        AuthenticationTokenLoader.instance().reset_cache()  # and our token path, not a cached token
        if ray.is_initialized():
            ray.shutdown()
        ctx = ray.init(address=self.address, logging_level="WARNING", **init_kwargs)
        self._connected = True
        return ctx

    def add_node(self) -> int:
        """Start one more worker node (as an autoscaler replaces a lost one); returns its index.
        Does not wait for it: see :meth:`wait_for_nodes`."""
        i = len(self.procs)
        self._start_node(i)
        return i

    def kill_node(self, i: int) -> None:
        """Lose node ``i`` as a machine is lost: SIGKILL its process group (``ray start``, its raylet
        and the workers it spawned) and anything else naming its temp dir. Not the head (``i`` >= 1)."""
        if i < 1:
            raise ValueError("kill_node: node 0 is the head (its GCS is the cluster)")
        proc = self.procs[i]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        temp = f"{self.root / f'n{i}'}/"
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    mine = temp.encode() in f.read()
                if mine:
                    os.kill(int(d), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        proc.wait(10)

    def alive_nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def _our_pids(self) -> set[int]:
        """Live processes of this cluster: our process groups plus anything naming our temp dir."""
        import psutil

        pids = set()
        root = f"{self.root}/"  # the slash: never a prefix of another cluster's root
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.pid) in {q.pid for q in self.procs} or any(root in a for a in p.info["cmdline"] or []):
                    pids.add(p.pid)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        pids.discard(os.getpid())
        return pids

    def stop(self, grace: float = 0.0) -> None:
        import psutil

        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()
        # SIGTERM first (`ray start --block` then stops its children), but that takes seconds (~30 s at
        # worst) and a test cluster keeps nothing worth a clean stop: unless a grace is given, everything
        # of this cluster is SIGKILLed at once, by pid (measured: 5.6-5.9 s -> 1.9-2.5 s per stop, load 15-18).
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        left = self._our_pids()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        psutil.wait_procs([psutil.Process(p) for p in left if psutil.pid_exists(p)], timeout=5)
        for proc in self.procs:
            if proc.poll() is None:
                proc.wait(5)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watchdog is not None:
            try:
                self._watchdog.wait(5)  # it sees the root gone within a second
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_cluster(nodes: int = 2, cpus_per_node: int = 1, **kwargs) -> LocalCluster:
    return LocalCluster(nodes, cpus_per_node, **kwargs).start()
