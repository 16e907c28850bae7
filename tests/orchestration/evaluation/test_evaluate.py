"""End-to-end tests of ELF evaluation: EvalSession, ``pipelines/evaluate.py`` (evaluate + score), MLflow.

Nothing is trained: tiny ELF checkpoints (tiny preset, offline MiniLM encoder, perturbed random
weights) are written with ``elf_core.checkpoint.save_checkpoint``, and the evaluator is a one-layer
GPT-2 with a byte-level tokenizer saved to a directory. Metrics are compared with direct calls of
``elf_core.metrics`` on the same texts; MLflow contents are read back through ``MlflowClient``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from elf_core import metrics as M
from elf_core.checkpoint import save_checkpoint
from elf_core.config import SampleConfig, load_config
from elf_core.encoder import load_tokenizer
from elf_core.network import ELFNetwork
from pipelines import checkpoints
from pipelines import evaluate as cli
from pipelines.evaluation.inputs import EvalError, apply_overrides, load_sampling_configs, run_name
from pipelines.evaluation.runner import default_checkpoint
from pipelines.evaluation.session import EvalSession, load_network, official_config
from pipelines.tracking.registry import register_checkpoint
from pipelines.tracking.runs import create_run, ensure_experiment
from pipelines.tracking.store import make_client

ROOT = Path(__file__).resolve().parents[3]
FIX = ROOT / "tests" / "fixtures"
WMT = FIX / "wmt14_deen_val_200.jsonl"
SC = SampleConfig(sampler="sde", steps=3, gamma=1.5, sc_cfg=3.0, batch_size=4, num_samples=4)



def _tiny_checkpoint(path: Path, overrides: list[str], step: int = 5) -> Path:
    cfg = load_config(ROOT / "experiments" / "local_default.yaml", ["data.max_length=16", *overrides])
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, 384, len(load_tokenizer("minilm")))  # MiniLM: D = 384, 30,522 ids
    with torch.no_grad():  # the denoise head is zero-init: perturb everything for non-trivial samples
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema = {k: v.detach() + 0.01 for k, v in net.named_parameters()}  # differs from the raw weights
    return save_checkpoint(path, model=net, config=cfg, ema_state=ema, step=step, epoch=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_00000005", [])


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("cond") / "checkpoint_00000005",
                            ["data.task=conditional", "data.max_length=24", "data.max_input_length=12",
                             "data.pad_token=eos"])


def _direct_ppl(ev_path: str, texts: list[str]) -> M.PerplexityResult:
    from elf_core.evaluator import load_evaluator

    return load_evaluator(ev_path, device="cpu").perplexity(texts)


# ----------------------------------------------------------------------------------------------
def test_session_unconditional(ckpt, ev_dir, mlflow_uri):
    s = EvalSession(str(ckpt), evaluator=ev_dir, tracking_uri=mlflow_uri, device="cpu")
    r = s.evaluate(SC, num_samples=6, seed=3, progress=False)
    assert [x["id"] for x in r.samples] == list(range(6)) and all(x["generated"].strip() for x in r.samples)
    direct = M.generative_perplexity([x["generated"] for x in r.samples], s.evaluator.model, s.evaluator.tokenizer)
    assert r.metrics["gen_ppl"] == pytest.approx(direct.gen_ppl, rel=1e-9)
    assert r.metrics["entropy"] == pytest.approx(direct.entropy, rel=1e-9)
    assert r.metrics["num_scored"] == 6 and r.sample_seconds > 0 and r.score_seconds > 0
    p = r.provenance
    assert (p["evaluator"], p["evaluator_dtype"], p["seed"], p["num_samples"]) == (ev_dir, "float32", "3", "6")
    assert (p["checkpoint_step"], p["checkpoint_weights"], p["sampler"], p["steps"]) == ("5", "raw", "sde", "3")
    assert len(p["git_sha"]) == 40 and p["task"] == "unconditional" and p["workers"] == "1"
    # Same seed, same samples; and exactly what elf_core.sampling.generate gives for that seed.
    again = s.evaluate(SC, num_samples=6, seed=3, progress=False)
    assert [x["generated"] for x in again.samples] == [x["generated"] for x in r.samples]
    from elf_core.sampling import generate

    enc = s.encoder
    ref = generate(s.net, SC, s.config.flow, seq_len=16, seed=3,
                   decode_fn=enc.decode_ids, eos_id=enc.eos_id, pad_id=enc.pad_id, num_samples=6)
    assert ref == [x["generated"] for x in r.samples]


def test_weights_choice(ckpt):
    from safetensors.torch import load_file

    ema, raw = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "model.safetensors"))
    with checkpoints.resolve(str(ckpt)) as auto:  # step 5 < 1/(1-0.999)
        net = load_network(auto)
    assert auto.weights == "raw" and torch.equal(net.final_layer.linear.weight, raw["final_layer.linear.weight"])
    with checkpoints.resolve(str(ckpt), use_ema=True) as forced:
        net = load_network(forced)
    assert forced.weights == "ema" and torch.equal(net.final_layer.linear.weight, ema["final_layer.linear.weight"])


def test_cli_logs_own_run(ckpt, ev_dir, mlflow_uri, tmp_path):
    rc = cli.main(["--checkpoint", str(ckpt), "--evaluator", ev_dir, "--tracking-uri", mlflow_uri, "--num-samples", "4",
                   "--seed", "1", "--output-dir", str(tmp_path), "sample.steps=3", "sample.batch_size=4"])
    assert rc == 0
    client = make_client(mlflow_uri)
    exp = client.get_experiment_by_name("elf/eval")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags
    assert run.info.run_name == "sde-steps3-cfg1.0-sccfg3.0-ts_logit_normal-gamma1.5-uncond"
    samples = [json.loads(line) for line in open(next(tmp_path.rglob("samples.jsonl")))]
    direct = _direct_ppl(ev_dir, [x["generated"] for x in samples])
    assert run.data.metrics["gen_ppl"] == pytest.approx(direct.gen_ppl, rel=1e-9)
    assert run.data.metrics["entropy"] == pytest.approx(direct.entropy, rel=1e-9)
    params, tags = run.data.params, run.data.tags
    assert (params["eval.evaluator"], params["eval.evaluator_dtype"], params["eval.num_samples"]) == (ev_dir, "float32", "4")
    assert (params["eval.seed"], params["eval.checkpoint_step"], params["eval.steps"]) == ("1", "5", "3")
    assert params["eval.git_sha"] == tags["elf.git.sha"] and tags["elf.eval.evaluator"] == ev_dir
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert arts == {"samples/samples.jsonl", "samples/table.json"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/table.json", str(tmp_path))).read_text())
    assert table["columns"] == ["id", "generated"] and len(table["data"]) == 4


def test_cli_model_version_is_child_of_training_run(ckpt, ev_dir, mlflow_uri, tmp_path):
    client = make_client(mlflow_uri)
    exp_id = ensure_experiment("elf/local", client)
    train_run = create_run(client, exp_id, "local-default", kind="training")
    # As pipelines/train.py registers checkpoints: no state.pt in the model version.
    register_checkpoint(client, train_run, ckpt, "elf-local-default", alias="last",
                        files=["model.safetensors", "ema.safetensors", "config.yaml", "meta.json"])
    base = ["--evaluator", ev_dir, "--tracking-uri", mlflow_uri, "--num-samples", "2", "--output-dir", str(tmp_path),
            "sample.steps=2", "sample.batch_size=2"]
    assert cli.main(["--checkpoint", "models:/elf-local-default@last", *base]) == 0
    assert cli.main(["--checkpoint", "models:/elf-local-default/latest", *base]) == 0
    runs = client.search_runs([exp_id], filter_string="tags.`elf.kind` = 'evaluation'")
    assert len(runs) == 2
    for run in runs:  # children of the training run, in its experiment: its page leads to them
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == train_run
        assert run.data.params["eval.model_version"] == "elf-local-default/1"
        assert run.data.params["eval.checkpoint_pinned"] == "models:/elf-local-default/1"
        assert run.data.params["eval.checkpoint_step"] == "5" and "gen_ppl" in run.data.metrics
    assert {r.data.params["eval.checkpoint"] for r in runs} == {"models:/elf-local-default@last",
                                                                "models:/elf-local-default/latest"}


def test_conditional_session_never_sees_targets(cond_ckpt, mlflow_uri):
    s = EvalSession(str(cond_ckpt), references=str(WMT), tracking_uri=mlflow_uri, device="cpu")
    assert s.task == "translation" and s.evaluator is None
    cond = SampleConfig(sampler="ode", steps=3, gamma=0.0, sc_cfg=1.0, cfg=2.0, batch_size=4)
    r = s.evaluate(cond, num_samples=5, seed=0, progress=False)
    rows = [json.loads(line) for line in WMT.read_text().splitlines()[:5]]
    assert [(x["input"], x["target"]) for x in r.samples] == [(x["input"], x["target"]) for x in rows]
    hyps = [x["generated"] for x in r.samples]
    assert r.metrics == pytest.approx({**M.conditional_metrics(hyps, [x["target"] for x in rows]), "num_samples": 5.0})
    assert r.provenance["references_condition_ids"] == "tokenised"  # MiniLM: not the dataset's T5 ids
    s.pairs.targets[:] = ["completely different reference"] * len(s.pairs.targets)
    blind = s.evaluate(cond, num_samples=5, seed=0, progress=False)
    assert [x["generated"] for x in blind.samples] == hyps  # the ground truth never reaches the sampler
    s.pairs.inputs[:5] = ["ein ganz anderer Satz"] * 5
    other = s.evaluate(cond, num_samples=5, seed=0, progress=False)
    assert [x["generated"] for x in other.samples] != hyps  # ... but the condition does


# ----------------------------------------------------------------------------------------------
def _score(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["score", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_score_unconditional_official_file(capsys, ev_dir):
    rc, out, err = _score(capsys, "--samples", FIX / "eval" / "official_samples.jsonl", "--evaluator", ev_dir, "--json")
    assert rc == 0, err
    got = json.loads(out)
    texts = ["The committee will meet again next week to discuss the budget.",
             "Prices rose sharply in the first quarter, the report said.", "   ",
             'A fallback field: the official scripts/eval_ppl.py reads "text" when "generated" is absent.']
    direct = _direct_ppl(ev_dir, texts)  # ordered by id; the whitespace sample is dropped
    assert got["gen_ppl"] == pytest.approx(direct.gen_ppl, rel=1e-9) and got["num_dropped"] == 1
    rc, out, _ = _score(capsys, "--samples", FIX / "eval" / "official_samples.jsonl", "--evaluator", ev_dir)
    assert rc == 0 and "gen_ppl" in out and "entropy" in out


def test_score_translation(capsys, tmp_path):
    hyps = [json.loads(line) for line in (FIX / "eval" / "translation_hyps.jsonl").read_text().splitlines()]
    expected = M.conditional_metrics([h["generated"] for h in hyps], [h["target"] for h in hyps])
    rc, out, err = _score(capsys, "--samples", FIX / "eval" / "translation_hyps.jsonl", "--json")
    assert rc == 0, err
    assert json.loads(out)["task"] == "translation"
    assert {k: json.loads(out)[k] for k in expected} == pytest.approx(expected)
    rc, out, err = _score(capsys, "--samples", FIX / "eval" / "translation_hyps.jsonl", "--references", WMT,
                          "--references-prefix", "--json")
    assert rc == 0, err
    assert {k: json.loads(out)[k] for k in expected} == pytest.approx(expected)


def test_score_bad_inputs(capsys, tmp_path, ev_dir, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "generated": "fine"}\nnot json at all\n')
    rc, _, err = _score(capsys, "--samples", bad, "--evaluator", ev_dir)
    assert rc == 2 and f"{bad}:2: not valid JSON" in err
    bad.write_text('{"id": 0, "sample": "wrong field"}\n')
    rc, _, err = _score(capsys, "--samples", bad, "--evaluator", ev_dir)
    assert rc == 2 and f"{bad}:1: missing field 'generated' / 'text'" in err
    bad.write_text('{"id": 0, "generated": ""}\n{"id": 1, "generated": "  "}\n')
    rc, _, err = _score(capsys, "--samples", bad, "--evaluator", ev_dir)
    assert rc == 2 and "all 2 samples are empty" in err
    rc, _, err = _score(capsys, "--samples", FIX / "eval" / "translation_hyps.jsonl", "--references", WMT)
    assert rc == 2 and "200 references but" in err and "3 samples" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = _score(capsys, "--samples", FIX / "eval" / "official_samples.jsonl", "--evaluator", "nobody/no-model")
    assert rc == 2 and "evaluator 'nobody/no-model' is not in the local Hugging Face cache" in err
    rc, _, err = _score(capsys, "--samples", tmp_path / "missing.jsonl")
    assert rc == 2 and "samples file not found" in err
    assert "Traceback" not in err


def test_cli_bad_evaluate_inputs(capsys, tmp_path, mlflow_uri):
    rc = cli.main(["--checkpoint", str(tmp_path / "nothing-here"), "--tracking-uri", mlflow_uri, "--no-mlflow"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing-here" in err
    rc = cli.main(["--workers", "0", "--tracking-uri", mlflow_uri])
    assert rc == 2 and "--workers must be >= 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
def test_sampling_config_lists(tmp_path):
    paper = load_sampling_configs(ROOT / "experiments" / "sampling" / "uncond_paper.yaml")
    assert [(c.sampler, c.steps, c.gamma, c.sc_cfg, c.cfg) for c in paper] == [("sde", 32, 1.5, 3.0, 1.0),
                                                                               ("sde", 64, 1.0, 3.0, 1.0)]
    (cond,) = load_sampling_configs(ROOT / "experiments" / "sampling" / "cond_paper.yaml")
    assert (cond.sampler, cond.steps, cond.cfg, cond.sc_cfg) == ("ode", 64, 2.0, 1.0)
    assert len(load_sampling_configs(ROOT / "experiments" / "sampling" / "tiny_cpu.yaml")) == 2
    official = tmp_path / "official.yml"  # the official file format, verbatim style
    official.write_text("- sampling_method: sde\n  num_sampling_steps: [16, 32]\n  cfgs: [1]\n"
                        "  self_cond_cfg_scales: [1, 3]\n  time_schedule: uniform\n")
    got = load_sampling_configs(official)
    assert [(c.steps, c.sc_cfg, c.gamma, c.grid) for c in got] == [(16, 1.0, 0.0, "uniform"), (16, 3.0, 0.0, "uniform"),
                                                                  (32, 1.0, 0.0, "uniform"), (32, 3.0, 0.0, "uniform")]
    assert run_name(got[3], False) == "sde-steps32-cfg1.0-sccfg3.0-ts_uniform-gamma0.0-uncond"
    official.write_text("- sampler: sde\n  stepz: 4\n")
    with pytest.raises(EvalError, match=r"entry 1: unknown sampling key 'stepz' \(did you mean 'steps'\?\)"):
        load_sampling_configs(official)
    official.write_text("- sampler: euler\n")
    with pytest.raises(EvalError, match=r"entry 1: sample.sampler='euler' is not one of \['ode', 'sde'\]"):
        load_sampling_configs(official)
    assert apply_overrides(SC, ["sample.steps=64", "gamma=0.5"]).steps == 64
    with pytest.raises(EvalError, match="'steps' must be an integer"):
        apply_overrides(SC, ["sample.steps=many"])


def test_official_checkpoint_takes_task_settings(ckpt, tmp_path):
    """An official-port file ({"params", "ema_params1", ...}) loads with EMA weights and the paper
    experiment's data settings for the task; the step comes from the file name."""
    from safetensors.torch import load_file

    raw, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    path = tmp_path / "checkpoint_4321"
    torch.save({"params": raw, "ema_params1": ema, "step": 4321, "epoch": 1}, path)
    with checkpoints.resolve(str(path)) as ld:
        net = load_network(ld)
    cfg = official_config(ld, "translation", net)
    assert (ld.kind, ld.step, ld.weights) == ("official", 4321, "ema")
    assert (cfg.data.max_length, cfg.data.max_input_length, cfg.encoder.name) == (128, 64, "t5-small")
    assert torch.equal(net.final_layer.linear.weight, ema["final_layer.linear.weight"])
    with checkpoints.resolve(str(path), use_ema=False) as raw_ld:
        assert raw_ld.weights == "raw"


