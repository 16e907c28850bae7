"""A real two-node Ray cluster on this machine: placement across nodes, a node killed mid-run, resume.

Two ``ray start --block`` processes (a head tagged ``{"head_node": 1}`` and a worker node tagged
``{"worker_node": 1}``, 2 CPUs each) on distinct loopback addresses (127.0.0.2 / 127.0.0.3: Ray maps
127.0.0.1 to the machine's outside address, these it keeps), each in its own process group with its
own temp dir and ports, so nothing touches other Ray instances on the machine (never ``ray stop``).
The driver, ``pipelines/train.py`` in a subprocess with ``RAY_ADDRESS`` at the head, trains 2 workers
of 2 CPUs each — one per node — checkpointing to a directory both nodes share and logging to the
session's MLflow *server*. Once a checkpoint is committed, the worker node's whole process tree is
SIGKILLed, then a new worker node joins; Ray Train restarts the worker group from the committed
checkpoint and the run finishes at the planned step, FINISHED in MLflow.

Environment (``shared/stack-notes.md``): ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` must be unset (a node
joining a cluster refuses it), ``RAY_AUTH_MODE=disabled`` on every process. The nodes get
``RAY_ADDRESS`` too: Train's helper actors query the state API, which otherwise refuses to pick one
of several Ray instances running on the machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

psutil = pytest.importorskip("psutil")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
CPUS_PER_NODE = 2
MAX_STEPS, CKPT_EVERY = 12, 3
STARTUP_ATTEMPTS = 2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(gcs_address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
               RAY_ADDRESS=gcs_address, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25")
    return env


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.load(resp)


def _kill_tree(pid: int, timeout: float = 15.0, marker: str | None = None) -> list[int]:
    """SIGKILL ``pid`` and every descendant (Ray workers run in sessions of their own, so a
    process-group kill would miss them), plus orphans whose command line holds ``marker`` (a temp
    dir only this node uses). Returns the pids killed."""
    procs: dict[int, Any] = {}
    try:
        root = psutil.Process(pid)
        procs = {p.pid: p for p in (root, *root.children(recursive=True))}
    except psutil.NoSuchProcess:
        pass
    if marker:
        for p in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in (p.info.get("cmdline") or ())):
                procs.setdefault(p.pid, p)
                for child in p.children(recursive=True):
                    procs.setdefault(child.pid, child)
    procs = list(procs.values())
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"processes survived SIGKILL: {[p.pid for p in alive]}"
    return [p.pid for p in procs]


class RayNode:
    """One ``ray start --block`` process (and its tree): a head or a worker node of the cluster."""

    def __init__(self, name: str, ip: str, base: Path, resources: dict[str, float], gcs_port: int,
                 dashboard_port: int | None = None) -> None:
        self.name, self.ip, self.head = name, ip, dashboard_port is not None
        self.temp_dir = base / name
        self.temp_dir.mkdir(parents=True)
        self.log_path = base / f"{name}.log"
        gcs_address = f"{HEAD_IP}:{gcs_port}"
        # Every port explicit and free: two nodes on one machine (plus other helpers' Ray) would
        # otherwise collide on the defaults (dashboard agent 52365, runtime-env agent, metrics, ...).
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", ip,
            "--num-cpus", str(CPUS_PER_NODE), "--resources", json.dumps(resources),
            "--temp-dir", str(self.temp_dir), "--object-store-memory", str(256 * 1024 * 1024),
            "--disable-usage-stats", "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--node-manager-port", str(_free_port()),
            "--object-manager-port", str(_free_port()),
        ]  # fmt: skip
        if self.head:
            cmd += ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(_free_port())]
        else:
            cmd += ["--address", gcs_address]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=_node_env(gcs_address), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=base)
        self.node_id: str | None = None

    def kill(self) -> list[int]:
        """SIGKILL the node's whole process tree (raylet, agents, its Ray workers)."""
        killed = _kill_tree(self.proc.pid, marker=os.path.join(self.temp_dir, ""))
        self.proc.wait(timeout=10)
        return killed

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


