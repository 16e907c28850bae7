"""Evaluate an ELF checkpoint in-process: load model, encoder and evaluator once, then sample + score
any number of sampling configs. ``pipelines/evaluate.py`` (the CLI) and the Ray Tune frontier sweeps
build on this.

    session = EvalSession("models:/elf-local-default@last", evaluator="smollm2")
    result = session.evaluate(SampleConfig(sampler="sde", steps=32, gamma=1.5, sc_cfg=3.0), num_samples=100)
    result.metrics  # {"gen_ppl": ..., "entropy": ..., "num_scored": ...}

Checkpoints (``EvalSession(checkpoint=...)``):
  * an ELF Lab checkpoint directory (``meta.json`` + ``model.safetensors`` + ``config.yaml`` [+ ``ema``,
    ``state.pt``: the registered MLflow copies carry no ``state.pt`` and load too);
  * a training run's storage directory (``outputs/ray/<name>``): its latest checkpoint;
  * ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``models:/<name>/latest``,
    ``runs:/<run id>/checkpoint`` — downloaded through MLflow; the producing run is recorded as
    ``training_run_id`` (the parent of evaluation runs);
  * an official ELF checkpoint: ``checkpoint_<step>`` file, a directory of them, or a hub id
    (:func:`elf_core.load_official_checkpoint`; T5-small encoder from the hub). The task is not in
    the file: pass ``task=``; the data/sampling settings then come from the paper experiment YAML.

Weights: ``use_ema=None`` takes the EMA weights when the step is ≥ 1/(1 − ema_decay) (the EMA has
forgotten its random start), else the raw weights; official checkpoints use EMA as the official eval.

Sampling only: ``EvalSession(..., evaluator=None)`` loads no evaluator; :meth:`EvalSession.generate_samples`
then produces any subset of a run's sampling batches (``batches=``), exactly as the full run would
(per-batch seeds, :mod:`elf_core.sampling`). ``pipelines/eval_shards.py`` builds such sessions on Ray
workers and passes itself to :meth:`EvalSession.evaluate` as ``sampler=``; scoring stays here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from elf_core.checkpoint import (CONFIG_FILE, EMA_FILE, META_FILE, MODEL_FILE, STATE_FILE,
                                 CheckpointError, build_network, load_checkpoint)
from elf_core.checkpoint_dirs import latest_checkpoint
from elf_core.collate import Collator
from elf_core.config import ExperimentConfig, SampleConfig, from_yaml_text, load_config
from elf_core.ema import ema_is_warm
from elf_core.encoder import FrozenEncoder
from elf_core.evaluator import Evaluator, load_evaluator
from elf_core.metrics import conditional_metrics, drop_empty
from elf_core.sampling import batch_bounds, generate, num_batches
from pipelines.eval_inputs import (EvalError, ReferencePairs, load_reference_pairs,
                                   sampler_settings)
from pipelines.paths import runs_root
from pipelines.progress import Progress

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TASKS = ("unconditional", "translation", "summarization")
# Paper experiments that give an official checkpoint its data / flow / sampling settings, per task.
OFFICIAL_TASK_CONFIGS = {"unconditional": "owt_elf_b.yaml", "translation": "wmt14_de_en_elf_b.yaml",
                         "summarization": "xsum_elf_b.yaml"}
PPL_MAX_LENGTH = 1024  # evaluator context (reference §4.2)
PPL_BATCH_SIZE = 16  # scripts/eval_ppl.py's default


class EmptySamplesError(EvalError):
    """Every generated sample was empty; ``samples`` holds them so they can still be written out."""

    def __init__(self, message: str, samples: list[dict]):
        super().__init__(message)
        self.samples = samples


@dataclass
class EvalResult:
    metrics: dict[str, float]  # gen_ppl, entropy, num_scored, ... (uncond); bleu, rouge1, rouge2, rougeL (cond)
    samples: list[dict]  # [{"id", "generated", ("input", "target")}]
    sample_seconds: float
    score_seconds: float
    provenance: dict[str, str]  # evaluator, dtype, n samples, sampler settings, seed, checkpoint step, git sha


@dataclass
class LoadedModel:
    """A resolved checkpoint: the network holding the weights chosen for sampling, and where it came from."""

    net: torch.nn.Module
    config: ExperimentConfig
    step: int
    kind: str  # elf-lab | official
    path: str  # local file / directory the weights were read from (a temp dir for MLflow downloads)
    weights: str  # ema | raw
    training_run_id: Optional[str] = None  # MLflow run that produced the checkpoint, when known
    training_run_source: str = ""  # how it was found
    model_version: Optional[str] = None  # "name/version" for models:/ URIs


# ----------------------------------------------------------------------------------------------
# Checkpoints
def _choose_ema(use_ema: Optional[bool], has_ema: bool, step: int, decay: float, where: str) -> bool:
    if use_ema and not has_ema:
        raise CheckpointError(f"{where}: use_ema=True but the checkpoint has no EMA weights")
    if use_ema is None:
        return has_ema and ema_is_warm(step, decay)
    return bool(use_ema)


def load_elf_lab_dir(path: Path, use_ema: Optional[bool]) -> LoadedModel:
    """An ELF Lab checkpoint directory, with or without ``state.pt`` (MLflow copies have none)."""
    run_id = None
    if (path / STATE_FILE).is_file():
        ck = load_checkpoint(path)
        cfg, step, net, ema = ck.config, ck.step, ck.model, ck.ema_state
        run_id = ck.extra.get("mlflow_run_id")  # set by trainers that record their run in the checkpoint
    else:
        from safetensors.torch import load_file

        for name in (META_FILE, MODEL_FILE, CONFIG_FILE):
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: missing (not an ELF Lab checkpoint directory)")
        try:
            meta = json.loads((path / META_FILE).read_text())
            step = int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / META_FILE}: unreadable checkpoint metadata ({e})") from None
        cfg = from_yaml_text((path / CONFIG_FILE).read_text(), origin=str(path / CONFIG_FILE))
        try:
            weights = load_file(str(path / MODEL_FILE))
            ema = load_file(str(path / EMA_FILE)) if (path / EMA_FILE).is_file() else None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors weights: {e}") from None
        net = build_network(cfg.model, meta["latent_dim"], meta["vocab_size"], weights, str(path / MODEL_FILE))
    take_ema = _choose_ema(use_ema, ema is not None, step, cfg.optim.ema_decay, str(path))
    if take_ema:
        net.load_state_dict({**net.state_dict(), **ema}, strict=True)
    return LoadedModel(net=net.eval(), config=cfg, step=step, kind="elf-lab", path=str(path),
                       weights="ema" if take_ema else "raw", training_run_id=run_id,
                       training_run_source="checkpoint state extra['mlflow_run_id']" if run_id else "")


def load_official(spec: str, task: Optional[str], use_ema: Optional[bool]) -> LoadedModel:
    from elf_core.official import load_official_checkpoint

    take_ema = True if use_ema is None else bool(use_ema)
    net, inferred = load_official_checkpoint(spec, use_ema=take_ema)
    task = task or "unconditional"
    cfg = load_config(PROJECT_ROOT / "experiments" / OFFICIAL_TASK_CONFIGS[task])
    cfg = dataclasses.replace(cfg, name=inferred.name, model=inferred.model)
    m = re.search(r"checkpoint_(\d+)", str(spec))
    return LoadedModel(net=net.eval(), config=cfg, step=int(m.group(1)) if m else -1, kind="official",
                       path=str(spec), weights="ema" if take_ema else "raw")


def _download_mlflow(spec: str, tracking_uri: str, dst: Path) -> tuple[Path, str, Optional[str]]:
    """Download ``models:/`` or ``runs:/`` into ``dst``; ``(local dir, producing run id, "name/version")``."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import make_client

    client = make_client(tracking_uri)
    try:
        if spec.startswith("runs:/"):
            run_id, _, art = spec[len("runs:/"):].partition("/")
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=art or "checkpoint",
                                                        dst_path=str(dst), tracking_uri=tracking_uri)
            return Path(local), run_id, None
        body = spec[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.rpartition("/")
            if not name:
                raise EvalError(f"'{spec}': expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>")
            if version == "latest":
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise EvalError(f"'{spec}': registered model '{name}' has no versions in {tracking_uri}")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                mv = client.get_model_version(name, version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst), tracking_uri=tracking_uri)
        return Path(local), mv.run_id, f"{mv.name}/{mv.version}"
    except MlflowException as e:
        raise EvalError(f"'{spec}': MLflow ({tracking_uri}) could not resolve or download it: {e.message}") from None


