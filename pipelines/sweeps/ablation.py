"""Scaling ablation: train ELF at each rung of a size ladder, sweep each one's frontier, compare them
in one MLflow run.

A *ladder* (``experiments/ladders/*.yaml``) names a base experiment and its rungs; a rung changes
what ELF's size lives in — depth × hidden (and heads) of the transformer — and says how long it
trains. Each rung is trained with the training driver (in this process; it reuses this process's
Ray), then its registered model version is swept (:func:`pipelines.sweeps.run.run_sweep`).

MLflow (experiment ``elf/scaling``): one parent run named after the ablation; each rung's training
run and sweep parent run are nested under it (trials under the sweep). On the parent:
``scaling/frontiers.png`` (every rung's frontier on one plot, collapsed rungs flagged), and
``scaling/table.csv`` / ``table.md`` (total and non-embedding parameters, steps, wall times, the best
operating point per rung). Re-running the same command skips finished rungs (``<out>/<name>/ledger.json``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from elf_core.config import ExperimentConfig, load_config, load_structured
from elf_core.errors import ElfError
from elf_core.validation import check_values, ranged
from pipelines.infra.paths import absolutise, in_checkout, under_root
from pipelines.sweeps.run import run_sweep
from pipelines.sweeps.settings import SweepConfig, SweepError, load_sweep_config
from pipelines.tracking import runs
from pipelines.tracking.store import check_tracking_reachable, make_client, resolve_tracking_uri


@dataclass
class Rung:
    """One model size: ModelConfig overrides (depth, hidden_size, num_heads) and its run length."""

    name: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    max_steps: Optional[int] = ranged(None, ge=1)  # None: the base experiment's
    overrides: list[str] = field(default_factory=list)  # any other training override for this rung


@dataclass
class AblationConfig:
    name: str = ""  # default: scaling-<ladder>-<data source>
    ladder: str = ""  # the ladder's name (default: the file's stem)
    description: str = ""
    base: str = "experiments/local_default.yaml"  # the experiment every rung starts from
    rungs: list[Rung] = field(default_factory=list)
    train: list[str] = field(default_factory=list)  # overrides for every rung's training run
    space: str = "experiments/sweeps/cpu_tiny.yaml"  # the frontier sweep of every rung
    sweep: list[str] = field(default_factory=list)  # overrides of the sweep settings
    paper: dict[str, Any] = field(default_factory=dict)  # rung name -> {label, gen_ppl, entropy} to star
    experiment: str = "elf/scaling"
    out: str = "outputs/scaling"
    path: str = ""


def load_ablation_config(path: str | Path, overrides: list[str] = ()) -> AblationConfig:
    """Defaults <- the ladder YAML <- dot-list overrides (``train=[ray.num_workers=1]``, ``rungs.0.max_steps=50``)."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"ladder file not found: {p}")
    obj: AblationConfig = load_structured(AblationConfig, p, list(overrides), SweepError)
    obj.ladder, obj.path = obj.ladder or p.stem, str(p)
    check_values(obj, str(p), SweepError)
    for r in obj.rungs:
        check_values(r, f"{p}: rung '{r.name}'", SweepError)
    names = [r.name for r in obj.rungs]
    if not names or "" in names or len(set(names)) != len(names):
        raise SweepError(f"{p}: rungs need distinct, non-empty names, got {names}")
    return obj


def rung_config(cfg: AblationConfig, rung: Rung, run_name: str, uri: str) -> ExperimentConfig:
    """The training config of one rung: base YAML, rung, ladder-wide overrides, names."""
    over = [f"model.{k}={v}" for k, v in rung.model.items()]
    over += [f"train.max_steps={rung.max_steps}"] if rung.max_steps else []
    over += [*rung.overrides, *cfg.train, f"name={run_name}", f"tracking.uri={uri}",
             f"tracking.experiment={cfg.experiment}"]
    exp = load_config(in_checkout(cfg.base), over)
    absolutise(exp)
    return exp


def default_name(cfg: AblationConfig) -> str:
    """``scaling-<ladder>-<data source>``: names say what ran (e.g. scaling-local-sotu)."""
    base = load_config(in_checkout(cfg.base))
    return runs.slug(f"scaling-{cfg.ladder}-{base.data.source.split(':')[-1].split('/')[-1]}", "scaling")


def non_embedding_params(exp: ExperimentConfig, latent_dim: int, vocab_size: int) -> tuple[int, int]:
    """``(total, transformer blocks)`` parameter counts of a rung's network (built on the meta
    device: shapes only). Reference §5 splits the official B/M/L counts the same way."""
    import torch

    from elf_core.network import ELFNetwork, count_parameters

    with torch.device("meta"):
        net = ELFNetwork(exp.model, latent_dim, vocab_size)
    return count_parameters(net), sum(p.numel() for p in net.blocks.parameters())


TrainFn = Callable[[ExperimentConfig, str], Any]  # (config, parent run id) -> TrainOutcome


def _train(exp: ExperimentConfig, parent: str) -> Any:
    from pipelines.training.driver import run

    return run(exp, parent_run_id=parent)


