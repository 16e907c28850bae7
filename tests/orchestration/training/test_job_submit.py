"""`ray job submit` end to end against a real `ray start --head`, and resuming after the driver dies.

The cluster is a separate process tree started here (not the in-process test Ray); the job's driver
is `python pipelines/train.py ...` run by Ray from an uploaded working directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_TRAIN
from pipelines.checkpoints import list_checkpoints


def run_checkpoints(storage: Path, name: str) -> list[tuple[int, str]]:
    return [(c.step, c.location) for c in list_checkpoints(storage / name)]

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration

FAST = [o for o in FAST_TRAIN if not o.startswith(("train.max_steps", "train.checkpoint_every"))]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A Ray head started with `ray start --head` (own temp dir and ports); stopped by PID afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    # Every port explicit: other Ray instances of the test session hold the defaults (the dashboard
    # agent's 52365 above all — without its own port the head never gets an agent that accepts jobs).
    cmd = [str(BIN / "ray"), "start", "--head", "--num-cpus", "4", "--port", str(_free_port()),
           "--dashboard-port", str(dash), "--include-dashboard", "true", "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
           "--ray-client-server-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
           "--runtime-env-agent-port", str(_free_port()), "--temp-dir", str(tmp)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90  # the dashboard agent that accepts jobs comes up after `ray start` returns
    while True:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 or time.time() > deadline:
            break
        time.sleep(2)
    yield address, env, tmp
    # `ray stop` would kill every Ray on the machine: kill this cluster's processes by session dir.
    out = subprocess.run(["pgrep", "-f", str(tmp)], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


def _submit(address, env, args, *, wait=True, timeout=600, submission_id=None):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", "python", "pipelines/train.py", *args]
    deadline = time.time() + 90
    while True:  # right after `ray start`, the agent that accepts jobs may not be up yet
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


def test_ray_job_submit_trains_and_logs(head, tmp_path):
    address, env, _ = head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = FAST + ["name=submitted", "train.max_steps=6", "train.checkpoint_every=3", f"tracking.uri={uri}",
                   f"ray.storage_path={tmp_path / 'ray'}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"train.output_dir={tmp_path / 'out'}"]
    proc = _submit(address, env, args)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "[elf] done" in proc.stdout and "step 6/6" in proc.stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("elf/local").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["curves/loss"] > 0
    assert run_checkpoints(tmp_path / "ray", "submitted")[-1][0] == 6


def test_killed_driver_resumes_when_resubmitted(head, tmp_path):
    address, env, _ = head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = 60  # long enough that it cannot finish while `ray job stop` takes effect (measured: the stop
    #             landed at step 6, 2 steps after the step-4 checkpoint; 54 steps of margin)
    args = FAST + ["name=killed", f"train.max_steps={steps}", "train.checkpoint_every=2", f"tracking.uri={uri}",
                   f"ray.storage_path={tmp_path / 'ray'}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"train.output_dir={tmp_path / 'out'}"]
    job_id = f"killed-{int(time.time())}"
    proc = _submit(address, env, args, wait=False, submission_id=job_id)
    assert proc.returncode == 0, proc.stderr
    storage = tmp_path / "ray"
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s, _ in run_checkpoints(storage, "killed") if s >= 4]:
        time.sleep(1)
    assert run_checkpoints(storage, "killed"), "no checkpoint appeared"
    for _ in range(30):  # `ray job stop` kills the driver (and with it the Train controller and workers)
        stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job_id], env=env,
                              capture_output=True, text=True, timeout=120)
        if stop.returncode == 0:
            break
        time.sleep(2)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    time.sleep(5)
    stopped_at = run_checkpoints(storage, "killed")[-1][0]
    time.sleep(5)
    assert run_checkpoints(storage, "killed")[-1][0] == stopped_at  # nothing trains on after the kill
    print(f"ray job stop landed at checkpoint step {stopped_at}")
    assert stopped_at < steps

    proc = _submit(address, env, args)  # the same command again
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resum" in proc.stdout
    assert f"step {steps}/{steps}" in proc.stdout, "\n".join(l for l in proc.stdout.splitlines() if "elf" in l or "step" in l)[-4000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("elf/local").experiment_id])
    assert len(runs) == 1  # the re-submitted job continued the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["elf.resume_count"] == "1"
    assert "ray job stop" not in run.data.tags.get("elf.error", "")  # the stop ended it KILLED, then it was reattached
    history = {m.step for m in client.get_metric_history(run.info.run_id, "curves/loss")}
    assert max(history) == steps
