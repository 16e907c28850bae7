"""Where one worker's training step goes, with and without the latent cache, at 1 and 2 threads.

    python benchmarks/step_profile.py                      # the embedded default's worker step
    python benchmarks/step_profile.py --reps 9 --out profile.json

Runs the real ``ELFTrainer.step`` of ``experiments/local_default.yaml`` (tiny ELF, MiniLM encoder,
64 tokens, ``adam_params=[unembed_kernel]``) on the bundled corpus and times its parts through
wrappers around the trainer's own calls: encoder forward, loss forward (passes A, B and the
gradient pass, encoder excluded), backward, Muon + Adam, clipping + EMA, and the rest (noise
draws, batching). Variants:

* latent cache off/on × (16 rows, 1 thread), (16 rows, 2 threads) and (32 rows, 2 threads) — the
  last is one worker doing both workers' rows, the "1 worker × 2 threads" alternative to
  "2 workers × 1 thread";
* at 32 rows, 2 threads, cache on (the embedded default's one worker): each CPU speed-up of the
  worker turned off in turn — Adam on cache-sized slices (``elf_core.optim.ADAM_SLICE_ELEMENTS``)
  and kept freed memory (``pipelines/infra/host_memory.py``), then both.

Every other variant runs as the worker does, with both on. Kept memory is switched per variant in
one process with ``mallopt`` (steps run in the main thread; the worker trains in a thread, which
needs the environment of ``host_memory.KEPT_MEMORY_ENV`` instead). Its "off" variants are an
approximation of a process that never set it: they still reuse heap blocks the others faulted in,
and glibc's adaptive mmap threshold cannot be restored — the end-to-end figure is
``benchmarks/embedded_default.py``'s.

Variants run interleaved (one step of each in turn, ``--reps`` rounds after ``--warmup``); every
figure is the median over rounds and each ratio the median of per-round pairs (steps measured side
by side). Prints a markdown table and the CPU model; ``--out`` writes the same as JSON. Needs torch, transformers and the
offline MiniLM package, not Ray or MLflow. Under the Zen 1 stand-in (``benchmarks/machine.py``),
prefix the command with its variables: ``MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
ATEN_CPU_CAPABILITY=avx2 python benchmarks/step_profile.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import elf_core.optim as optim_module  # noqa: E402
import elf_core.trainer as trainer_module  # noqa: E402
from benchmarks.machine import cpu_model, isa_limits  # noqa: E402
from elf_core.collate import Collator  # noqa: E402
from elf_core.config import load_config  # noqa: E402
from elf_core.data import build_dataset  # noqa: E402
from elf_core.encoder import FrozenEncoder  # noqa: E402
from elf_core.latent_cache import build_latent_cache  # noqa: E402
from elf_core.network import ELFNetwork  # noqa: E402
from elf_core.trainer import ELFTrainer  # noqa: E402
from pipelines.infra.host_memory import keep_freed_memory, return_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("encoder", "loss_forward", "backward", "optimizer", "clip_ema", "other", "total")
# (cache_latents, rows, threads, sliced Adam, kept memory)
VARIANTS = [(cache, rows, threads, True, True) for rows, threads in ((16, 1), (16, 2), (32, 2)) for cache in (False, True)]
WORKER = (True, 32, 2, True, True)  # the embedded default's one worker, as it trains
WITHOUT_SLICES, WITHOUT_KEPT, WITHOUT_BOTH = ((*WORKER[:3], sliced, kept) for sliced, kept in
                                             ((False, True), (True, False), (False, False)))
VARIANTS += [WITHOUT_SLICES, WITHOUT_KEPT, WITHOUT_BOTH]
ADAM_SLICES = optim_module.ADAM_SLICE_ELEMENTS


class PartTimer:
    """Accumulates wall time per part while the wrappers installed by :meth:`installed` run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0
        return timed

    @contextlib.contextmanager
    def installed(self, trainer: ELFTrainer) -> Iterator[None]:
        """Wrap the trainer's encoder, flow loss, backward, optimizer, clipping and EMA calls."""
        saved = [(trainer.encoder, "encode"), (trainer.optimizer, "step"), (trainer.ema, "update"),
                 (trainer_module, "flow_loss"), (torch.nn.utils, "clip_grad_norm_"), (torch.Tensor, "backward")]
        originals = [(obj, name, vars(obj).get(name)) for obj, name in saved]  # None: inherited
        # flow_loss runs after the encoder (encode_for_step), so its time excludes the encoder's.
        parts = {"encode": "encoder", "step": "optimizer", "update": "clip_ema", "flow_loss": "loss_forward",
                 "clip_grad_norm_": "clip_ema", "backward": "backward"}
        try:
            for obj, name, _ in originals:
                setattr(obj, name, self.wrap(parts[name], getattr(obj, name)))
            yield
        finally:
            for obj, name, fn in originals:
                if fn is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, fn)


