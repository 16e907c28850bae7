"""Scaling ablation: size -> config resolution (unit), and a two-size tiny ladder on the shared local Ray
with a stand-in trainer and evaluator (integration): one parent run with nested training and sweep
runs, the combined frontier plot, the table (params, tokens, wall times, best points), and a re-run
that skips every finished cell. The real trainer is exercised by ``python experiments/scaling_ablation.py
--sizes tiny-1 tiny-2`` (minutes), not here.
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

from experiments.scaling_ablation import TrainedModel, cell_config, describe_model, run_ablation
from pipelines.eval_session import EvalResult
from pipelines.frontier import SweepError

ROOT = Path(__file__).resolve().parents[1]


def test_cell_config_sizes():
    path, over = cell_config("tiny-3", "owt", None, ["ray.num_workers=1"])
    assert path == ROOT / "experiments" / "local_default.yaml"
    assert over == ["model.preset=tiny", "model.depth=3", "train.max_steps=60", "train.checkpoint_every=60",
                    "tracking.log_samples=4", "ray.num_workers=1"]
    assert cell_config("B", "owt", None, []) == (ROOT / "experiments" / "owt_elf_b.yaml", [])
    assert cell_config("L", "owt", 100, [])[1] == ["train.max_steps=100"]
    assert cell_config("B", "xsum", None, [])[0].name == "xsum_elf_b.yaml"
    with pytest.raises(SweepError, match=r"--sizes M --task xsum: .*xsum_elf_m\.yaml does not exist"):
        cell_config("M", "xsum", None, [])
    with pytest.raises(SweepError, match="unknown size 'XL'"):
        cell_config("XL", "owt", None, [])


# ------------------------------------------------------------------------------------------------
# Stand-ins: a trainer that registers a config-only model version, an evaluator whose metrics
# improve with depth (so the bigger model's frontier lies further out).


class DepthSession:
    def __init__(self, checkpoint, *, log_path=None, **kw):
        self.depth = int(re.search(r"tiny-(\d+)", checkpoint).group(1))
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
    from elf_core.config import load_config, to_yaml
    from pipelines import tracking

    def train(name, config, overrides, uri, experiment) -> TrainedModel:
        calls.append(name)
        cfg = load_config(config, [*overrides, f"name={name}"])
        ck = tmp_path / "ckpts" / name
        ck.mkdir(parents=True)
        (ck / "config.yaml").write_text(to_yaml(cfg))
        (ck / "meta.json").write_text(json.dumps({"step": cfg.train.max_steps, "param_count": 1000 * cfg.model.depth}))
        client = tracking.make_client(uri)
        run = client.create_run(tracking.ensure_experiment(experiment, client), run_name=name).info.run_id
        tracking.log_params_flat(run, {"train.global_batch_size": cfg.train.global_batch_size,
                                       "data.max_length": cfg.data.max_length}, client)
        tracking.log_checkpoint_model(run, ck, f"elf-{name}", client, alias="last", files=["config.yaml", "meta.json"])
        client.set_terminated(run, "FINISHED")
        return describe_model(client, f"elf-{name}", wall_s=1.5)

    return train


def test_tiny_ladder_publishes_and_rerun_skips_finished_cells(ray_local, mlflow_uri, tmp_path):
    from pipelines.tracking import make_client

    space = tmp_path / "space.yaml"
    space.write_text("""name: ladder-test
fixed: {sampler: sde, steps: 2, gamma: 1.0, grid: uniform, num_samples: 2, batch_size: 2}
params: {sc_cfg: [1.0, 3.0]}
objectives: [{metric: gen_ppl, mode: min}, {metric: entropy, mode: max}]
constraint: {metric: entropy, threshold: 3.0}
""")
    calls: list[str] = []
    evals = tmp_path / "evals.log"
    kw = dict(space=space, max_steps=7, train_fn=make_fake_trainer(tmp_path, calls), tracking_uri=mlflow_uri,
              out_root=tmp_path / "out", max_concurrent=1, verbose=0,
              session_factory=functools.partial(DepthSession, log_path=str(evals)))
    ledger = run_ablation(["tiny-1", "tiny-2"], name="ladder", **kw)
    assert calls == ["ladder-tiny-1", "ladder-tiny-2"]
    client = make_client(mlflow_uri)
    parent = client.get_run(ledger["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "ladder"
    exp = ledger["experiment_id"]
    nested = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = sorted((r.info.run_name, r.data.tags.get("elf.kind", "train")) for r in nested)
    assert kinds == [("ladder-tiny-1", "frontier-sweep"), ("ladder-tiny-1", "train"),
                     ("ladder-tiny-2", "frontier-sweep"), ("ladder-tiny-2", "train")]
    sweeps = [r for r in nested if r.data.tags.get("elf.kind") == "frontier-sweep"]
    assert all(r.info.status == "FINISHED" for r in sweeps)
    assert sorted(r.data.tags["elf.checkpoint"] for r in sweeps) == ["models:/elf-ladder-tiny-1/1",
                                                                     "models:/elf-ladder-tiny-2/1"]

    # The table: params and step from meta.json, tokens = steps × global batch (32) × length (64).
    table = list(csv.DictReader(open(tmp_path / "out" / "ladder" / "table.csv")))
    assert [(r["size"], r["status"], r["params"], r["tokens"], r["train_steps"], r["train_wall_s"]) for r in table] == [
        ("tiny-1", "done", "1000", str(7 * 32 * 64), "7", "1.5"), ("tiny-2", "done", "2000", str(7 * 32 * 64), "7", "1.5")]
    # Best = lowest PPL with entropy >= 3.0: depth 1: w3 has entropy 3.5 -> ppl 85; depth 2: 50 - 15 = 35.
    assert [(r["best"], float(r["best_gen_ppl"])) for r in table] == [("SDE 2 γ1 w3 uni", 85.0),
                                                                      ("SDE 2 γ1 w3 uni", 35.0)]
    assert parent.data.metrics["tiny-2.best_gen_ppl"] == 35.0 and parent.data.metrics["tiny-1.params"] == 1000
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "scaling")}
    assert arts == {"scaling/frontiers.png", "scaling/table.csv", "scaling/table.md"}
    png = (tmp_path / "out" / "ladder" / "frontiers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    import matplotlib.image as mpimg

    assert mpimg.imread(io.BytesIO(png), format="png").shape[:2] == (715, 1100)
    assert len(evals.read_text().splitlines()) == 4

    # Re-run: every cell is finished -> no training, no sampling, same parent run, table re-published.
    ledger2 = run_ablation(["tiny-1", "tiny-2"], name="ladder", **kw)
    assert calls == ["ladder-tiny-1", "ladder-tiny-2"] and len(evals.read_text().splitlines()) == 4
    assert ledger2["parent_run_id"] == parent.info.run_id
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["elf.resume_count"] == "1"
    assert len(client.search_runs([exp], "tags.`elf.kind` = 'frontier-sweep'")) == 2