def find_training_run(cfg: ExperimentConfig, created: Optional[str], tracking_uri: str) -> Optional[str]:
    """The training run of a local checkpoint: the newest run named ``cfg.name`` in experiment
    ``cfg.tracking.experiment`` that started before the checkpoint was written (None if unknown)."""
    import datetime as dt

    from pipelines.tracking import make_client, sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        return None
    client = make_client(tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    quote = '"' if "'" in cfg.name else "'"
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = {quote}{cfg.name}{quote}",
                              order_by=["attributes.start_time DESC"], max_results=20)
    limit = None
    if created:
        try:
            limit = dt.datetime.fromisoformat(created).timestamp() * 1000 + 1000
        except ValueError:
            limit = None
    for run in runs:
        if limit is None or run.info.start_time <= limit:
            return run.info.run_id
    return None


def resolve_checkpoint(spec: str, *, task: Optional[str] = None, use_ema: Optional[bool] = None,
                       tracking_uri: Optional[str] = None, lookup_run: bool = True) -> LoadedModel:
    """Load any checkpoint form listed in the module docstring. ``lookup_run=False`` skips looking
    up the training run of a local checkpoint in MLflow (sampling workers need no parent run)."""
    from pipelines.tracking import quick_http_env, resolve_tracking_uri

    spec = str(spec).strip()
    if spec.startswith(("models:/", "runs:/")):
        uri = resolve_tracking_uri(tracking_uri, runs_root())
        with tempfile.TemporaryDirectory(prefix="elf-eval-ckpt-") as tmp:
            local, run_id, version = _download_mlflow(spec, uri, Path(tmp))
            if not (local / META_FILE).is_file():
                found = latest_checkpoint(local)
                if found is None:
                    raise EvalError(f"'{spec}': the downloaded artifacts ({sorted(p.name for p in local.iterdir())[:8]}) "
                                    "hold no ELF Lab checkpoint (no meta.json)")
                local = found
            loaded = load_elf_lab_dir(local, use_ema)
        loaded.path, loaded.training_run_id, loaded.model_version = spec, run_id, version
        loaded.training_run_source = "model version run_id" if version else "runs:/ URI"
        return loaded
    path = Path(spec).expanduser()
    head = Path(spec.split("/")[0]).expanduser()
    if not path.exists() and (spec.startswith(("/", ".", "~")) or (head.is_dir() and spec.count("/") >= 1)):
        raise CheckpointError(f"checkpoint not found: {path}")  # a local path, not a hub id: don't try the hub
    if path.is_dir() and (path / META_FILE).is_file():
        loaded = load_elf_lab_dir(path, use_ema)
    elif path.is_dir() and latest_checkpoint(path) is not None:
        loaded = load_elf_lab_dir(latest_checkpoint(path), use_ema)
    else:  # a file, a directory of checkpoint_<step> files, or a hub id: the official format
        if path.is_dir() and (path / MODEL_FILE).is_file():
            raise CheckpointError(f"{path}: has {MODEL_FILE} but no {META_FILE} (incomplete ELF Lab checkpoint?)")
        return load_official(spec, task, use_ema)
    if loaded.training_run_id or not lookup_run:
        return loaded
    uri = resolve_tracking_uri(tracking_uri, runs_root())
    meta = json.loads((Path(loaded.path) / META_FILE).read_text())
    try:
        with quick_http_env(5.0):  # a dead server must not stall the evaluation for minutes of retries
            loaded.training_run_id = find_training_run(loaded.config, meta.get("created"), uri)
    except Exception as e:  # a broken/unreachable store must not stop an evaluation; say so
        print(f"[eval] warning: could not look up the training run in {uri}: {e}", file=sys.stderr)
    if loaded.training_run_id:
        loaded.training_run_source = f"run named '{loaded.config.name}' in '{loaded.config.tracking.experiment}'"
    return loaded