def build(args) -> tuple:
    cfg = load_config(ROOT / "experiments" / "local_default.yaml",
                      [f"data.cache_dir={args.cache_dir}", "data.cache_latents=true"])
    encoder = FrozenEncoder.from_config(cfg.encoder)
    rows = build_dataset(cfg.data, encoder.tokenizer, progress=False)
    collate = Collator.from_config(cfg.data, encoder.eos_id, encoder.pad_id)
    cache = build_latent_cache(rows, collate, encoder, args.cache_dir, dtype=cfg.data.latent_cache_dtype,
                               progress=False)
    return cfg, encoder, rows, collate, cache


def round_batch(rows, collate, cache, rnd: int, n_rows: int, use_cache: bool = True) -> dict:
    """Round ``rnd``'s batch: the next ``n_rows`` rows of the corpus (wrapping), with their cached
    latents when ``use_cache``."""
    idx = [(rnd * n_rows + j) % len(rows) for j in range(n_rows)]
    batch = collate([rows[i] for i in idx])
    if use_cache:
        batch["latents"] = cache.rows(idx)
    return batch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--cache-dir", default=None, help="token + latent cache directory (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="elf-profile-") as tmp:
        args.cache_dir = args.cache_dir or tmp
        cfg, encoder, rows, collate, cache = build(args)
        trainers = {}
        for v in VARIANTS:
            torch.manual_seed(cfg.train.seed)
            net = ELFNetwork(cfg.model, encoder.dim, encoder.vocab_size)
            trainers[v] = ELFTrainer(cfg, net, encoder, device=torch.device("cpu"), steps_per_epoch=100)
        samples: dict[tuple, list[dict[str, float]]] = defaultdict(list)
        for rnd in range(args.warmup + args.reps):
            for v in VARIANTS:
                use_cache, n_rows, threads, sliced, kept = v
                optim_module.ADAM_SLICE_ELEMENTS = ADAM_SLICES if sliced else 1 << 62
                keep_freed_memory() if kept else return_freed_memory()
                batch = round_batch(rows, collate, cache, rnd, n_rows, use_cache)
                torch.set_num_threads(threads)
                timer = PartTimer()
                with timer.installed(trainers[v]):
                    t0 = time.perf_counter()
                    trainers[v].step(batch)
                    total = time.perf_counter() - t0
                if rnd >= args.warmup:
                    parts = dict(timer.seconds)
                    parts["other"] = total - sum(parts.values())
                    parts["total"] = total
                    samples[v].append(parts)
    result = {"cpu": cpu_model(), "isa_limits": isa_limits(), "torch": torch.__version__, "reps": args.reps,
              "command": "python benchmarks/step_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "variants": []}
    for v in VARIANTS:
        med = {part: statistics.median(s.get(part, 0.0) for s in samples[v]) for part in PARTS}
        result["variants"].append({"cache_latents": v[0], "rows": v[1], "threads": v[2], "sliced_adam": v[3],
                                   "kept_memory": v[4], "seconds": med, "steps_per_s": 1.0 / med["total"]})
    # Every round runs each variant once: a ratio is the median over rounds of that round's pair.
    def ratio(slow: tuple, fast: tuple) -> float:
        return statistics.median(a["total"] / b["total"] for a, b in zip(samples[slow], samples[fast]))

    result["ratios"] = {f"cache speed-up ({n} rows, {t} thr)": ratio((False, n, t, True, True), (True, n, t, True, True))
                        for _, n, t, _, _ in VARIANTS[:6:2]}
    result["ratios"]["sliced Adam speed-up (worker step)"] = ratio(WITHOUT_SLICES, WORKER)
    result["ratios"]["kept memory speed-up (worker step)"] = ratio(WITHOUT_KEPT, WORKER)
    result["ratios"]["both (worker step)"] = ratio(WITHOUT_BOTH, WORKER)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    head = "| cache | rows | threads | sliced Adam | kept memory | " + " | ".join(PARTS) + " | steps/s |"
    lines = [f"CPU: {result['cpu']} (ISA limits: {result.get('isa_limits') or 'none'}); torch {result['torch']}; "
             f"median of {result['reps']} interleaved rounds (s)",
             head, "|" + " --- |" * (len(PARTS) + 6)]
    yes = {True: "on", False: "off"}
    for r in result["variants"]:
        cells = " | ".join(f"{r['seconds'][p]:.3f}" for p in PARTS)
        lines.append(f"| {yes[r['cache_latents']]} | {r['rows']} | {r['threads']} | {yes[r['sliced_adam']]} | "
                     f"{yes[r['kept_memory']]} | {cells} | {r['steps_per_s']:.2f} |")
    lines += [f"{k}: {v:.2f}x" for k, v in result["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
