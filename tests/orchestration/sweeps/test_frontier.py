"""Frontier sweeps: Pareto extraction, search spaces and the plot (unit); small Ray Tune sweeps on the
shared local Ray logging to a private MLflow store (integration): parent/child runs, CSVs, PNG,
registry tags, a failing trial, an interrupted sweep resumed with ``Tuner.restore``, Optuna NSGA-II,
and one sweep with the real :class:`pipelines.evaluation.session.EvalSession` on a tiny checkpoint.

Most sweeps use :class:`FakeSession` — a stand-in with EvalSession's interface whose metrics come
from a table, so the Pareto set and the "best" point are known by hand. Ray workers cannot import
test modules; this module is registered with cloudpickle *by value* so the fake travels inside
the trial context (the trainable itself lives in ``pipelines.sweeps.trial``).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from pipelines.evaluation.session import EvalResult
from pipelines.sweeps.pareto import auto_min_entropy, best_point, collapse_note, constraint_tag_key, pareto_mask
from pipelines.sweeps.plot import FrontierSeries, plot_frontier
from pipelines.sweeps.settings import Objective, SweepError, load_sweep_config
from pipelines.sweeps.space import settings_label

ROOT = Path(__file__).resolve().parents[3]
SWEEPS = ROOT / "experiments" / "sweeps"
UNCOND = [Objective("gen_ppl", "min"), Objective("entropy", "max")]


# ------------------------------------------------------------------------------------------------
# Pareto extraction and the "best" rule (hand-made points)


def test_pareto_mask_hand_made_with_ties_duplicates_and_failures():
    # (gen_ppl, entropy): minimise ppl, maximise entropy.
    pts = [
        (30.0, 5.0),   # 0 front
        (20.0, 4.0),   # 1 front
        (20.0, 4.0),   # 2 duplicate of 1: duplicates do not dominate each other -> both kept
        (25.0, 4.0),   # 3 dominated by 1 (same entropy, higher ppl): a tie in one objective
        (30.0, 4.5),   # 4 dominated by 0 (same ppl, lower entropy)
        (40.0, 5.5),   # 5 front (highest entropy)
        (15.0, 3.0),   # 6 front (lowest ppl)
        (35.0, 3.0),   # 7 dominated by many
        (float("nan"), 9.0),  # 8 failed trial: never on the front, dominates nothing
        (None, None),  # 9 failed trial
        (10.0, float("inf")),  # 10 not finite: excluded
    ]
    assert pareto_mask(pts, ("min", "max")) == [True, True, True, False, False, True, True, False, False, False,
                                                False]
    # Two objectives of the same direction and a single point.
    assert pareto_mask([(1, 1), (0, 2), (2, 0), (1, 1), (2, 2)], ("min", "min")) == [True, True, True, True, False]
    assert pareto_mask([(3.0, 1.0)], ("max", "min")) == [True]
    assert pareto_mask([], ("min", "max")) == []
    with pytest.raises(ValueError, match="'min' or 'max'"):
        pareto_mask([(1, 2)], ("min", "up"))


def test_best_point_rule_and_auto_threshold():
    rows = [dict(gen_ppl=p, entropy=e, pareto=f, label=n) for p, e, f, n in [
        (30.0, 5.0, True, "a"), (20.0, 4.0, True, "b"), (15.0, 3.0, True, "c"), (10.0, 5.5, False, "dominated?")]]
    # Lowest Gen PPL among Pareto points with entropy >= threshold (non-Pareto rows never qualify).
    assert best_point(rows, UNCOND, 4.0)["label"] == "b"
    assert best_point(rows, UNCOND, 4.5)["label"] == "a"
    assert best_point(rows, UNCOND, None)["label"] == "c"
    assert best_point(rows, UNCOND, 6.0) is None
    # 5.0 nats at 1024 tokens scaled by ln L / ln 1024: L = 64 -> 5 * 6/10 = 3.0 exactly.
    assert auto_min_entropy(64) == pytest.approx(3.0)
    assert auto_min_entropy(1024) == pytest.approx(5.0) and auto_min_entropy(4096) == pytest.approx(5.0)
    assert auto_min_entropy(None) == 5.0
    assert constraint_tag_key(UNCOND, 3.0) == "frontier.best_gen_ppl_at_entropy_ge_3.00"
    assert settings_label({"sampler": "sde", "steps": 32, "gamma": 1.5, "sc_cfg": 3.0, "grid": "logit_normal"}) \
        == "SDE 32 γ1.5 w3 ln"
    assert settings_label({"sampler": "sde", "steps": 64, "gamma": 0.0, "sc_cfg": 1.0, "cfg": 2.0,
                           "grid": "uniform"}, conditional=True) == "ODE 64 w1 c2 uni"


def test_shipped_spaces_and_space_errors(tmp_path):
    paper = load_sweep_config(SWEEPS / "uncond_paper.yaml")
    assert paper.params == {"sc_cfg": [1.0, 2.0, 3.0, 4.0, 5.0], "gamma": [0.0, 0.5, 1.0, 1.5, 2.0],
                            "steps": [16, 32, 64], "grid": ["logit_normal", "uniform"]}
    assert paper.grid_size() == 150 and paper.objectives == UNCOND
    assert paper.reference["metrics"] == {"gen_ppl": 24.1, "entropy": 5.15}
    cond = load_sweep_config(SWEEPS / "cond_paper.yaml")
    assert cond.task == "conditional" and "cfg" in cond.params and cond.objectives[0] == Objective("bleu", "max")
    tiny = load_sweep_config(SWEEPS / "cpu_tiny.yaml", ["search.kind=optuna", "search.trials=40", "fixed.num_samples=8"])
    assert tiny.grid_size() == 12 and tiny.expected_trials() == 40 and tiny.fixed["num_samples"] == 8

    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {sc_cfgg: [1, 2]}\n")
    with pytest.raises(SweepError, match=r"bad\.yaml: params\.sc_cfgg is not a SampleConfig field"):
        load_sweep_config(bad)
    bad.write_text("params: {sc_cfg: [1]}\nobjectives: [{metric: gen_ppl, mode: lowest}, {metric: entropy}]\n")
    with pytest.raises(SweepError, match=r"objectives\.0\.mode='lowest' is not one of \['min', 'max'\]"):
        load_sweep_config(bad)
    bad.write_text("params: {sc_cfg: [1]}\nobjectives: [{metric: gen_ppl, mode: min}]\n")
    with pytest.raises(SweepError, match="objectives must be two"):
        load_sweep_config(bad)
    bad.write_text("params: {sc_cfg: [1]}\nobjective: []\n")
    with pytest.raises(SweepError, match=r"bad\.yaml: .*objective"):
        load_sweep_config(bad)
    bad.write_text("params: {gamma: [1.0, -2.0]}\n")  # every value within its SampleConfig range
    with pytest.raises(SweepError, match=r"sample\.gamma=-2\.0 is not in \[0, inf\)"):
        load_sweep_config(bad)
    with pytest.raises(SweepError, match=r"search\.cpus_per_trial=0\.0 is not in \(0, inf\)"):
        load_sweep_config(SWEEPS / "cpu_tiny.yaml", ["search.cpus_per_trial=0"])
    with pytest.raises(SweepError, match="a grid runs every point once"):
        load_sweep_config(SWEEPS / "cpu_tiny.yaml", ["search.trials=3"])
    # Ranges (random / optuna): numbers, low <= high, both ends valid settings, log ranges above 0.
    ok = tmp_path / "range.yaml"
    ok.write_text("params: {gamma: {low: 0, high: 2.0}, steps: {low: 8, high: 64, type: int, log: true}}\n"
                  "search: {kind: random, trials: 4}\n")
    assert load_sweep_config(ok).params["steps"] == {"low": 8, "high": 64, "type": "int", "log": True}
    for text, message in (("{gamma: {low: 2.0, high: 1.0}}", r"params\.gamma: a range needs numbers low <= high"),
                          ("{gamma: {low: a, high: 1.0}}", r"params\.gamma: a range needs numbers"),
                          ("{gamma: {low: -1.0, high: 1.0}}", r"sample\.gamma=-1\.0 is not in \[0, inf\)"),
                          ("{steps: {low: 0, high: 8, log: true}}", r"params\.steps: a log range needs low > 0")):
        bad.write_text(f"params: {text}\nsearch: {{kind: random, trials: 4}}\n")
        with pytest.raises(SweepError, match=message):
            load_sweep_config(bad)


def test_a_collapsed_frontier_is_flagged():
    rows = [dict(status="FINISHED", gen_ppl=p, entropy=e) for p, e in [(3.0, 0.41), (2.5, 0.2), (9.0, 0.35)]]
    assert collapse_note(rows, UNCOND, 3.0) == "collapsed: entropy 0.41"
    assert collapse_note(rows + [dict(status="FINISHED", gen_ppl=40.0, entropy=3.2)], UNCOND, 3.0) is None
    assert collapse_note(rows, UNCOND, None) is None  # no constraint, no verdict
    assert collapse_note([dict(status="FAILED")], UNCOND, 3.0) is None  # nothing finished: nothing to judge


def _check_png(path: Path, min_bytes: int = 20_000) -> tuple[int, int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert len(data) > min_bytes, f"PNG suspiciously small ({len(data)} bytes)"
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img.shape[1], img.shape[0]


def test_plot_frontier_png(tmp_path):
    rows = [dict(sampler="sde", steps=s, gamma=g, sc_cfg=w, grid="logit_normal", gen_ppl=p, entropy=e, pareto=f)
            for s, g, w, p, e, f in [(32, 1.5, 3.0, 30.0, 4.0, True), (32, 0.0, 1.0, 50.0, 4.5, True),
                                     (16, 1.0, 5.0, 60.0, 3.0, False)]]
    out = plot_frontier([FrontierSeries("m", rows)], tmp_path / "f.png", UNCOND, threshold=3.5,
                        reference={"label": "paper", "settings": {"steps": 32, "gamma": 1.5, "sc_cfg": 3.0},
                                   "metrics": {"gen_ppl": 24.1, "entropy": 5.15}})
    assert _check_png(out) == (1100, 715)
    flagged = plot_frontier([FrontierSeries("m", rows), FrontierSeries("small", rows[:1], "collapsed: entropy 0.41")],
                            tmp_path / "g.png", UNCOND, threshold=3.5)
    assert _check_png(flagged) == (1100, 715)


def test_cli_errors_name_the_culprit(mlflow_uri, tmp_path, capsys):
    from experiments.frontier_sweep import main

    missing = tmp_path / "no-such-checkpoint"
    out = f"out={tmp_path}"
    assert main(["--checkpoint", str(missing), "--tracking-uri", mlflow_uri, out]) == 2
    assert f"checkpoint not found: {missing}" in capsys.readouterr().err
    ck = tmp_path / "ck"
    ck.mkdir()
    argv = ["--checkpoint", str(ck), "--tracking-uri", mlflow_uri, out, "--space", str(SWEEPS / "cpu_tiny.yaml")]
    assert main(argv + ["search.trials=3"]) == 2
    assert "a grid runs every point once" in capsys.readouterr().err
    assert main(argv + ["constraint.threshold=lots"]) == 2
    assert "constraint.threshold must be a number, 'auto' or 'none', got 'lots'" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 2
    assert "--resume: no sweep named 'ck--cpu-tiny'" in capsys.readouterr().err
    assert main(["--checkpoint", str(ck), "--tracking-uri", mlflow_uri, "--space", str(SWEEPS / "cond_paper.yaml")]) == 2
    assert "cond_paper.yaml is a conditional space but checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_choice:  # argparse: an unknown choice, exit status 2
        main(argv + ["--weights", "warm"])
    assert bad_choice.value.code == 2 and "invalid choice: 'warm'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# A stand-in EvalSession (test code only; travels to Ray workers by value)

# sc_cfg -> (gen_ppl, entropy). w=3 is dominated by w=2; w=99 fails.
FAKE_TABLE = {1.0: (50.0, 4.5), 2.0: (30.0, 4.0), 3.0: (35.0, 3.5), 4.0: (20.0, 3.0)}


class FakeSession:
    """EvalSession's interface; appends ``load <pid>`` / ``done <sc_cfg> <pid>`` lines to ``log_path``."""

    def __init__(self, checkpoint, *, evaluator="gpt2-large", evaluator_dtype="float32", task=None, references=None,
                 device=None, use_ema=None, tracking_uri=None, log_path=None, delay_s=0.05):
        self.checkpoint, self.evaluator, self.log_path, self.delay_s = checkpoint, evaluator, log_path, delay_s
        self._log(f"load {os.getpid()}")

    def _log(self, line):
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def evaluate(self, sample_cfg, num_samples=None, seed=None, progress=True):
        w = float(sample_cfg.sc_cfg)
        if w not in FAKE_TABLE:
            raise ValueError(f"fake evaluator cannot score sc_cfg={w}")
        time.sleep(self.delay_s)
        ppl, ent = FAKE_TABLE[w]
        ppl += 2.0 * float(sample_cfg.gamma)
        self._log(f"done {w:g} {float(sample_cfg.gamma):g} {os.getpid()}")
        return EvalResult(metrics={"gen_ppl": ppl, "entropy": ent, "num_scored": float(sample_cfg.num_samples)},
                          samples=[{"id": 0, "generated": f"w={w}"}], sample_seconds=0.01, score_seconds=0.02,
                          provenance={"evaluator": self.evaluator, "fake": "true"})


