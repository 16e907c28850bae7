"""No MLflow run is ever left RUNNING: Ctrl-C (SIGINT), SIGTERM and a crash in each entry point —
train, evaluate, the frontier sweep and the scaling ablation — run as real subprocesses (their own
local Ray) against a real MLflow store. Each signal is sent once the entry point's run is open and
working; a crash is a real worker failure for train and an exception inside the run
(``ELF_LAB_FAULT=<kind>``) for every entry point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from elf_core.checkpoint import save_checkpoint
from elf_core.config import load_config
from elf_core.network import ELFNetwork
from conftest import FAST_TRAIN as FAST

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EVENTS = ("SIGINT", "SIGTERM", "crash")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ev_dir):
    """A tiny random-weight checkpoint with a run record, a sweep space and a one-rung ladder."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    cfg = load_config(ROOT / "experiments" / "local_default.yaml", FAST + ["name=tiny-life"])
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, 384, 30522)
    ckpt = save_checkpoint(tmp / "ckpt" / "checkpoint_00000001", model=net, config=cfg, step=1)
    (tmp / "space.yaml").write_text("""name: life
fixed: {sampler: sde, grid: uniform, num_samples: 2, batch_size: 2, seed: 0}
params: {sc_cfg: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], gamma: [0.0, 1.0], steps: [30, 40]}
constraint: {metric: entropy, threshold: none}
""")
    (tmp / "ladder.yaml").write_text(f"""base: experiments/local_default.yaml
rungs: [{{name: r1, model: {{depth: 1, hidden_size: 64, num_heads: 2}}, max_steps: 400}}]
train: [{', '.join(o for o in FAST if not o.startswith('ray.'))}, ray.num_workers=1, data.cache_dir={tmp / 'cache'}]
space: {tmp / 'space.yaml'}
out: {tmp / 'out'}
""")
    return tmp, ckpt, ev_dir


def _command(entry: str, tmp: Path, ckpt: Path, ev_dir: str, uri: str, event: str) -> list[str]:
    common = ["--tracking-uri", uri]
    if entry == "train":
        extra = ["ray.max_failures=0"] + (["--inject-failure", "exception@3"] if event == "crash" else [])
        return ["pipelines/train.py", *FAST, "train.max_steps=400", "ray.num_workers=1", f"name=life-{event}",
                f"ray.storage_path={tmp / 'ray'}", f"data.cache_dir={tmp / 'cache'}", f"train.output_dir={tmp / 'o'}",
                *common, *extra]
    if entry == "evaluate":
        return ["pipelines/evaluate.py", "--checkpoint", str(ckpt), "--evaluator", ev_dir, "--num-samples", "400",
                "sample.steps=64", "sample.batch_size=2", "--output-dir", str(tmp / "eval"), *common]
    if entry == "sweep":
        return ["experiments/frontier_sweep.py", "--checkpoint", str(ckpt), "--space", str(tmp / "space.yaml"),
                "--evaluator", ev_dir, "--name", f"life-{event}", f"out={tmp / 'sweeps'}", *common]
    return ["experiments/scaling_ablation.py", "--ladder", str(tmp / "ladder.yaml"), "--evaluator", ev_dir,
            "--name", f"life-{event}", *common]


KIND = {"train": "training", "evaluate": "evaluation", "sweep": "frontier-sweep", "ablation": "scaling-ablation"}
# What shows the entry point is working, not just starting: its run plus (for the first three) work inside it.
BUSY = {"train": "loss", "evaluate": None, "sweep": "child", "ablation": "child"}


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


def _busy(uri: str, entry: str) -> bool:
    runs = [r for r in _runs(uri) if r.data.tags.get("elf.kind") == KIND[entry] and r.info.status == "RUNNING"]
    if not runs:
        return False
    if BUSY[entry] == "loss":
        return bool(MlflowClient(uri).get_metric_history(runs[0].info.run_id, "curves/loss"))
    if BUSY[entry] == "child":
        return any(r.data.tags.get("mlflow.parentRunId") == runs[0].info.run_id for r in _runs(uri))
    time.sleep(2)  # evaluate: the run opens before sampling starts; let it sample for a moment
    return True


@pytest.mark.parametrize("entry", ["train", "evaluate", "sweep", "ablation"])
def test_no_run_is_left_running(entry, workspace, tmp_path):
    tmp, ckpt, ev_dir = workspace
    for event in EVENTS:
        uri = f"sqlite:///{tmp_path / event / 'mlflow.db'}"
        (tmp_path / event).mkdir()
        env = {**os.environ, "ELF_LAB_ROOT": str(tmp_path / event), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        if event == "crash" and entry != "train":
            env["ELF_LAB_FAULT"] = KIND[entry]
        log = open(tmp_path / f"{event}.log", "w")
        proc = subprocess.Popen([sys.executable, *_command(entry, tmp, ckpt, ev_dir, uri, event)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            if event != "crash":
                deadline = time.monotonic() + 240
                while not _busy(uri, entry):
                    assert proc.poll() is None, (tmp_path / f"{event}.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, f"{entry} never got busy"
                    time.sleep(0.5)
                proc.send_signal(getattr(signal, event))
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = (tmp_path / f"{event}.log").read_text()
        runs = _runs(uri)
        assert runs, f"{entry}/{event}: no run was opened\n{text[-3000:]}"
        left = [(r.info.run_name, r.data.tags.get("elf.kind")) for r in runs if r.info.status == "RUNNING"]
        assert not left, f"{entry}/{event} (exit {rc}) left RUNNING: {left}\n{text[-3000:]}"
        (main,) = [r for r in runs if r.data.tags.get("elf.kind") == KIND[entry]][:1]
        want = "FAILED" if event == "crash" else "KILLED"
        assert main.info.status == want, f"{entry}/{event}: {main.info.status}\n{text[-3000:]}"
        assert rc != 0, f"{entry}/{event} exited 0"
        if event == "crash":
            assert main.data.tags.get("elf.error"), "a crash records its error on the run"