def test_default_checkpoint_is_the_embedded_defaults_run(ckpt, tmp_path, monkeypatch):
    """No --checkpoint: the embedded default's run storage (its newest checkpoint), under the same
    root train.py writes to ($ELF_LAB_ROOT here)."""
    import shutil

    monkeypatch.setenv("ELF_LAB_ROOT", str(tmp_path))
    with pytest.raises(EvalError, match="no checkpoint of the embedded default yet"):
        default_checkpoint()
    for step in (3, 7):
        dst = tmp_path / "outputs" / "ray" / "local-default" / "attempt-1" / f"checkpoint_2026-01-0{step}"
        shutil.copytree(ckpt, dst)
        meta = json.loads((dst / "meta.json").read_text())
        (dst / "meta.json").write_text(json.dumps({**meta, "step": step}))
    assert default_checkpoint() == str(tmp_path / "outputs" / "ray" / "local-default")
    with checkpoints.resolve(default_checkpoint()) as r:
        assert r.step == 7 and r.path.name == "checkpoint_2026-01-07"


def test_cli_refuses_cfg_for_unconditional(ckpt, ev_dir, mlflow_uri, tmp_path, capsys):
    rc = cli.main(["--checkpoint", str(ckpt), "--evaluator", ev_dir, "--tracking-uri", mlflow_uri, "--no-mlflow",
                   "--sampling", str(ROOT / "experiments" / "sampling" / "cond_paper.yaml"), "--output-dir", str(tmp_path)])
    assert rc == 2 and "sample.cfg=2.0: conditional CFG needs a condition" in capsys.readouterr().err
