"""Paper metrics for ELF samples: generative perplexity + unigram entropy, BLEU, ROUGE (reference §4).

Pure torch / transformers / numpy / sacrebleu / rouge-score; the evaluator model and tokenizer are
passed in (``elf_core.evaluator`` loads them). Each number follows the official code
(pt:utils/metrics_utils.py) term by term:

Gen PPL (pt:utils/metrics_utils.py:128-219)
  * Every text is re-tokenised with the evaluator's tokenizer, **no BOS** (``add_special_tokens=False``;
    GPT-2 adds none anyway, and SmolLM2's tokenizer must not get its ``<|im_start|>`` either),
    truncated to ``max_length`` (1024), right-padded with **pad = EOS**.
  * The official pads the whole set in one call to the *set's* longest sample (``padding=True``), then
    scores ``nll[:, j] = logsumexp(logits[:, j]) − logits[:, j, ids[:, j+1]]`` with weight
    ``valid[:, j] = first_eos[:, j+1] + (ids[:, j+1] != eos)`` where ``first_eos = cumsum(ids == eos) == 1``.
    So the first token is never scored, every real token is, plus **exactly one EOS** (the first pad:
    P(end of text | text)). A sample as long as the set's longest one has no pad, hence no EOS term —
    including, but not only, samples truncated at ``max_length``. This module pads each batch to
    ``min(batch longest + 1, set longest)`` instead: under a causal evaluator the logits of real
    positions do not depend on later pads, so the weighted terms are the official ones exactly, with at
    most one extra column of compute per batch.
  * ``PPL = exp(Σ nll·valid / Σ valid)`` over the whole set, accumulated in float64 (NLLs in float32).
Entropy (pt:utils/metrics_utils.py:221-234)
  * Per sample, over its evaluator tokens (after truncation): ``p = counts / total`` in float32,
    ``H = −Σ p ln(p + 1e-10)`` in nats; the reported value is the mean over samples.
Empty samples (pt:generation.py:234, scripts/eval_ppl.py:64)
  * Empty or whitespace-only texts are dropped before both numbers.
BLEU / ROUGE (pt:utils/metrics_utils.py:26-49)
  * ``sacrebleu.corpus_bleu(hyps, [refs], lowercase=True, use_effective_order=True).score``;
    ``RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, hyp)`` F1 × 100, mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from elf_core.errors import ElfError

ProgressFn = Callable[[int, int], None]


class MetricsError(ElfError, ValueError):
    """Inputs the metrics cannot be computed on; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Gen PPL and entropy
@dataclass
class PerplexityResult:
    """What :func:`generative_perplexity` measured. ``per_sample_*`` follow the order of the scored
    (non-empty) texts; a per-sample PPL is NaN when the sample had no scored term."""

    gen_ppl: float
    entropy: float
    num_scored: int  # non-empty samples scored
    num_dropped: int  # empty / whitespace-only samples dropped
    num_tokens: int  # Σ valid: scored predictions (tokens after the first, plus one EOS per sample)
    nll_sum: float  # Σ nll·valid (float64), so sets can be merged: exp(Σ nll_sum / Σ num_tokens)
    per_sample_ppl: list[float] = field(default_factory=list)
    per_sample_entropy: list[float] = field(default_factory=list)

    def as_metrics(self) -> dict[str, float]:
        return {"gen_ppl": self.gen_ppl, "entropy": self.entropy, "num_scored": float(self.num_scored),
                "num_dropped": float(self.num_dropped), "num_scored_tokens": float(self.num_tokens)}


def drop_empty(texts: Sequence[str]) -> tuple[list[str], int]:
    """``(non-empty texts, how many were dropped)``; non-strings count as empty (official rule)."""
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    return kept, len(texts) - len(kept)


