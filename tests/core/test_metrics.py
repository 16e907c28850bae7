"""Tests for elf_core.metrics (Gen PPL, entropy, BLEU, ROUGE) and elf_core.evaluator.

Gen PPL is checked against a separate hand loop over each sample on a tiny GPT-2 built from a config
with a word-level tokenizer: the expected NLL is read off the model's own logits, applying the
paper's rules one by one (first token unscored, exactly one EOS scored, no BOS, the set's longest
sample unpadded, empty samples dropped). BLEU/ROUGE are checked against values computed by hand.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from elf_core import metrics as M
from elf_core.evaluator import EvaluatorError, load_evaluator

VOCAB = ["<eos>", "<unk>", "<bos>", "a", "b", "c", "d", "e"]
EOS = 0



def word_tokenizer(bos_template: bool = False, padding_side: str = "right"):
    """Whitespace word-level tokenizer over VOCAB; ``<eos>`` is a special token, no pad token set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_template:  # a tokenizer that adds BOS by default (like Llama's)
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", bos_token="<bos>")
    fast.padding_side = padding_side
    return fast


@pytest.fixture(scope="module")
def lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_layer=1, n_embd=16, n_head=2, n_positions=1024,
                     bos_token_id=EOS, eos_token_id=EOS)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharpen the output so NLLs differ clearly between tokens
        model.lm_head.weight.mul_(20)
    return model


def hand_nll(model, texts: list[str], max_length: int = 1024) -> tuple[float, int, list[float]]:
    """Σ nll·w, Σ w and per-sample entropies, one sample at a time, straight from the rules."""
    tok = word_tokenizer()
    kept = [t for t in texts if t.strip()]
    ids = [[VOCAB.index(w) if w in VOCAB else 1 for w in t.split()][:max_length] for t in kept]
    longest = max(len(x) for x in ids)
    total, count, ents = 0.0, 0, []
    for x in ids:
        seq = x + ([EOS] if len(x) < longest else [])  # the set's longest sample has no pad after it
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0]
        seen_eos = 0
        for j in range(1, len(seq)):  # position 0 is context only: the first token is never scored
            tgt = seq[j]
            seen_eos += tgt == EOS
            w = int(tgt != EOS) + int(seen_eos == 1)  # real tokens + the first EOS (weight 2 right after a literal EOS)
            nll = float(torch.logsumexp(logits[j - 1].float(), 0) - logits[j - 1, tgt].float())
            total += nll * w
            count += w
        counts = np.unique(x, return_counts=True)[1]
        p = counts / counts.sum()
        ents.append(float(-(p * np.log(p)).sum()))
    assert tok  # (the real tokenizer gives the same ids; checked in test_tokenization_rules)
    return total, count, ents


TEXTS = ["a b c", "b b b b a", "", "c d", "   ", "e a e a e a b"]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_gen_ppl_matches_hand_loop(lm, batch_size):
    res = M.generative_perplexity(TEXTS, lm, word_tokenizer(), batch_size=batch_size)
    total, count, ents = hand_nll(lm, TEXTS)
    # 4 non-empty samples of 3, 5, 2, 7 tokens: (3-1)+(5-1)+(2-1)+(7-1) real predictions + 3 EOS
    # (the 7-token sample is the set's longest: no EOS term).
    assert count == 13 + 3
    assert (res.num_scored, res.num_dropped, res.num_tokens) == (4, 2, count)
    if batch_size == 1:  # same shapes as the hand loop: bit-identical
        assert res.nll_sum == pytest.approx(total, rel=0, abs=1e-12)
    else:
        assert res.nll_sum == pytest.approx(total, rel=1e-6)
    assert res.gen_ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert res.entropy == pytest.approx(sum(ents) / 4, rel=1e-6)
    assert res.per_sample_entropy[1] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), rel=1e-6)


def test_eos_rules_and_truncation(lm):
    # Longest sample truncated at max_length=3: no EOS term for it; the shorter one gets one.
    res = M.generative_perplexity(["a b c d e", "a b"], lm, word_tokenizer(), max_length=3, batch_size=1)
    total, count, _ = hand_nll(lm, ["a b c d e", "a b"], max_length=3)
    assert count == (3 - 1) + (2 - 1) + 1
    assert res.num_tokens == count and res.nll_sum == pytest.approx(total, abs=1e-12)
    # A literal EOS inside a text: the official weights give the token after it weight 2, no end EOS.
    res = M.generative_perplexity(["a <eos> b", "c d e a b"], lm, word_tokenizer(), batch_size=1)
    total, count, _ = hand_nll(lm, ["a <eos> b", "c d e a b"])
    assert count == (1 + 2) + 4  # [<eos>: 1, b: 2] + the longest sample's 4 predictions, no EOS
    assert res.num_tokens == count and res.nll_sum == pytest.approx(total, abs=1e-12)