# ----------------------------------------------------------------------------------------------
def _git_provenance() -> dict[str, str]:
    from pipelines.tracking import provenance_tags

    tags = provenance_tags(PROJECT_ROOT)
    return {"git_sha": tags.get("elf.git.sha", "unknown"), "git_dirty": tags.get("elf.git.dirty", "unknown")}


AUTO_EVALUATOR = "auto"
_AUTO_BANNER = """
################################################################################################
# evaluator 'auto': gpt2-large (the paper's evaluator) cannot be loaded here:
#   {reason}
# Using the OFFLINE PROXY 'smollm2' (SmolLM2-135M-Instruct from PyPI) instead. Its Gen PPL is NOT
# comparable with published GPT-2 Large numbers; the run records evaluator=smollm2. Pass
# --evaluator gpt2-large to require the paper's evaluator, or --evaluator smollm2 to silence this.
################################################################################################"""


def load_evaluator_or_auto(name: str, dtype: str = "float32", device: Optional[torch.device | str] = None) -> Evaluator:
    """:func:`load_evaluator`, plus ``auto``: gpt2-large when it can be loaded (local HF cache or hub),
    else the offline ``smollm2`` proxy with a loud banner on stderr."""
    from elf_core.evaluator import DEFAULT_EVALUATOR, SMOLLM2_ALIAS, EvaluatorError

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    if name != AUTO_EVALUATOR:
        return load_evaluator(name, dtype=dtype, device=device, log=log)
    try:
        return load_evaluator(DEFAULT_EVALUATOR, dtype=dtype, device=device, log=log)
    except EvaluatorError as e:
        log(_AUTO_BANNER.format(reason=str(e).split(". Offline")[0]))
        return load_evaluator(SMOLLM2_ALIAS, dtype=dtype, device=device, log=log)


