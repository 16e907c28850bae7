#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh --out gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
