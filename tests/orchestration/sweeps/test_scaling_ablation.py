"""Scaling ablation: the ladders' rung sizes (unit, against reference §5's split of the official
counts), collapse flags, and a two-rung ladder on the shared local Ray with a stand-in trainer and
evaluator (integration): one parent run with nested training and sweep runs, the combined frontier
plot, the table (total and non-embedding params, steps, wall times, best points, flags), and a re-run
that skips every finished rung. The real trainer runs in ``python experiments/scaling_ablation.py``
(the README's measured ladder), not here.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import sys
from pathlib import Path

import pytest

from elf_core.config import load_config
from pipelines.evaluation.session import EvalResult
from pipelines.infra.paths import EXPERIMENTS_DIR
from pipelines.sweeps.ablation import load_ablation_config, non_embedding_params, rung_config, run_ablation
from pipelines.sweeps.ablation_report import table_row
from pipelines.sweeps.settings import SweepError
from pipelines.training.driver import TrainOutcome

ROOT = Path(__file__).resolve().parents[3]
MINILM = (384, 30522)


def block_params(h: int, heads: int) -> int:
    """One ELF block by hand: fused qkv (+bias), out-proj (+bias), qk-RMSNorm gains over head_dim,
    two RMSNorm gains, SwiGLU w12 (H→2F, +bias) and w3 (F→H, +bias), F = int(4H·2/3)."""
    f = int(h * 4 * 2 / 3)
    return (3 * h * h + 3 * h) + (h * h + h) + 2 * (h // heads) + 2 * h + (2 * f * h + 2 * f) + (f * h + h)


def test_non_embedding_counts_match_the_reference_split():
    b = load_config(EXPERIMENTS_DIR / "owt_elf_b.yaml")
    total, blocks = non_embedding_params(b, 512, 32100)
    assert (total, blocks) == (104_579_940, 85_049_856)  # reference §5: ELF-B total and transformer blocks
    assert blocks == 12 * block_params(768, 12)


def test_local_ladder_scales_what_elf_scales(tmp_path):
    cfg = load_ablation_config(EXPERIMENTS_DIR / "ladders" / "local.yaml")
    counts = []
    for rung in cfg.rungs:
        exp = rung_config(cfg, rung, f"x-{rung.name}", f"sqlite:///{tmp_path}/m.db")
        m = exp.model
        total, blocks = non_embedding_params(exp, *MINILM)
        assert blocks == m.depth * block_params(m.hidden_size, m.num_heads)
        counts.append(blocks)
    assert counts == sorted(counts) and counts[-1] >= 8 * counts[0]  # depth × hidden span ≥ 8×
    assert len({(r.model["depth"], r.model["hidden_size"]) for r in cfg.rungs}) == len(cfg.rungs)
    with pytest.raises(SweepError, match="distinct, non-empty names"):
        load_ablation_config(EXPERIMENTS_DIR / "ladders" / "local.yaml", ["rungs.1.name=" + cfg.rungs[0].name])
    with pytest.raises(SweepError, match=r"rungs\.0\.max_steps=0 is not in \[1, inf\)"):
        load_ablation_config(EXPERIMENTS_DIR / "ladders" / "local.yaml", ["rungs.0.max_steps=0"])


def test_a_collapsed_rung_is_flagged_in_the_table():
    rows = [{"status": "FINISHED", "gen_ppl": 3.1, "entropy": 0.41, "pareto": True, "label": "SDE 8 w1 ln"}]
    cell = {"train": {"params": 12_500_000, "non_embedding_params": 49_000, "model": {"depth": 1}},
            "sweep": {"finished": True, "rows": rows, "best": None, "collapsed": "collapsed: entropy 0.41"}}
    row = table_row("s1", cell)
    assert row["flag"] == "collapsed: entropy 0.41" and row["best"] == "none meets the constraint"
    assert row["best_gen_ppl"] is None and row["non_embedding_params"] == 49_000


# ------------------------------------------------------------------------------------------------
# Stand-ins: a trainer that registers a config-only model version, an evaluator whose metrics
# improve with depth (so the bigger model's frontier lies further out).


class DepthSession:
    def __init__(self, checkpoint, *, log_path=None, **kw):
        self.depth = int(re.search(r"-d(\d+)/", checkpoint).group(1))
        self.log_path = log_path

    def evaluate(self, sample_cfg, num_samples=None, seed=None, progress=True):
        w = float(sample_cfg.sc_cfg)
        with open(self.log_path, "a") as f:
            f.write(f"done depth={self.depth} w={w:g}\n")
        return EvalResult({"gen_ppl": 100.0 / self.depth - 5 * w, "entropy": 4.0 - 0.2 * w + 0.1 * self.depth},
                          [], 0.01, 0.02, {})


@pytest.fixture(autouse=True, scope="module")
def _pickle_this_module_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def make_fake_trainer(tmp_path: Path, calls: list):
    from elf_core.config import to_yaml
    from pipelines.tracking import registry, runs
    from pipelines.tracking.store import make_client

    def train(exp, parent) -> TrainOutcome:
        calls.append(exp.name)
        ck = tmp_path / "ckpts" / exp.name
        ck.mkdir(parents=True)
        (ck / "config.yaml").write_text(to_yaml(exp))
        (ck / "meta.json").write_text(json.dumps({"step": exp.train.max_steps, "param_count": 1000 * exp.model.depth}))
        client = make_client(exp.tracking.uri)
        exp_id = runs.ensure_experiment(exp.tracking.experiment, client)
        run = runs.create_run(client, exp_id, exp.name, kind="training", parent_run_id=parent)
        version = registry.register_checkpoint(client, run, ck, registry.model_name_for(exp), alias="last",
                                               files=["config.yaml", "meta.json"])
        client.set_terminated(run, "FINISHED")
        return TrainOutcome("trained", run, exp_id, exp.train.max_steps,
                            f"models:/{registry.model_name_for(exp)}/{version}", 1.5, 1000 * exp.model.depth,
                            exp.train.max_steps * exp.train.global_batch_size * exp.data.max_length, *MINILM)

    return train


def test_two_rung_ladder_publishes_and_rerun_skips_finished_rungs(ray_local, mlflow_uri, tmp_path):
    from pipelines.tracking.store import make_client

    (tmp_path / "space.yaml").write_text("""name: ladder-test
