"""The embedded default (``python pipelines/train.py``, no arguments) timed end to end, against an
older commit of ELF Lab on the same machine in the same invocation — the before/after of issue 13.

    python benchmarks/embedded_default.py --baseline 63ef71b --out embedded.json
    python benchmarks/embedded_default.py --variant eval100=train.eval_every=100
    python benchmarks/embedded_default.py --baseline 63ef71b --zen1-proxy    # Zen 1 matmul speed

Each variant runs in its own fresh ``ELF_LAB_ROOT`` (nothing cached from another run: data, latents
and MLflow store start empty) with this checkout's virtualenv; the baseline runs from a ``git
worktree`` of the given commit. Per run: the command's wall time, the driver's own "done in" line,
held-out loss / clean-decode accuracy at the end and the training loop's seconds when printed.
Runs are sequential (2 cores: concurrent runs would measure contention). ``--zen1-proxy`` runs
every command under :data:`benchmarks.machine.ZEN1_PROXY_ENV` (matrix maths at about Zen 1's
speed; the calibration is in that module). Prints a markdown table and writes the JSON, with the
instruction-set limits in effect.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import ZEN1_PROXY_ENV, cpu_model, isa_limits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = {  # what the driver prints at the end (pipelines/training/driver.py, print_summary)
    "done_min": r"done in ([0-9.]+) min",
    "loss": r"held-out loss: [0-9.na]+ at step \d+ -> ([0-9.]+)",
    "decode_acc": r"held-out (?:clean_)?decode_acc\w*: [0-9.na]+ at step \d+ -> ([0-9.]+)",
    "train_loop_s": r"training loop: ([0-9.]+) s",
    "evaluated_at": r"evaluated beside training at steps (\[[0-9, ]*\])",
}


def run_env(label: str, code_dir: Path, zen1_proxy: bool = False) -> dict[str, str]:
    """The environment of one run: a fresh ELF_LAB_ROOT, the code on PYTHONPATH, the ISA limits."""
    return {**os.environ, **(ZEN1_PROXY_ENV if zen1_proxy else {}),
            "ELF_LAB_ROOT": tempfile.mkdtemp(prefix=f"elf-bench-{label.replace(' ', '-')}-"),
            "PYTHONPATH": str(code_dir), "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def run_one(label: str, code_dir: Path, overrides: list[str], log_dir: Path, zen1_proxy: bool = False) -> dict:
    env = run_env(label, code_dir, zen1_proxy)
    cmd = [sys.executable, "pipelines/train.py", *overrides]
    print(f"[bench] {label}: {' '.join(cmd[1:])} (in {code_dir})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (log_dir / f"{label}.log").write_text(proc.stdout + proc.stderr)
    row = {"label": label, "code": str(code_dir), "overrides": overrides, "rc": proc.returncode,
           "wall_s": round(wall, 1), **parse(proc.stdout + proc.stderr)}
    print(f"[bench] {label}: rc {proc.returncode}, wall {wall:.1f} s, {row}", flush=True)
    return row


def parse(text: str) -> dict:
    """The figures of the driver's end-of-run summary (None for a line it did not print)."""
    row = {}
    for key, pattern in PATTERNS.items():
        found = re.findall(pattern, text)
        row[key] = (found[-1] if key == "evaluated_at" else float(found[-1])) if found else None
    return row


def baseline_tree(commit: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="elf-baseline-")) / commit
    subprocess.run(["git", "worktree", "add", "--detach", str(where), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def table(rows: list[dict]) -> str:
    lines = ["| run | wall (command) | done in | training loop | held-out loss | clean decode | evaluated at |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        fmt = lambda v, f: "—" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r['label']} | {r['wall_s']:.1f} s | {fmt(r['done_min'], '{:.1f} min')} | "
                     f"{fmt(r['train_loop_s'], '{:.1f} s')} | {fmt(r['loss'], '{:.4f}')} | "
                     f"{fmt(r['decode_acc'], '{:.4f}')} | {r['evaluated_at'] or '—'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None, help="an older commit to time first (git worktree)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=OVERRIDE[,OVERRIDE]",
                   help="also time this checkout with these train.py overrides (repeatable)")
    p.add_argument("--zen1-proxy", action="store_true",
                   help="limit MKL/oneDNN/ATen instruction sets so matmuls run at about Zen 1 speed (benchmarks/machine.py)")
    p.add_argument("--out", type=Path, default=Path("embedded_default.json"))
    args = p.parse_args(argv)
    log_dir = args.out.resolve().parent / (args.out.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.baseline:
        tree = baseline_tree(args.baseline)
        try:
            rows.append(run_one(f"baseline {args.baseline}", tree, [], log_dir, args.zen1_proxy))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    rows.append(run_one("this checkout", ROOT, [], log_dir, args.zen1_proxy))
    for spec in args.variant:
        label, _, overrides = spec.partition("=")
        rows.append(run_one(label, ROOT, overrides.split(","), log_dir, args.zen1_proxy))
    limits = isa_limits({**os.environ, **(ZEN1_PROXY_ENV if args.zen1_proxy else {})})
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "isa_limits": limits, "rows": rows, "table": table(rows)}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{cpu_model()}, {os.cpu_count()} cores, ISA limits {limits or 'none'}\n\n{report['table']}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