def test_nll_and_weights_on_a_padded_batch():
    ids = torch.tensor([[3, 4, 0, 0], [5, 0, 6, 0], [3, 4, 5, 6]])
    logits = torch.randn(3, 4, len(VOCAB), generator=torch.Generator().manual_seed(1))
    nll, valid = M.nll_and_weights(logits, ids, EOS)
    assert valid.tolist() == [[1, 1, 0], [1, 2, 0], [1, 1, 1]]
    expected = torch.logsumexp(logits[0, 0], 0) - logits[0, 0, 4]
    assert nll[0, 0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_tokenization_rules():
    tok = M.prepare_tokenizer(word_tokenizer(bos_template=True, padding_side="left"))
    assert tok("a b").input_ids == [2, 3, 4]  # this tokenizer adds BOS by default ...
    assert M.tokenize_for_eval(["a b", "c"], tok, 1024) == [[3, 4], [5]]  # ... the metric never does
    assert tok.pad_token_id == EOS and tok.padding_side == "right"  # pad = EOS, right padding


def test_unigram_entropy_by_hand():
    assert M.unigram_entropy([7, 7, 7]) == pytest.approx(0.0, abs=1e-6)
    assert M.unigram_entropy([1, 2, 1, 2]) == pytest.approx(math.log(2), rel=1e-6)
    assert M.unigram_entropy([1, 1, 2]) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)), rel=1e-6)


def test_empty_sets_are_errors(lm):
    with pytest.raises(M.MetricsError, match="all 3 samples are empty"):
        M.generative_perplexity(["", " ", "\n"], lm, word_tokenizer())
    with pytest.raises(M.MetricsError, match="2 hypotheses but 1 references"):
        M.bleu(["a", "b"], ["a"])


# ----------------------------------------------------------------------------------------------
def test_bleu_known_values():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # precisions 5/6, 3/5, 1/4, 0/3 -> exp smoothing 1/(2·3); equal lengths: BP = 1
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert M.bleu([hyp], [ref]) == pytest.approx(expected, rel=1e-9)
    assert M.bleu(["The Cat"], ["the cat"]) == pytest.approx(100.0)  # lowercase=True, effective order 2
    # corpus-level: counts pooled over sentences, not averaged
    both = M.bleu([hyp, "a b c d"], [ref, "a b c d"])
    pooled = 100 * math.exp((math.log(9 / 10) + math.log(6 / 8) + math.log(3 / 6) + math.log(1 / 4)) / 4)
    assert both == pytest.approx(pooled, rel=1e-9)


def test_rouge_known_values():
    r = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert r["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)
    assert r["rougeL"] == pytest.approx(r["rouge1"])
    assert M.rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)  # Porter stemmer
    mean = M.rouge(["the cat sat", "x y"], ["the cat sat on the mat", "x y"])
    assert mean["rouge1"] == pytest.approx((100 * 2 / 3 + 100) / 2)  # mean over examples
    assert set(M.conditional_metrics(["a b"], ["a b"])) == {"bleu", "rouge1", "rouge2", "rougeL"}


# ----------------------------------------------------------------------------------------------
def test_evaluator_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvaluatorError, match="not in the local Hugging Face cache.*unreachable.*smollm2"):
        load_evaluator("no-such-org/no-such-model")
    with pytest.raises(EvaluatorError, match="no such file or directory"):
        load_evaluator(str(tmp_path / "missing"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(EvaluatorError, match="could not load evaluator"):
        load_evaluator(str(tmp_path / "junk"))
    with pytest.raises(EvaluatorError, match="dtype"):
        load_evaluator("gpt2-large", dtype="fp8")


def test_evaluator_from_local_dir(tmp_path, lm):
    lm.save_pretrained(tmp_path / "ev")
    word_tokenizer().save_pretrained(tmp_path / "ev")
    ev = load_evaluator(str(tmp_path / "ev"), device="cpu")
    res = ev.perplexity(TEXTS, batch_size=1)
    total, count, _ = hand_nll(lm, TEXTS)
    assert res.nll_sum == pytest.approx(total, abs=1e-12) and res.num_tokens == count
    assert ev.describe()["evaluator_dtype"] == "float32" and ev.describe()["evaluator_eos"] == "<eos> (0)"


@pytest.mark.slow
def test_smollm2_conversion_cache(tmp_path):
    """Dequantise the packaged GGUF once (tens of seconds), then reload from the cache quickly with
    bit-identical logits; the tokenizer adds no BOS and keeps EOS = pad = <|im_end|>."""
    pytest.importorskip("gguf")
    first = load_evaluator("smollm2", cache_dir=tmp_path, device="cpu")
    t0 = time.perf_counter()
    second = load_evaluator("smollm2", cache_dir=tmp_path, device="cpu")
    assert time.perf_counter() - t0 < 20  # ~1 s on an idle machine
    ids = torch.tensor([second.tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    tok = second.tokenizer
    assert (tok.eos_token, tok.pad_token_id) == ("<|im_end|>", tok.eos_token_id)
    assert M.tokenize_for_eval(["Hello world"], tok, 1024)[0][0] != tok.bos_token_id
