"""Sharded sampling over Ray workers (``pipelines/evaluation/shards.py``, ``evaluate.py --workers N``).

The property that matters: N workers produce exactly the samples (texts, ids, order) of one process
for the same seed and sampling config, because every sampling batch has its own (seed, batch) seed.
Tiny random-weight checkpoints as in test_evaluate.py; Ray is the session's ``ray_local`` (6 CPUs),
so the driver (1 torch thread, conftest) and the 1-CPU workers (1 thread) do the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from elf_core.checkpoint import save_checkpoint
from elf_core.config import SampleConfig, load_config
from elf_core.encoder import load_tokenizer
from elf_core.network import ELFNetwork
from pipelines import evaluate as cli
from pipelines.evaluation.session import EvalSession
from pipelines.evaluation.shards import ShardError, ShardPool, split_batches
from pipelines.tracking.store import make_client

ROOT = Path(__file__).resolve().parents[3]
WMT = ROOT / "tests" / "fixtures" / "wmt14_deen_val_200.jsonl"
NO_STORE = "sqlite:////nonexistent/x.db"  # never touched: workers skip the training-run lookup


def _tiny_checkpoint(path: Path, overrides: list[str]) -> Path:
    cfg = load_config(ROOT / "experiments" / "local_default.yaml", ["data.max_length=16", *overrides])
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, 384, len(load_tokenizer("minilm")))  # MiniLM: D = 384
    with torch.no_grad():  # the denoise head is zero-init: perturb everything for non-trivial samples
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(path, model=net, config=cfg, step=5, epoch=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_00000005", [])


# ----------------------------------------------------------------------------------------------
def test_split_batches():
    assert split_batches(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_batches(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    assert split_batches(0, 2) == [range(0, 0), range(0, 0)]
    assert [k for r in split_batches(11, 4) for k in r] == list(range(11))
    # (workers load the driver's *pinned* checkpoint: tests/orchestration/test_checkpoints.py checks ResolvedCheckpoint.pinned)


def test_cli_two_workers_equal_one_process(ray_local, ckpt, ev_dir, mlflow_uri, tmp_path):
    """evaluate.py --workers 2 writes the in-process samples (3 batches: shards of 2 + 1), logs workers=2,
    and refuses 7 one-CPU workers on the 6-CPU cluster with one message."""
    sc = SampleConfig(sampler="sde", steps=2, gamma=1.5, sc_cfg=3.0, batch_size=2)
    local = EvalSession(str(ckpt), evaluator=None, tracking_uri=NO_STORE, device="cpu")
    want = local.generate_samples(sc, 6, seed=11)
    assert [s["id"] for s in want] == list(range(6)) and len({s["generated"] for s in want}) == 6
    rc = cli.main(["--checkpoint", str(ckpt), "--evaluator", ev_dir, "--tracking-uri", mlflow_uri, "--num-samples", "6",
                   "--seed", "11", "--workers", "2", "--device", "cpu", "--output-dir", str(tmp_path),
                   "sample.steps=2", "sample.batch_size=2"])
    assert rc == 0
    got = [json.loads(line) for line in open(next(tmp_path.rglob("samples.jsonl")))]
    assert got == want  # same ids, texts and order
    prov = json.loads(next(tmp_path.rglob("metrics.json")).read_text())["provenance"]
    assert (prov["workers"], prov["worker_cpus"], prov["worker_gpus"], prov["device"]) == ("2", "1", "0", "cpu")
    client = make_client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("elf/eval").experiment_id])
    assert run.data.params["eval.workers"] == "2" and run.data.params["eval.batch_size"] == "2"

    with pytest.raises(ShardError, match=r"--workers 7: asked for 7 workers × 1 CPU .* at most 6 such workers fit.*"
                                         r"lower --workers"):
        ShardPool(str(ckpt), workers=7, task="unconditional", use_ema=False, tracking_uri=NO_STORE)


def test_conditional_shards_and_worker_failure(ray_local, tmp_path_factory, capsys):
    ck = _tiny_checkpoint(tmp_path_factory.mktemp("cond") / "checkpoint_00000005",
                          ["data.task=conditional", "data.max_length=24", "data.max_input_length=12",
                           "data.pad_token=eos"])
    sc = SampleConfig(sampler="ode", steps=2, gamma=0.0, sc_cfg=1.0, cfg=2.0, batch_size=2)
    s = EvalSession(str(ck), references=str(WMT), tracking_uri=NO_STORE, device="cpu", evaluator=None)
    one = s.evaluate(sc, num_samples=5, seed=4, progress=False)
    with ShardPool(str(ck), workers=2, task=s.task, references=str(WMT), use_ema=False, tracking_uri=NO_STORE,
                   expect={"step": 5, "weights": "raw", "task": "translation"}) as pool:
        two = s.evaluate(sc, num_samples=5, seed=4, progress=True, sampler=pool)
        assert two.samples == one.samples and two.metrics == one.metrics  # inputs, targets, hypotheses, BLEU
        assert two.provenance["workers"] == "2" and one.provenance["workers"] == "1"
        assert "[eval] shards 2/2 done, sample 5/5 [100%]" in capsys.readouterr().err
        # A worker exception: one message naming the shard and the worker's own error, no Ray traceback.
        with pytest.raises(ShardError) as err:
            pool(dataclasses.replace(sc, sampler="heun"), 5, 4, False)
        msg = str(err.value)
        assert msg.startswith(("shard 1/2 (batches 0-1, sample ids 0-3;", "shard 2/2 (batches 2-2, sample ids 4-4;"))
        assert "ValueError: sample.sampler='heun' is not one of ['ode', 'sde']" in msg
        assert "Traceback" not in msg and len(msg.splitlines()) == 1
        # A worker that dies (here: killed) is named too.
        import ray

        ray.kill(pool.shards[0].actor)
        with pytest.raises(ShardError, match=r"^shard 1/2 \(batches 0-1, sample ids 0-3; .*ActorDiedError") as err:
            pool(sc, 5, 4, False)
        assert len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 1700
