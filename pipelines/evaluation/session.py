"""Evaluate an ELF checkpoint in-process: load model, encoder and evaluator once, then sample + score
any number of sampling configs. ``pipelines/evaluate.py``, the sampling shards, the frontier-sweep
trials and the evaluator that runs beside training all build on this.

    session = EvalSession("models:/elf-local-default@last", evaluator="smollm2")
    result = session.evaluate(SampleConfig(sampler="sde", steps=32, gamma=1.5, sc_cfg=3.0), num_samples=100)
    result.metrics  # {"gen_ppl": ..., "entropy": ..., "num_scored": ...}

Checkpoints are resolved by :func:`pipelines.checkpoints.resolve` (any reference it accepts). An
official checkpoint carries no task: pass ``task=``; its data/sampling settings then come from the
paper experiment YAML. Weights: ``use_ema=None`` takes the EMA once it is warm
(:func:`pipelines.checkpoints.choose_weights`); official checkpoints use EMA, as the official eval.

Sampling only: ``EvalSession(..., evaluator=None)`` loads no evaluator; :meth:`generate_samples`
then produces any subset of a run's sampling batches (``batches=``), exactly as the full run would
(per-batch seeds, :mod:`elf_core.sampling`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from elf_core.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, CheckpointError, build_network, load_checkpoint
from elf_core.collate import Collator
from elf_core.config import ExperimentConfig, SampleConfig, load_config
from elf_core.encoder import FrozenEncoder
from elf_core.evaluator import Evaluator, load_evaluator
from elf_core.metrics import conditional_metrics, drop_empty
from elf_core.sampling import batch_bounds, generate, num_batches
from pipelines import checkpoints
from pipelines.evaluation.choices import TASKS
from pipelines.evaluation.inputs import EvalError, ReferencePairs, load_reference_pairs, sampler_settings
from pipelines.infra.paths import EXPERIMENTS_DIR, PROJECT_ROOT
from pipelines.infra.progress import Progress

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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_network(ckpt: checkpoints.ResolvedCheckpoint) -> torch.nn.Module:
    """The network with the weights ``ckpt.weights`` chose, from a resolved checkpoint (with or
    without ``state.pt``: registered MLflow copies carry none)."""
    if ckpt.kind == "official":
        from elf_core.official import load_official_checkpoint

        return load_official_checkpoint(str(ckpt.spec), use_ema=ckpt.weights == "ema")[0].eval()
    path, meta = ckpt.path, ckpt.meta
    if (path / STATE_FILE).is_file():
        loaded = load_checkpoint(path)
        net, ema = loaded.model, loaded.ema_state
    else:
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path / MODEL_FILE))
            ema = load_file(str(path / EMA_FILE)) if (path / EMA_FILE).is_file() else None
        except Exception as e:
            raise CheckpointError(f"{ckpt.spec}: cannot read safetensors weights: {e}") from None
        net = build_network(ckpt.config.model, meta["latent_dim"], meta["vocab_size"], weights, str(path / MODEL_FILE))
    if ckpt.weights == "ema":
        net.load_state_dict({**net.state_dict(), **ema}, strict=True)
    return net.eval()


def official_config(ckpt: checkpoints.ResolvedCheckpoint, task: Optional[str], net: torch.nn.Module):
    cfg = load_config(EXPERIMENTS_DIR / OFFICIAL_TASK_CONFIGS[task or "unconditional"])
    return dataclasses.replace(cfg, name=f"official-{ckpt.path.name}", model=net.cfg)


class EvalSession:
    """Model + encoder + evaluator loaded once; :meth:`evaluate` samples and scores one sampling config."""

    def __init__(self, checkpoint: str | None, *, evaluator: str | Evaluator | None = "auto",
                 evaluator_dtype: str = "float32", task: str | None = None, references: str | None = None,
                 device: str | None = None, use_ema: bool | None = None, tracking_uri: str | None = None,
                 config: ExperimentConfig | None = None):
        """``evaluator=None``: sampling only (no evaluator is loaded; unconditional :meth:`evaluate`
        then needs a ``sampler`` and fails when scoring). ``checkpoint=None`` with a ``config``: the
        encoder, evaluator and references of that experiment, and no network until
        :meth:`use_checkpoint` (the evaluator beside training scores one checkpoint after another)."""
        if task is not None and task not in TASKS:
            raise EvalError(f"task '{task}' is not one of {list(TASKS)}")
        if checkpoint is None and config is None:
            raise EvalError("EvalSession needs a checkpoint or an experiment config")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tracking_uri, self.ckpt, self.net = tracking_uri, None, None
        if checkpoint is not None:
            net = self._resolve(str(checkpoint), use_ema)
            config = self.ckpt.config or official_config(self.ckpt, task, net)
        self.config = cfg = config
        self.task = self._task(task)
        self.encoder = FrozenEncoder.from_config(cfg.encoder, self.device)
        if checkpoint is not None:
            self._set_net(net)
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
        self._cond_rows: Optional[tuple[tuple, torch.Tensor, torch.Tensor]] = None  # see _generate_conditional

    def _resolve(self, spec: str, use_ema: bool | None) -> torch.nn.Module:
        self.checkpoint_spec = spec
        with checkpoints.resolve(spec, tracking_uri=self.tracking_uri, use_ema=use_ema) as ckpt:
            self.ckpt, net = ckpt, load_network(ckpt)
        return net

    def _set_net(self, net: torch.nn.Module) -> None:
        if (self.encoder.dim, self.encoder.vocab_size) != (net.latent_dim, net.vocab_size):
            raise CheckpointError(
                f"{self.checkpoint_spec}: the network expects latent width {net.latent_dim} and {net.vocab_size} "
                f"decode classes, but encoder '{self.config.encoder.name}' gives {self.encoder.dim} and "
                f"{self.encoder.vocab_size}")
        self.net = net.to(self.device).eval()

    def use_checkpoint(self, spec: str, use_ema: bool | None = None) -> checkpoints.ResolvedCheckpoint:
        """Load another checkpoint's network, keeping the encoder, evaluator and references."""
        self._set_net(self._resolve(str(spec), use_ema))
        return self.ckpt

    def load_evaluator(self, evaluator: str | Evaluator, dtype: str = "float32") -> Optional[Evaluator]:
        """Load (or set) the Gen-PPL evaluator of a session built with ``evaluator=None``; the
        conditional tasks score with BLEU / ROUGE and need none (returns None for them)."""
        if self.task == "unconditional":
            self.evaluator = (evaluator if isinstance(evaluator, Evaluator)
                              else load_evaluator(evaluator, dtype=dtype, device=self.device, log=_log))
        return self.evaluator

    def _task(self, task: Optional[str]) -> str:
        trained = self.config.data.task
        if task is None:
            if trained == "unconditional":
                return "unconditional"
            return "summarization" if "xsum" in str(self.config.data.eval_source or "").lower() else "translation"
        if (self.ckpt is None or self.ckpt.kind == "elf-lab") and (task == "unconditional") != (trained == "unconditional"):
            raise EvalError(f"task '{task}' does not fit this checkpoint: it was trained with data.task={trained}")
        return task

    # ------------------------------------------------------------------------------------------
    def provenance(self, sample_cfg: SampleConfig, n: int, seed: int) -> dict[str, str]:
        cfg, ck = self.config, self.ckpt
        prov = {"task": self.task, "num_samples": str(n), "seed": str(seed), **sampler_settings(sample_cfg),
                "checkpoint": self.checkpoint_spec, "checkpoint_pinned": ck.pinned, "checkpoint_kind": ck.kind,
                "checkpoint_step": str(ck.step), "checkpoint_weights": ck.weights, "model_preset": cfg.model.preset,
                "encoder": cfg.encoder.name, "max_length": str(cfg.data.max_length), "device": str(self.device),
                "bf16_sampling": str(self.bf16).lower(), "workers": "1"}
        if self._git is None:
            from pipelines.tracking.runs import provenance_tags

            tags = provenance_tags(PROJECT_ROOT)
            self._git = {"git_sha": tags.get("elf.git.sha", "unknown"), "git_dirty": tags.get("elf.git.dirty", "unknown")}
        prov.update(self._git)
        if ck.model_version:
            prov["model_version"] = ck.model_version
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
        return min(n, len(self.pairs)) if self.pairs is not None else n

    def generate_samples(self, sample_cfg: SampleConfig, num_samples: int | None = None, seed: int | None = None, *,
                         batches: Optional[Sequence[int]] = None,
                         progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
        """``[{"id", "generated"[, "input", "target"]}]`` for sampling batches ``batches`` (default: all)
        of a run of :meth:`sample_count` samples with ``seed`` (default ``sample_cfg.seed``); ids are the
        run's sample indices, so any split of the batches concatenates to the full run."""
        n = self.sample_count(sample_cfg, num_samples)
        seed = int(seed if seed is not None else sample_cfg.seed)
        enc = self.encoder
        todo = list(range(num_batches(n, sample_cfg.batch_size))) if batches is None else [int(k) for k in batches]
        ids = [i for k in todo for i in range(*batch_bounds(k, n, sample_cfg.batch_size))]
        if self.task == "unconditional":
            texts = generate(self.net, sample_cfg, self.config.flow, seq_len=self.config.data.max_length, seed=seed,
                             batches=todo, decode_fn=enc.decode_ids, eos_id=enc.eos_id, pad_id=enc.pad_id,
                             num_samples=n, bf16=self.bf16, progress=progress)
            return [{"id": i, "generated": t} for i, t in zip(ids, texts)]
        hyps = self._generate_conditional(sample_cfg, n, seed, todo, progress)
        return [{"id": i, "generated": h, "input": self.pairs.inputs[i], "target": self.pairs.targets[i]}
                for i, h in zip(ids, hyps)]

    def evaluate(self, sample_cfg: SampleConfig, num_samples: int | None = None, seed: int | None = None,
                 progress: bool = True, sampler: Any = None) -> EvalResult:
        """Generate ``num_samples`` (default ``sample_cfg.num_samples``; conditional: the first N reference
        rows) with ``seed`` (default ``sample_cfg.seed``) and score them. ``sampler`` (e.g.
        :class:`pipelines.evaluation.shards.ShardPool`) generates instead of this process:
        ``sampler(sample_cfg, n, seed, progress) -> samples`` and ``sampler.provenance() -> dict``."""
        n = self.sample_count(sample_cfg, num_samples)
        seed = int(seed if seed is not None else sample_cfg.seed)
        t0 = time.perf_counter()
        if sampler is None:
            report = Progress(n, unit="sample", tag="[eval]") if progress else None
            samples = self.generate_samples(sample_cfg, n, seed, progress=report)
        else:
            samples = sampler(sample_cfg, n, seed, progress)
            if [s["id"] for s in samples] != list(range(n)):
                raise EvalError(f"the sampler returned ids {[s['id'] for s in samples][:10]}..., expected 0..{n - 1}")
        t1 = time.perf_counter()
        prov = {**self.provenance(sample_cfg, n, seed), **(sampler.provenance() if sampler is not None else {})}
        metrics = self.score(samples, prov, progress)
        return EvalResult(metrics=metrics, samples=samples, sample_seconds=t1 - t0,
                          score_seconds=time.perf_counter() - t1, provenance=prov)

    def score(self, samples: list[dict], prov: dict[str, str], progress: bool = False) -> dict[str, float]:
        """The task's metrics of ``samples``: Gen PPL + entropy, or BLEU + ROUGE against their targets."""
        texts = [s["generated"] for s in samples]
        if self.task != "unconditional":
            return {**conditional_metrics(texts, [s["target"] for s in samples]), "num_samples": float(len(samples))}
        kept = drop_empty(texts)[0]
        if not kept:
            raise EmptySamplesError(f"all {len(texts)} generated samples are empty or whitespace-only; nothing to "
                                    f"score (checkpoint step {self.ckpt.step}, {prov['sampler']} {prov['steps']} "
                                    "steps)", samples)
        if self.evaluator is None:
            raise EvalError("this EvalSession was built with evaluator=None (sampling only): it cannot score "
                            "unconditional samples; build it with an evaluator")
        report = Progress(len(kept), unit="sample scored", tag="[eval]") if progress else None
        return self.evaluator.perplexity(texts, max_length=PPL_MAX_LENGTH, batch_size=PPL_BATCH_SIZE,
                                         progress=report).as_metrics()

    def _generate_conditional(self, sample_cfg: SampleConfig, n: int, seed: int, batches: list[int],
                              progress: Optional[Callable[[int, int], None]]) -> list[str]:
        """First ``n`` reference rows -> hypotheses of ``batches``. Only the condition tokens reach the
        sampler: the target half of every row is blank (pad), and the sampler encodes the condition only."""
        d, enc, pairs = self.config.data, self.encoder, self.pairs
        if d.max_input_length is None:
            raise EvalError(f"{self.checkpoint_spec}: data.max_input_length is not set; conditional sampling needs it")
        key = (n, pairs.inputs[:n], None if pairs.ids is None else pairs.ids[:n])
        if self._cond_rows is None or self._cond_rows[0] != key:  # a sharded run asks batch by batch: tokenise once
            collate = Collator(d.max_length, enc.eos_id, enc.pad_id, pad_token=d.pad_token, conditional=True,
                               max_input_length=d.max_input_length)
            batch = collate([{"condition_input_ids": c, "input_ids": []} for c in pairs.condition_ids(enc, n)])
            mask = batch["cond_mask"]
            self._cond_rows = (key, mask, torch.where(mask, batch["input_ids"], torch.full_like(batch["input_ids"],
                                                                                                enc.pad_id)))
        _, mask, ids = self._cond_rows
        return generate(self.net, sample_cfg, self.config.flow, seq_len=d.max_length, seed=seed, batches=batches,
                        decode_fn=enc.decode_ids, eos_id=enc.eos_id, pad_id=enc.pad_id, cond_mask=mask, cond_ids=ids,
                        encode_fn=enc.encode, target_len=d.max_length - d.max_input_length, bf16=self.bf16,
                        progress=progress)


__all__ = ["EvalSession", "EvalResult", "EmptySamplesError", "load_network"]