def prepare_tokenizer(tokenizer):
    """pad = EOS when the tokenizer has no pad token (pt:utils/metrics_utils.py:120-122); right padding
    (GPT-2's default, which the weight rule assumes). Returns the same tokenizer object."""
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise MetricsError(f"evaluator tokenizer '{name}' has no EOS token; Gen PPL scores one EOS per sample")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def nll_and_weights(logits: torch.Tensor, input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official per-position terms (pt:utils/metrics_utils.py:141-154).

    logits (B, L, V) of ``input_ids`` (B, L) -> ``nll`` (B, L−1) float32 and ``valid`` (B, L−1) int32:
    position j scores the prediction of token j+1; weights count real tokens plus the first EOS.
    """
    targets = input_ids[:, 1:]
    pred = logits[:, :-1, :]
    log_norm = torch.logsumexp(pred.to(torch.float32), dim=-1)
    target_logits = pred.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(torch.float32)
    nll = log_norm - target_logits
    is_eos = input_ids == eos_id
    first_eos = is_eos.to(torch.int32).cumsum(dim=-1) == 1
    valid = first_eos[:, 1:].to(torch.int32) + (~is_eos)[:, 1:].to(torch.int32)
    return nll, valid


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of one sample's token counts, with the official float32 arithmetic
    (pt:utils/metrics_utils.py:225-227); 0.0 for an empty sequence is never reached (empties are dropped)."""
    _, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    probs = counts.astype(np.float32) / counts.sum()
    return float(-np.sum(probs * np.log(probs + 1e-10)))


def tokenize_for_eval(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Evaluator ids per text: no special tokens (no BOS), truncated to ``max_length``."""
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generative_perplexity(texts: Sequence[str], model: torch.nn.Module, tokenizer, *, max_length: int = 1024,
                          batch_size: int = 16, progress: Optional[ProgressFn] = None) -> PerplexityResult:
    """Gen PPL and mean entropy of ``texts`` under the causal LM ``model`` (see the module docstring).

    ``progress(done, total)`` is called after each batch with counts of scored samples. Raises
    :class:`MetricsError` when no text is left after dropping empty ones.
    """
    if max_length < 2:
        raise MetricsError(f"max_length must be >= 2 (one token is context, the next is scored), got {max_length}")
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    kept, dropped = drop_empty(texts)
    if not kept:
        raise MetricsError(f"no sample to score: all {len(texts)} samples are empty or whitespace-only")
    prepare_tokenizer(tokenizer)
    eos = int(tokenizer.eos_token_id)
    n_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if n_pos is not None and n_pos < max_length:
        raise MetricsError(f"the evaluator has {n_pos} positions, fewer than max_length={max_length}; "
                           f"lower the evaluation max_length")
    ids = tokenize_for_eval(kept, tokenizer, max_length)
    lengths = [len(x) for x in ids]
    set_longest = max(lengths)  # the official pads the whole set to this (padding=True)
    device = _model_device(model)

    nll_sum = 0.0
    n_valid = 0
    per_nll = np.zeros(len(ids), dtype=np.float64)
    per_cnt = np.zeros(len(ids), dtype=np.float64)
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        width = min(max(len(r) for r in rows) + 1, set_longest)
        batch = torch.full((len(rows), width), eos, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, :len(r)] = 1
        batch, attn = batch.to(device), attn.to(device)
        logits = model(input_ids=batch, attention_mask=attn).logits
        nll, valid = nll_and_weights(logits, batch, eos)
        vnp = valid.double().cpu().numpy()
        # nll·valid, with 0 (not NaN) where weight 0 meets a non-finite NLL (a row with no real token).
        weighted = np.where(vnp > 0, nll.double().cpu().numpy() * vnp, 0.0)
        nll_sum += float(weighted.sum())
        n_valid += int(vnp.sum())
        per_nll[start:start + len(rows)] = weighted.sum(axis=-1)
        per_cnt[start:start + len(rows)] = vnp.sum(axis=-1)
        if progress is not None:
            progress(min(start + batch_size, len(ids)), len(ids))

    with np.errstate(divide="ignore", invalid="ignore"):
        per_ppl = np.where(per_cnt > 0, np.exp(per_nll / per_cnt), np.nan)
    entropies = [unigram_entropy(r) for r in ids]
    if n_valid == 0:  # every sample is a single token and as long as the longest: nothing scored
        raise MetricsError(f"no token could be scored in {len(kept)} samples (each is one evaluator token long)")
    return PerplexityResult(
        gen_ppl=math.exp(nll_sum / n_valid), entropy=sum(entropies) / len(entropies), num_scored=len(kept),
        num_dropped=dropped, num_tokens=n_valid, nll_sum=nll_sum, per_sample_ppl=per_ppl.tolist(),
        per_sample_entropy=entropies)


# ----------------------------------------------------------------------------------------------
# BLEU / ROUGE
def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up 1:1")
    if not hypotheses:
        raise MetricsError("no hypotheses to score")
    for what, seq in (("hypothesis", hypotheses), ("reference", references)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise MetricsError(f"{what} {i} is a {type(s).__name__}, expected a string")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU as the official (13a tokenisation, exp smoothing, lower-cased, effective order)."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=True,
                                       use_effective_order=True).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 × 100 over pairs, Porter stemmer on, ``score(reference, hypothesis)``."""
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        s = scorer.score(ref, hyp)
        for k in sums:
            sums[k] += s[k].fmeasure * 100
    return {k: v / len(hypotheses) for k, v in sums.items()}


def conditional_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{bleu, rouge1, rouge2, rougeL}`` — the official computes all four for both tasks."""
    return {"bleu": bleu(hypotheses, references), **rouge(hypotheses, references)}


__all__ = ["MetricsError", "PerplexityResult", "drop_empty", "prepare_tokenizer", "nll_and_weights",
           "unigram_entropy", "tokenize_for_eval", "generative_perplexity", "bleu", "rouge",
           "conditional_metrics"]