class _Reporter:
    """Progress lines with ETA, at most one every ``every_s`` seconds (plus the last)."""

    def __init__(self, what: str, total: int, enabled: bool, every_s: float = 2.0):
        self.what, self.enabled, self.every_s = what, enabled, every_s
        self.progress = Progress(total=total, unit=what)
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.enabled and (done >= total or now - self.last >= self.every_s):
            self.last = now
            print(f"[eval] {self.progress.line(done)}", file=sys.stderr, flush=True)


class EvalSession:
    """Model + encoder + evaluator loaded once; :meth:`evaluate` samples and scores one sampling config."""

    def __init__(self, checkpoint: str, *, evaluator: str | Evaluator | None = "gpt2-large",
                 evaluator_dtype: str = "float32",
                 task: str | None = None, references: str | None = None, device: str | None = None,
                 use_ema: bool | None = None, tracking_uri: str | None = None, lookup_training_run: bool = True):
        """``evaluator=None``: sampling only (no evaluator is loaded; unconditional :meth:`evaluate`
        then needs a ``sampler`` and fails when scoring). ``lookup_training_run=False``: do not search
        MLflow for the run that produced a local checkpoint (see :func:`resolve_checkpoint`)."""
        if task is not None and task not in TASKS:
            raise EvalError(f"task '{task}' is not one of {list(TASKS)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_spec = str(checkpoint)
        self.loaded = resolve_checkpoint(self.checkpoint_spec, task=task, use_ema=use_ema, tracking_uri=tracking_uri,
                                         lookup_run=lookup_training_run)
        self.config = cfg = self.loaded.config
        self.task = self._task(task)
        self.net = self.loaded.net.to(self.device).eval()
        self.encoder = FrozenEncoder.from_config(cfg.encoder, self.device)
        if (self.encoder.dim, self.encoder.vocab_size) != (self.net.latent_dim, self.net.vocab_size):
            raise CheckpointError(
                f"{self.loaded.path}: the network expects latent width {self.net.latent_dim} and {self.net.vocab_size} "
                f"decode classes, but encoder '{cfg.encoder.name}' gives {self.encoder.dim} and {self.encoder.vocab_size}")
        self.pairs: Optional[ReferencePairs] = None
        self.evaluator: Optional[Evaluator] = None
        if self.task == "unconditional":
            if references is not None:
                raise EvalError("references are only used by the conditional tasks (translation, summarization)")
            if evaluator is not None:
                self.load_evaluator(evaluator, evaluator_dtype)
        else:
            spec = references or cfg.data.eval_source or {"translation": "wmt14-de-en", "summarization": "xsum"}[self.task]
            self.pairs = load_reference_pairs(spec, split=cfg.data.eval_split, input_field=cfg.data.input_field,
                                              target_field=cfg.data.target_field)
        self._git: Optional[dict[str, str]] = None  # read on first use (workers never need it)
        # ((n, their inputs, their stored ids), cond_mask, condition-only ids) of the first n reference rows.
        self._cond_rows: Optional[tuple[tuple, torch.Tensor, torch.Tensor]] = None

    def load_evaluator(self, evaluator: str | Evaluator, dtype: str = "float32") -> Optional[Evaluator]:
        """Load (or set) the Gen-PPL evaluator of a session built with ``evaluator=None``; the
        conditional tasks score with BLEU / ROUGE and need none (returns None for them)."""
        if self.task == "unconditional":
            self.evaluator = (evaluator if isinstance(evaluator, Evaluator)
                              else load_evaluator_or_auto(evaluator, dtype, self.device))
        return self.evaluator

    def _task(self, task: Optional[str]) -> str:
        trained = self.config.data.task
        if task is None:
            if trained == "unconditional":
                return "unconditional"
            return "summarization" if "xsum" in str(self.config.data.eval_source or "").lower() else "translation"
        if self.loaded.kind == "elf-lab" and (task == "unconditional") != (trained == "unconditional"):
            raise EvalError(f"task '{task}' does not fit this checkpoint: it was trained with data.task={trained}")
        return task

    # ------------------------------------------------------------------------------------------
    def provenance(self, sample_cfg: SampleConfig, n: int, seed: int) -> dict[str, str]:
        cfg, ld = self.config, self.loaded
        prov = {"task": self.task, "num_samples": str(n), "seed": str(seed), **sampler_settings(sample_cfg),
                "checkpoint": self.checkpoint_spec, "checkpoint_kind": ld.kind, "checkpoint_step": str(ld.step),
                "checkpoint_weights": ld.weights, "model_preset": cfg.model.preset, "encoder": cfg.encoder.name,
                "max_length": str(cfg.data.max_length), "device": str(self.device),
                "bf16_sampling": str(self.bf16).lower(), "workers": "1"}
        if self._git is None:
            self._git = _git_provenance()
        prov.update(self._git)
        if ld.model_version:
            prov["model_version"] = ld.model_version
        if self.evaluator is not None:
            prov.update(self.evaluator.describe())
            prov.update(ppl_max_length=str(PPL_MAX_LENGTH), ppl_batch_size=str(PPL_BATCH_SIZE))
        if self.pairs is not None:
            prov.update(references=self.pairs.source, references_condition_ids=self.pairs.ids_origin(self.encoder))
        return prov

    @property
    def bf16(self) -> bool:
        """bf16 autocast while sampling: the training setting, on CUDA only."""
        return bool(self.config.train.bf16 and self.device.type == "cuda")

    def sample_count(self, sample_cfg: SampleConfig, num_samples: int | None = None) -> int:
        """How many samples a run makes: ``num_samples`` (default ``sample_cfg.num_samples``), capped at
        the number of reference rows for the conditional tasks. Checks the config fits the task."""
        n = int(num_samples if num_samples is not None else sample_cfg.num_samples)
        if n < 1:
            raise EvalError(f"num_samples must be >= 1, got {n}")
        if self.task == "unconditional" and sample_cfg.cfg != 1.0:
            raise EvalError(f"sample.cfg={sample_cfg.cfg}: conditional CFG needs a condition; unconditional "
                            "sampling uses cfg 1 (the official hard-codes it, pt:generation.py:116)")
        if self.pairs is not None:
            n = min(n, len(self.pairs))
        return n

    def generate_samples(self, sample_cfg: SampleConfig, num_samples: int | None = None, seed: int | None = None, *,
                         batches: Optional[Sequence[int]] = None,
                         progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
        """``[{"id", "generated"[, "input", "target"]}]`` for sampling batches ``batches`` (default: all)
        of a run of :meth:`sample_count` samples with ``seed`` (default ``sample_cfg.seed``); ids are the
        run's sample indices, so any split of the batches concatenates to the full run."""
        n = self.sample_count(sample_cfg, num_samples)
        seed = int(seed if seed is not None else sample_cfg.seed)
        cfg, enc = self.config, self.encoder
        todo = list(range(num_batches(n, sample_cfg.batch_size))) if batches is None else [int(k) for k in batches]
        ids = [i for k in todo for i in range(*batch_bounds(k, n, sample_cfg.batch_size))]
        if self.task == "unconditional":
            texts = generate(self.net, sample_cfg, cfg.flow, seq_len=cfg.data.max_length, seed=seed, batches=todo,
                             decode_fn=enc.decode_ids, eos_id=enc.eos_id, pad_id=enc.pad_id, num_samples=n,
                             bf16=self.bf16, progress=progress)
            return [{"id": i, "generated": t} for i, t in zip(ids, texts)]
        hyps = self._generate_conditional(sample_cfg, n, seed, todo, progress)
        pairs = self.pairs
        assert pairs is not None
        return [{"id": i, "generated": h, "input": pairs.inputs[i], "target": pairs.targets[i]}
                for i, h in zip(ids, hyps)]

    def evaluate(self, sample_cfg: SampleConfig, num_samples: int | None = None, seed: int | None = None,
                 progress: bool = True, sampler: Any = None) -> EvalResult:
        """Generate ``num_samples`` (default ``sample_cfg.num_samples``; conditional: the first N reference
        rows) with ``seed`` (default ``sample_cfg.seed``) and score them.

        ``sampler`` (e.g. :class:`pipelines.eval_shards.ShardPool`) generates instead of this process:
        ``sampler(sample_cfg, n, seed, progress) -> samples`` (the same list :meth:`generate_samples`
        gives) and ``sampler.provenance() -> dict`` (merged into the provenance: workers, device)."""
        n = self.sample_count(sample_cfg, num_samples)
        seed = int(seed if seed is not None else sample_cfg.seed)
        t0 = time.perf_counter()
        if sampler is None:
            samples = self.generate_samples(sample_cfg, n, seed, progress=_Reporter("sample", n, progress))
        else:
            samples = sampler(sample_cfg, n, seed, progress)
            if [s["id"] for s in samples] != list(range(n)):
                raise EvalError(f"the sampler returned ids {[s['id'] for s in samples][:10]}..., expected 0..{n - 1}")
        t1 = time.perf_counter()
        prov = self.provenance(sample_cfg, n, seed)
        if sampler is not None:
            prov.update(sampler.provenance())
        texts = [s["generated"] for s in samples]
        if self.task == "unconditional":
            if not drop_empty(texts)[0]:
                raise EmptySamplesError(f"all {n} generated samples are empty or whitespace-only; nothing to score "
                                        f"(checkpoint step {self.loaded.step}, {prov['sampler']} {prov['steps']} steps)", samples)
            if self.evaluator is None:
                raise EvalError("this EvalSession was built with evaluator=None (sampling only): it cannot score "
                                "unconditional samples; build it with an evaluator")
            report = _Reporter("sample scored", len(drop_empty(texts)[0]), progress)
            metrics = self.evaluator.perplexity(texts, max_length=PPL_MAX_LENGTH, batch_size=PPL_BATCH_SIZE,
                                                progress=report).as_metrics()
        else:
            metrics = conditional_metrics(texts, [s["target"] for s in samples])
            metrics["num_samples"] = float(n)
        t2 = time.perf_counter()
        return EvalResult(metrics=metrics, samples=samples, sample_seconds=t1 - t0, score_seconds=t2 - t1,
                          provenance=prov)

    def _generate_conditional(self, sample_cfg: SampleConfig, n: int, seed: int, batches: list[int],
                              progress: Optional[Callable[[int, int], None]]) -> list[str]:
        """First ``n`` reference rows -> hypotheses of ``batches``. Only the condition tokens reach the
        sampler: the target half of every row is blank (pad), and :func:`encode_condition` encodes the
        condition only."""
        cfg, enc = self.config, self.encoder
        d = cfg.data
        if d.max_input_length is None:
            raise EvalError(f"{self.loaded.path}: data.max_input_length is not set; conditional sampling needs it")
        pairs = self.pairs
        assert pairs is not None
        key = (n, pairs.inputs[:n], None if pairs.ids is None else pairs.ids[:n])
        if self._cond_rows is None or self._cond_rows[0] != key:  # a sharded run asks batch by batch: tokenise once
            cond_ids = pairs.condition_ids(enc, n)
            collate = Collator(d.max_length, enc.eos_id, enc.pad_id, pad_token=d.pad_token, conditional=True,
                               max_input_length=d.max_input_length)
            batch = collate([{"condition_input_ids": c, "input_ids": []} for c in cond_ids])
            mask = batch["cond_mask"]
            blank = torch.full_like(batch["input_ids"], enc.pad_id)
            self._cond_rows = (key, mask, torch.where(mask, batch["input_ids"], blank))
        _, mask, ids = self._cond_rows
        return generate(self.net, sample_cfg, cfg.flow, seq_len=d.max_length, seed=seed, batches=batches,
                        decode_fn=enc.decode_ids, eos_id=enc.eos_id, pad_id=enc.pad_id, cond_mask=mask, cond_ids=ids,
                        encode_fn=enc.encode, target_len=d.max_length - d.max_input_length, bf16=self.bf16,
                        progress=progress)


__all__ = ["EvalSession", "EvalResult", "EmptySamplesError", "LoadedModel", "resolve_checkpoint",
           "load_evaluator_or_auto",
           "load_elf_lab_dir", "find_training_run", "TASKS"]