class TwoNodeCluster:
    """Head + one worker node; helpers over the head's dashboard (state API) at 127.0.0.1."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under the temp dirs (107-byte AF_UNIX limit).
        self.base = Path(tempfile.mkdtemp(prefix="elf-mn-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"{HEAD_IP}:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[RayNode] = []
        t0 = time.monotonic()
        try:
            self.head = self._start("head", HEAD_IP, {"head_node": 1}, head=True)
            self.worker = self._start("worker", WORKER_IP, {"worker_node": 1})
        except BaseException:
            self.shutdown()
            raise
        self.startup_s = time.monotonic() - t0

    def _start(self, name: str, ip: str, resources: dict[str, float], head: bool = False) -> RayNode:
        known = {n.node_id for n in self.nodes}
        for attempt in range(STARTUP_ATTEMPTS):
            node = RayNode(f"{name}-{attempt}" if attempt else name, ip, self.base, resources, self.gcs_port,
                           self.dashboard_port if head else None)
            self.nodes.append(node)
            try:
                # Not a node seen before: a killed node at the same address stays ALIVE until the
                # GCS health check notices (seconds).
                node.node_id = self.wait_node_alive(node, resources, exclude=known)
                return node
            except RuntimeError:
                # Measured on a loaded 2-core machine: the raylet gives up when its dashboard agent
                # takes > 30 s to start ("Timed out waiting for file dashboard_agent_listen_port").
                node.kill()
                if attempt + 1 == STARTUP_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def api(self, path: str) -> list[dict[str, Any]]:
        data = _get_json(f"{self.dashboard}/api/v0/{path}")
        return data["data"]["result"]["result"]

    def wait_node_alive(self, node: RayNode, resources: dict[str, float], exclude: set[str | None] = frozenset(),
                        timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start ({node.name}) exited {node.proc.returncode}:\n{node.log_tail()}")
            try:
                for n in self.api("nodes?detail=1&limit=100"):
                    tag = next(iter(resources))
                    if (n["state"] == "ALIVE" and n["node_ip"] == node.ip and n["node_id"] not in exclude
                            and n["resources_total"].get(tag) == resources[tag]):
                        return n["node_id"]
            except OSError:
                pass  # dashboard not up yet
            time.sleep(0.5)
        raise RuntimeError(f"node {node.name} not alive after {timeout:g} s:\n{node.log_tail()}")

    def restart_worker(self) -> RayNode:
        self.worker = self._start(f"worker-{len(self.nodes)}", WORKER_IP, {"worker_node": 1})
        return self.worker

    def train_workers(self, alive_only: bool = False) -> list[dict[str, Any]]:
        """The RayTrainWorker actors the cluster has seen (alive and dead, unless ``alive_only``)."""
        actors = self.api("actors?detail=1&limit=1000")
        return [a for a in actors if a.get("class_name") == "RayTrainWorker"
                and (a.get("state") == "ALIVE" or not alive_only)]

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.kill()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes() -> Any:
    cluster = TwoNodeCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"driver exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{tail}")


def _committed_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint Ray Train's controller has committed: its snapshot file,
    one per Ray Train run (the driver names them ``<storage>/<name>/attempt-*``; any depth here)."""
    steps = []
    for snap in run_dir.glob("**/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            continue  # being written
        if latest:
            steps.append(int(latest["metrics"]["step"]))
    return max(steps) if steps else None


def test_two_node_cluster_is_on_loopback(two_nodes: TwoNodeCluster) -> None:
    """Both nodes joined with their tags and addresses; nothing of ours talks outside 127.0.0.0/8."""
    nodes = {n["node_id"]: n for n in two_nodes.api("nodes?detail=1&limit=100") if n["state"] == "ALIVE"}
    assert set(nodes) == {two_nodes.head.node_id, two_nodes.worker.node_id}
    assert nodes[two_nodes.head.node_id]["is_head_node"] and not nodes[two_nodes.worker.node_id]["is_head_node"]
    assert nodes[two_nodes.head.node_id]["resources_total"]["head_node"] == 1
    assert nodes[two_nodes.worker.node_id]["resources_total"]["worker_node"] == 1
    assert {n["resources_total"]["CPU"] for n in nodes.values()} == {float(CPUS_PER_NODE)}
    for node in (two_nodes.head, two_nodes.worker):  # the live ones (a start may have been retried)
        root = psutil.Process(node.proc.pid)
        tree = [root, *root.children(recursive=True)]
        for p in tree:
            try:
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.raddr:
                    ip = ipaddress.ip_address(c.raddr.ip)
                    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.2 -> 127.0.0.2
                    assert ip.is_loopback, f"{node.name} pid {p.pid} talks to {c.raddr}"
    # pipelines.infra.storage.nodes_for_run, from a driver on the head, counts both alive nodes.
    code = ("import ray, json; ray.init(address='%s'); from pipelines.infra.storage import nodes_for_run; "
            "print(json.dumps([nodes_for_run(2, 2, 0), nodes_for_run(1, 1, 0), nodes_for_run(1, 1, 1)]))"
            % two_nodes.address)
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=_node_env(two_nodes.address),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2, 2, 2]