def train_cell(cfg: AblationConfig, rung: Rung, name: str, uri: str, parent: str, train_fn: TrainFn) -> dict[str, Any]:
    exp = rung_config(cfg, rung, f"{name}-{rung.name}", uri)
    print(f"[scaling] {rung.name}: training {exp.name} ({rung.model}, {exp.train.max_steps} steps)", flush=True)
    out = train_fn(exp, parent)
    total, blocks = non_embedding_params(exp, out.latent_dim, out.vocab_size)
    return {**dataclasses.asdict(out), "params": total, "non_embedding_params": blocks,
            "model": dict(rung.model)}


def sweep_cell(cell: dict[str, Any], sweep_cfg: SweepConfig, name: str, uri: str, nest: tuple[str, str],
               address: Optional[str], session_factory: Any, verbose: int) -> dict[str, Any]:
    out = run_sweep(cell["train"]["model_uri"], sweep_cfg, name=name, resume="auto", tracking_uri=uri,
                    ray_address=address, nest_under=nest, session_factory=session_factory, verbose=verbose)
    previous = float((cell.get("sweep") or {}).get("wall_s", 0.0))
    return {"finished": out.status == "FINISHED", "run_id": out.parent_run_id, "wall_s": out.wall_s + previous,
            "trials_sample_score_s": out.trial_eval_s, "threshold": out.threshold, "best": out.best,
            "collapsed": out.collapsed, "rows": out.rows}


def run_ablation(cfg: AblationConfig, *, name: Optional[str] = None, tracking_uri: Optional[str] = None,
                 ray_address: Optional[str] = None, train_fn: TrainFn = _train, session_factory: Any = None,
                 verbose: int = 1) -> dict[str, Any]:
    """Run every unfinished rung, then publish the comparison. Returns the ledger."""
    from pipelines.infra.ray_env import init_ray
    from pipelines.sweeps.ablation_report import publish

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_reachable(uri)
    client = make_client(uri)
    sweep_cfg = load_sweep_config(in_checkout(cfg.space),
                                  cfg.sweep)
    name = name or cfg.name or default_name(cfg)
    for rung in cfg.rungs:  # every rung's config is checked before anything runs
        rung_config(cfg, rung, f"{name}-{rung.name}", uri)
    out_dir = under_root(cfg.out).resolve() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = out_dir / "ledger.json"
    try:
        ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {"cells": {}}
    except json.JSONDecodeError as e:
        raise SweepError(f"{ledger_path}: not valid JSON ({e}); move it away to start the ablation over") from None
    exp_id = ledger.get("experiment_id") or runs.ensure_experiment(cfg.experiment, client)
    tags = {"elf.ladder": cfg.ladder, "elf.rungs": " ".join(r.name for r in cfg.rungs)}
    with runs.tracked_run(client, exp_id, name, kind="scaling-ablation", reattach=ledger.get("parent_run_id"),
                          tags=tags) as run:
        if not ledger.get("parent_run_id"):
            ledger.update(parent_run_id=run.run_id, experiment_id=exp_id, tracking_uri=uri, ladder=cfg.path)
            runs.log_params(client, run.run_id, {"ladder": cfg.path, "base": cfg.base, "space": cfg.space,
                                                 "rungs": " ".join(r.name for r in cfg.rungs),
                                                 "train": " ".join(cfg.train), "sweep": " ".join(cfg.sweep)})
        ledger_path.write_text(json.dumps(ledger, indent=1, default=str))
        print(f"[scaling] {name}: parent MLflow run {run.run_id} in '{cfg.experiment}' ({uri}); ledger {ledger_path}",
              flush=True)
        init_ray(ray_address)  # once: training and the sweeps reuse it
        failures = []
        for rung in cfg.rungs:
            cell = ledger["cells"].setdefault(rung.name, {})
            try:
                if not cell.get("train"):
                    cell["train"] = train_cell(cfg, rung, name, uri, run.run_id, train_fn)
                    ledger_path.write_text(json.dumps(ledger, indent=1, default=str))
                if not (cell.get("sweep") or {}).get("finished"):
                    cell["sweep"] = sweep_cell(cell, sweep_cfg, f"{name}-{rung.name}", uri, (exp_id, run.run_id),
                                               ray_address, session_factory, verbose)
                    ledger_path.write_text(json.dumps(ledger, indent=1, default=str))
            except ElfError as e:
                failures.append(f"{rung.name}: {e}")
                print(f"[scaling] rung {rung.name} failed: {e}", flush=True)
        publish(client, run.run_id, out_dir, ledger, cfg, sweep_cfg)
        if failures or not all((c.get("sweep") or {}).get("finished") for c in ledger["cells"].values()):
            runs.set_tags(client, run.run_id, {runs.ERROR_TAG: "; ".join(failures)[:5000] or "unfinished rungs"})
            run.end_status = "FAILED" if failures else "KILLED"
    return ledger


__all__ = ["AblationConfig", "Rung", "load_ablation_config", "run_ablation", "rung_config", "non_embedding_params",
           "default_name"]