@pytest.fixture(autouse=True, scope="module")
def _pickle_this_module_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------------------------
# A tiny checkpoint, registered in the test's MLflow store


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real (random-weight) ELF Lab checkpoint: depth 1, width 32, MiniLM latents, 16 tokens."""
    import torch

    from elf_core.checkpoint import save_checkpoint
    from elf_core.config import load_config
    from elf_core.network import ELFNetwork

    cfg = load_config(ROOT / "experiments" / "local_default.yaml",
                      ["name=tiny-sweep", "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
                       "model.bottleneck_dim=16", "data.max_length=16"])
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, 384, 30522)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", model=net, config=cfg, step=1)


def register(uri: str, ckpt: Path, files=("config.yaml", "meta.json"), name: str = "elf-tiny-sweep") -> tuple[str, str]:
    """``(models:/ URI, training run id)``: the checkpoint registered from a finished training run."""
    from pipelines.tracking import registry, runs
    from pipelines.tracking.store import make_client

    client = make_client(uri)
    exp = runs.ensure_experiment("elf/test-train", client)
    run = runs.create_run(client, exp, "tiny-sweep", kind="training")
    version = registry.register_checkpoint(client, run, ckpt, name, alias="last", files=list(files))
    client.set_terminated(run, "FINISHED")
    return f"models:/{name}/{version}", run


def write_space(tmp_path: Path, sc_cfg: list, gamma: list, extra: str = "") -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(f"""name: test-space
task: unconditional
fixed: {{sampler: sde, steps: 2, grid: uniform, num_samples: 4, batch_size: 4, seed: 0}}
params: {{sc_cfg: {sc_cfg}, gamma: {gamma}}}
objectives: [{{metric: gen_ppl, mode: min}}, {{metric: entropy, mode: max}}]
constraint: {{metric: entropy, threshold: auto}}
reference: {{label: paper, settings: {{gamma: 1.0, sc_cfg: 2.0}}, metrics: {{gen_ppl: 24.1, entropy: 5.15}}}}
{extra}""")
    return p


def sweep(uri, tmp_path, checkpoint, space, factory, *, resume=False, name=None, **settings):
    """One sweep through run_sweep; ``settings`` are SweepConfig dot-list keys (``search__kind`` ->
    ``search.kind``)."""
    from pipelines.sweeps.run import run_sweep

    settings.setdefault("search__max_concurrent", 1)  # one reused worker: the cheapest on 2 cores
    overrides = [f"out={tmp_path / 'sweeps'}", "experiment=elf/test-frontier"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in settings.items()]
    return run_sweep(checkpoint, load_sweep_config(space, overrides), name=name, resume="yes" if resume else "no",
                     tracking_uri=uri, session_factory=factory, verbose=0)


def runs_of(uri, outcome):
    from pipelines.tracking.runs import child_runs
    from pipelines.tracking.store import make_client

    client = make_client(uri)
    return client, client.get_run(outcome.parent_run_id), child_runs(client, outcome.experiment_id, outcome.parent_run_id)


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------------------------------------
# Sweeps on the shared local Ray


def test_small_sweep_parent_children_csv_png_tags_and_a_failed_trial(ray_local, mlflow_uri, tmp_path, tiny_checkpoint):
    model_uri, train_run = register(mlflow_uri, tiny_checkpoint)
    calls = tmp_path / "calls.log"
    factory = functools.partial(FakeSession, log_path=str(calls))
    space = write_space(tmp_path, [1.0, 2.0, 3.0, 99.0], [1.0])
    out = sweep(mlflow_uri, tmp_path, model_uri, space, factory, constraint__threshold=3.9)

    client, parent, children = runs_of(mlflow_uri, out)
    assert out.status == "FINISHED" and parent.info.status == "FINISHED"
    # A sweep of a training run's checkpoint is a child of that training run: its page leads here.
    assert parent.data.tags["mlflow.parentRunId"] == train_run
    assert parent.info.experiment_id == client.get_run(train_run).info.experiment_id
    assert parent.data.tags["elf.kind"] == "frontier-sweep" and parent.info.run_name == out.name
    assert len(children) == 4 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    by_w = {float(c.data.params["sc_cfg"]): c for c in children}
    for w, (ppl, ent) in list(FAKE_TABLE.items())[:3]:
        c = by_w[w]
        assert c.info.status == "FINISHED"
        assert c.data.metrics["gen_ppl"] == pytest.approx(ppl + 2.0) and c.data.metrics["entropy"] == ent
        assert c.data.params["gamma"] == "1.0" and c.data.params["steps"] == "2" and c.data.params["num_samples"] == "4"
        assert c.data.metrics["nfe"] == 3.0  # 2 steps + the decode
    failed = by_w[99.0]
    assert failed.info.status == "FAILED" and "cannot score sc_cfg=99" in failed.data.tags["elf.error"]
    # Session reuse: the 3 successful trials ran in one reused worker process that loaded once.
    loads = [line for line in log_lines(calls) if line.startswith("load")]
    assert len(loads) == 1 or (len(loads) == 2 and "99" in log_lines(calls)[-1]), log_lines(calls)
    assert sorted(by_w[w].data.metrics["session_reused"] for w in (1.0, 2.0, 3.0)) == [0.0, 1.0, 1.0]

    # CSVs and best point, on disk and on the parent run.
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "frontier")}
    assert {"frontier/results.csv", "frontier/pareto.csv", "frontier/frontier.png", "frontier/best.json"} <= arts
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="frontier",
                                                     dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_uri))
    results = list(csv.DictReader(open(local / "results.csv")))
    pareto = list(csv.DictReader(open(local / "pareto.csv")))
    assert sorted(r["status"] for r in results) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert sorted(float(r["sc_cfg"]) for r in pareto) == [1.0, 2.0]  # w=3 is dominated by w=2, w=99 failed
    assert _check_png(local / "frontier.png") == (1100, 715)
    best = json.loads((local / "best.json").read_text())
    assert best["best"]["sc_cfg"] == 2.0 and best["threshold"] == 3.9  # lowest PPL with entropy >= 3.9
    assert parent.data.tags["frontier.best"] == "SDE 2 γ1 w2 uni"
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_finished"] == 3

    # The registered model version carries the best settings.
    mv = client.get_model_version("elf-tiny-sweep", "1")
    assert mv.tags["frontier.best"] == "SDE 2 γ1 w2 uni"
    assert mv.tags["frontier.best_gen_ppl_at_entropy_ge_3.90"] == "32 (SDE 2 γ1 w2 uni)"
    assert json.loads(mv.tags["frontier.best.settings"]) == {"sampler": "sde", "steps": 2, "gamma": 1.0,
                                                              "sc_cfg": 2.0, "cfg": 1.0, "grid": "uniform"}
    assert mv.tags["frontier.sweep_run_id"] == parent.info.run_id

    # Running the same sweep again without --resume is refused (names the sweep and the fix).
    with pytest.raises(SweepError, match="already exists.*--resume"):
        sweep(mlflow_uri, tmp_path, model_uri, space, factory)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, mlflow_uri, tmp_path, tiny_checkpoint):
    calls = tmp_path / "calls.log"
    factory = functools.partial(FakeSession, log_path=str(calls), delay_s=0.3)
    space = write_space(tmp_path, [1.0, 2.0, 4.0], [0.0, 1.0])  # 6 trials
    first = sweep(mlflow_uri, tmp_path, str(tiny_checkpoint), space, factory, search__max_trials=2)
    client, parent, children = runs_of(mlflow_uri, first)
    assert first.status == "KILLED" and parent.info.status == "KILLED"
    # A foreign checkpoint (no training run in this store) keeps its own parent, in the sweep experiment.
    assert "mlflow.parentRunId" not in parent.data.tags
    assert client.get_experiment(parent.info.experiment_id).name == "elf/test-frontier"
    assert parent.data.tags["elf.sweep.state"] == "interrupted"
    assert not [c for c in children if c.info.status == "RUNNING"], "no RUNNING zombies after an interruption"
    done_before = {(c.data.params["sc_cfg"], c.data.params["gamma"]) for c in children if c.info.status == "FINISHED"}
    assert len(done_before) >= 2 and len(children) < 6
    n_lines = len(log_lines(calls))

    second = sweep(mlflow_uri, tmp_path, str(tiny_checkpoint), space, factory, resume=True)
    client, parent, children = runs_of(mlflow_uri, second)
    assert second.parent_run_id == first.parent_run_id and second.name == first.name
    assert second.status == "FINISHED" and parent.info.status == "FINISHED"
    assert parent.data.tags["elf.resume_count"] == "1"
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["elf.trial_id"] for c in children}) == 6  # one child per trial, none duplicated
    # Trials that had finished were not sampled again after the restore.
    rerun = [line.split()[1:3] for line in log_lines(calls)[n_lines:] if line.startswith("done")]
    assert not {(f"{float(w)}", f"{float(g)}") for w, g in rerun} & done_before
    assert len(second.rows) == 6 and sum(r["pareto"] for r in second.rows) >= 1

    with pytest.raises(SweepError, match="no sweep named 'nope'"):
        sweep(mlflow_uri, tmp_path, str(tiny_checkpoint), space, factory, resume=True, name="nope")
    # A resume that would change what the trials measure is refused (pacing knobs may change).
    with pytest.raises(SweepError, match="settings was '[0-9a-f]{16}', now '[0-9a-f]{16}'"):
        sweep(mlflow_uri, tmp_path, str(tiny_checkpoint), space, factory, resume=True, fixed__num_samples=7)


def test_optuna_nsga2_sweep(ray_local, mlflow_uri, tmp_path, tiny_checkpoint):
    pytest.importorskip("optuna")
    space = write_space(tmp_path, [1.0, 2.0, 3.0, 4.0], [0.0, 1.0])
    out = sweep(mlflow_uri, tmp_path, str(tiny_checkpoint), space, FakeSession, search__kind="optuna",
                search__trials=3, search__seed=1, constraint__threshold="none")
    client, parent, children = runs_of(mlflow_uri, out)
    assert out.status == "FINISHED" and len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert parent.data.params["search"] == "optuna"
    # Without a constraint the best point is the lowest Gen PPL among the trials' Pareto set.
    finished = [r for r in out.rows if r["status"] == "FINISHED"]
    assert out.best["gen_ppl"] == min(r["gen_ppl"] for r in finished)


def test_sweep_with_the_real_eval_session(ray_local, mlflow_uri, tmp_path, tiny_checkpoint):
    """3 trials of the real EvalSession (tiny random-weight ELF + the offline SmolLM2 evaluator)."""
    model_uri, _ = register(mlflow_uri, tiny_checkpoint, files=("model.safetensors", "config.yaml", "meta.json"))
    # A real failing trial (the sampler refuses steps=0) is left to the fake sweeps: an errored trial's
    # actor is not reused, so every failure here would cost another model + evaluator load.
    space = write_space(tmp_path, [1.0, 2.0, 3.0], [1.0])
    t0 = time.perf_counter()
    out = sweep(mlflow_uri, tmp_path, model_uri, space, None, scoring__evaluator="smollm2")
    wall = time.perf_counter() - t0
    client, parent, children = runs_of(mlflow_uri, out)
    assert out.status == "FINISHED" and len(children) == 3
    for c in children:
        m = c.data.metrics
        assert c.info.status == "FINISHED", c.data.tags.get("elf.error")
        assert math.isfinite(m["gen_ppl"]) and m["gen_ppl"] > 1 and 0 <= m["entropy"] <= math.log(64)
        assert m["num_scored"] >= 1 and m["sample_seconds"] > 0 and m["score_seconds"] > 0
        assert c.data.tags["elf.eval.checkpoint_step"] == "1" and c.data.tags["elf.eval.num_samples"] == "4"
    # One worker process (max_concurrent=1): the model and the evaluator are loaded once.
    assert sorted(c.data.metrics["session_reused"] for c in children) == [0.0, 1.0, 1.0]
    assert sum(c.data.metrics["load_seconds"] > 0 for c in children) == 1
    assert _check_png(out.files["plot"]) == (1100, 715)
    print(f"real-session sweep: {wall:.1f} s wall, trials' sample+score {out.trial_eval_s:.1f} s")