fixed: {sampler: sde, steps: 2, gamma: 1.0, grid: uniform, num_samples: 2, batch_size: 2}
params: {sc_cfg: [1.0, 3.0]}
constraint: {metric: entropy, threshold: 3.0}
""")
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(f"""base: experiments/local_default.yaml
rungs:
  - {{name: d1, model: {{depth: 1, hidden_size: 64, num_heads: 2}}, max_steps: 7}}
  - {{name: d2, model: {{depth: 2, hidden_size: 128, num_heads: 4}}, max_steps: 7}}
space: {tmp_path / 'space.yaml'}
sweep: [search.max_concurrent=1]
out: {tmp_path / 'out'}
""")
    calls: list[str] = []
    evals = tmp_path / "evals.log"
    kw = dict(name="ladder", train_fn=make_fake_trainer(tmp_path, calls), tracking_uri=mlflow_uri, verbose=0,
              session_factory=functools.partial(DepthSession, log_path=str(evals)))
    ledger = run_ablation(load_ablation_config(ladder), **kw)
    assert calls == ["ladder-d1", "ladder-d2"]
    client = make_client(mlflow_uri)
    parent = client.get_run(ledger["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "ladder"
    assert parent.data.tags["elf.kind"] == "scaling-ablation"
    exp = ledger["experiment_id"]
    nested = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = sorted((r.info.run_name, r.data.tags["elf.kind"]) for r in nested)
    assert kinds == [("ladder-d1", "frontier-sweep"), ("ladder-d1", "training"),
                     ("ladder-d2", "frontier-sweep"), ("ladder-d2", "training")]
    sweeps = [r for r in nested if r.data.tags["elf.kind"] == "frontier-sweep"]
    assert all(r.info.status == "FINISHED" for r in sweeps)
    assert sorted(r.data.tags["elf.checkpoint"] for r in sweeps) == ["models:/elf-ladder-d1/1", "models:/elf-ladder-d2/1"]

    table = list(csv.DictReader(open(tmp_path / "out" / "ladder" / "table.csv")))
    d1, d2 = (load_config(ROOT / "experiments" / "local_default.yaml",
                          [f"model.depth={d}", f"model.hidden_size={h}", f"model.num_heads={n}"])
              for d, h, n in ((1, 64, 2), (2, 128, 4)))
    expected = [non_embedding_params(c, *MINILM) for c in (d1, d2)]
    assert [(r["rung"], r["status"], int(r["params"]), int(r["non_embedding_params"]), r["steps"], r["tokens"],
             r["train_wall_s"]) for r in table] == [
        ("d1", "done", *expected[0], "7", str(7 * 32 * 64), "1.5"), ("d2", "done", *expected[1], "7", str(7 * 32 * 64), "1.5")]
    # Best = lowest PPL with entropy >= 3.0: depth 1: w3 has entropy 3.5 -> ppl 85; depth 2: 50 - 15 = 35.
    assert [(r["best"], float(r["best_gen_ppl"]), r["flag"]) for r in table] == [("SDE 2 γ1 w3 uni", 85.0, ""),
                                                                              ("SDE 2 γ1 w3 uni", 35.0, "")]
    assert parent.data.metrics["d2.best_gen_ppl"] == 35.0 and parent.data.metrics["d1.non_embedding_params"] == expected[0][1]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "scaling")}
    assert arts == {"scaling/frontiers.png", "scaling/table.csv", "scaling/table.md"}
    png = (tmp_path / "out" / "ladder" / "frontiers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    import matplotlib.image as mpimg

    assert mpimg.imread(io.BytesIO(png), format="png").shape[:2] == (715, 1100)
    assert len(evals.read_text().splitlines()) == 4

    # Re-run: every rung is finished -> no training, no sampling, same parent run, table re-published.
    ledger2 = run_ablation(load_ablation_config(ladder), **kw)
    assert calls == ["ladder-d1", "ladder-d2"] and len(evals.read_text().splitlines()) == 4
    assert ledger2["parent_run_id"] == parent.info.run_id
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["elf.resume_count"] == "1"
    assert len(client.search_runs([exp], "tags.`elf.kind` = 'frontier-sweep'")) == 2
