"""The embedded default's worker step with and without kept host memory, each in a fresh process.

    python benchmarks/host_memory.py                       # 2 rounds of 20 steps each way
    python benchmarks/host_memory.py --steps 40 --rounds 3 --out host_memory.json

Each child process runs the real ``ELFTrainer.step`` of ``experiments/local_default.yaml`` (32 rows,
2 threads, latent cache on: the embedded default's one worker) in a thread, as Ray Train runs the
training function (built in that thread too, as the worker does), and reports per step, after 3
warm-up steps: wall seconds, user and kernel CPU seconds, minor page faults; and its peak resident memory over those steps. One child starts with
``pipelines.infra.host_memory.KEPT_MEMORY_ENV`` (what the driver gives CPU training workers), the
other with none of those variables; ``--rounds`` pairs, the first of each pair alternating, after
the parent has cached the tokens and latents. Every timed step computes its metrics (the worker's
logged steps; its other steps skip the decode-accuracy argmax). Prints a markdown table
(medians over rounds) and the CPU model. Needs torch, transformers and the offline MiniLM package.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402
from benchmarks.step_profile import build, round_batch  # noqa: E402
from pipelines.infra.host_memory import KEPT_MEMORY_ENV  # noqa: E402

FIELDS = ("wall_s", "user_s", "kernel_s", "minor_faults", "peak_rss_gb")
WARMUP = 3


def _reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM), so the peak
    is the steps', not start-up's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(steps: int, cache_dir: str) -> dict:
    """Steps in a thread of this process; the per-step means (and peak RSS) as a dict."""
    import torch

    from elf_core.network import ELFNetwork
    from elf_core.trainer import ELFTrainer

    out: dict = {}
    failed: list[BaseException] = []

    def train() -> None:
        try:
            _train()
        except BaseException as e:  # re-raised in the main thread: the child must exit non-zero
            failed.append(e)

    def _train() -> None:
        # Everything in this one thread, as in a Ray Train worker: had the main thread run a 2-thread
        # OpenMP region first, the process would hold two OpenMP teams (4 threads on 2 CPUs) and
        # libgomp would throttle its spin-waiting, making mid-sized elementwise ops 1.5-2x slower
        # (an earlier version of this script built the trainer in the main thread and measured that).
        cfg, encoder, rows, collate, cache = build(argparse.Namespace(cache_dir=cache_dir))
        torch.set_num_threads(2)
        torch.manual_seed(cfg.train.seed)
        trainer = ELFTrainer(cfg, ELFNetwork(cfg.model, encoder.dim, encoder.vocab_size), encoder,
                             device=torch.device("cpu"), steps_per_epoch=100)
        for r in range(WARMUP + steps):
            if r == WARMUP:
                _reset_peak_rss()
                t0, u0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            trainer.step(round_batch(rows, collate, cache, r, 32))
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        out.update(wall_s=(time.perf_counter() - t0) / steps, user_s=(u1.ru_utime - u0.ru_utime) / steps,
                   kernel_s=(u1.ru_stime - u0.ru_stime) / steps, minor_faults=(u1.ru_minflt - u0.ru_minflt) / steps,
                   peak_rss_gb=_peak_rss_bytes() / 1e9)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out


def _run_child(kept: bool, steps: int, cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEPT_MEMORY_ENV}
    if kept:
        env.update(KEPT_MEMORY_ENV)
    proc = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), "--cache-dir", cache_dir],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"a child (kept={kept}) failed with exit {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per child (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="pairs of children (kept, not kept), alternating")
    p.add_argument("--cache-dir", default=None, help="token + latent cache directory (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps, args.cache_dir)))
        return {}
    with tempfile.TemporaryDirectory(prefix="elf-host-memory-") as tmp:
        cache_dir = args.cache_dir or tmp
        build(argparse.Namespace(cache_dir=cache_dir))  # tokens and latents cached before any child runs
        samples: dict[bool, list[dict]] = {True: [], False: []}
        for rnd in range(args.rounds):
            for kept in ((True, False) if rnd % 2 == 0 else (False, True)):  # alternate who goes first
                samples[kept].append(_run_child(kept, args.steps, cache_dir))
    rows = {("kept" if kept else "glibc default"): {f: statistics.median(s[f] for s in runs) for f in FIELDS}
            for kept, runs in samples.items()}
    result = {"cpu": cpu_model(), "steps": args.steps, "rounds": args.rounds, "env": KEPT_MEMORY_ENV, "rows": rows,
              "command": "python benchmarks/host_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [f"CPU: {result['cpu']}; medians of {args.rounds} fresh processes each, {args.steps} steps each, per step",
             "| host memory | " + " | ".join(FIELDS) + " |", "|" + " --- |" * (len(FIELDS) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{r[f]:,.3f}" if f != "minor_faults" else f"{r[f]:,.0f}" for f in FIELDS) + " |"
              for name, r in rows.items()]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