def test_killed_worker_node_resumes_from_checkpoint(two_nodes: TwoNodeCluster, mlflow_server: str,
                                                    tmp_path: Path) -> None:
    from mlflow import MlflowClient

    shared = tmp_path / "shared"  # both "nodes" are on this machine: one disk, opted in below
    name = f"multinode-{uuid.uuid4().hex[:8]}"
    experiment = "elf/multinode-test"
    env = _node_env(two_nodes.address)
    env.update(MLFLOW_TRACKING_URI=mlflow_server, ELF_SHARED_STORAGE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "pipelines/train.py", "--config", "experiments/local_default.yaml", f"name={name}",
           f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CKPT_EVERY}", f"train.log_every={CKPT_EVERY}",
           # 4 documents (~270 rows): each node's first worker builds the latent cache, and the
           # whole corpus would take both of them over a minute on 2 shared cores.
           "data.max_rows=4", "train.global_batch_size=8", "ray.num_workers=2", f"ray.cpus_per_worker={CPUS_PER_NODE}",
           "ray.max_failures=2",
           "tracking.log_samples=0", f"tracking.experiment={experiment}",
           f"ray.storage_path={shared / 'ray'}", f"train.output_dir={shared / 'out'}"]
    log = tmp_path / "driver.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        driver = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        # 1. One worker per node: each asks for all CPUs of a node (2), so Ray must spread them.
        first = _wait_for(lambda: (lambda alive: alive if len(alive) == 2 else None)(two_nodes.train_workers(True)),
                          240, "2 alive Ray Train workers", driver, log)
        assert {a["node_id"] for a in first} == {two_nodes.head.node_id, two_nodes.worker.node_id}
        on_worker_node = next(a for a in first if a["node_id"] == two_nodes.worker.node_id)

        # 2. A committed checkpoint, then SIGKILL the worker node's whole tree mid-run.
        run_dir = shared / "ray" / name
        at_kill = _wait_for(lambda: _committed_step(run_dir), 240, "a committed checkpoint", driver, log)
        assert at_kill < MAX_STEPS, f"the run reached its committed step {at_kill} before the kill"
        t_kill = time.monotonic()
        killed = two_nodes.worker.kill()
        assert on_worker_node["pid"] in killed, "the Train worker on the worker node was not in its tree"
        assert not psutil.pid_exists(on_worker_node["pid"])

        # 3. A new worker node joins; the run must carry on there, from the checkpoint.
        new_node = two_nodes.restart_worker()
        assert new_node.node_id != on_worker_node["node_id"]
        rc = driver.wait(timeout=300)
        t_end = time.monotonic()
    finally:
        if driver.poll() is None:
            _kill_tree(driver.pid)
    text = log.read_text(errors="replace")
    assert rc == 0, f"driver exited {rc}:\n{text[-6000:]}"

    resumed = [int(m) for m in re.findall(r"resumed at step (\d+)", text)]
    assert resumed, f"no resume in the driver output:\n{text[-6000:]}"
    # Resumed from a committed checkpoint at or after the one seen committed before the kill.
    assert resumed[-1] % CKPT_EVERY == 0 and at_kill <= resumed[-1] < MAX_STEPS
    assert _committed_step(run_dir) == MAX_STEPS
    assert re.search(rf"done in .*: {MAX_STEPS} steps", text), text[-3000:]
    assert "[elf] storage: 2 node(s); checkpoints: local (opted in)" in text

    # The restarted group again spans both nodes, the new worker node included.
    later = [a for a in two_nodes.train_workers() if a["actor_id"] not in {f["actor_id"] for f in first}]
    assert {a["node_id"] for a in later if a["node_id"]} == {two_nodes.head.node_id, new_node.node_id}

    # 4. MLflow (the server, over HTTP): one FINISHED run with the final step's metrics.
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    loss_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "curves/loss")})
    assert loss_steps[-1] == MAX_STEPS and CKPT_EVERY in loss_steps
    assert all(
        any(m.step == MAX_STEPS for m in client.get_metric_history(run.info.run_id, key))
        for key in ("curves/loss", "lr", "grad_norm", "tokens_per_s")
    )
    print(f"\n[multinode] cluster up {two_nodes.startup_s:.1f} s; driver to kill {t_kill - t0:.1f} s "
          f"(committed step {at_kill}); kill to finish {t_end - t_kill:.1f} s; resumed at {resumed}")


def test_multinode_run_refuses_node_local_storage(two_nodes: TwoNodeCluster, tmp_path: Path) -> None:
    """Without the opt-in, a 2-node run with a local checkpoint dir and a SQLite store stops before
    any worker starts, naming both settings."""
    env = _node_env(two_nodes.address)
    env.pop("ELF_SHARED_STORAGE", None)
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "pipelines/train.py", "--config", "experiments/local_default.yaml", "name=refused",
           "train.max_steps=2", "ray.num_workers=2", f"ray.cpus_per_worker={CPUS_PER_NODE}",
           f"ray.storage_path={tmp_path / 'ray'}", f"train.output_dir={tmp_path / 'out'}",
           f"tracking.uri=sqlite:///{db}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "ray.storage_path=" in proc.stderr and "node-local" in proc.stderr, proc.stderr[-3000:]
    assert "sqlite:///" in proc.stderr and "ELF_SHARED_STORAGE=1" in proc.stderr, proc.stderr[-3000:]
    assert not two_nodes.train_workers(alive_only=True)
    assert not (tmp_path / "ray" / "refused").exists()
    print(f"\n[multinode] refused in {time.monotonic() - t0:.1f} s")
