#!/usr/bin/env bash
# Quickstart "test": set up the venv if needed, then run the whole test suite (unit + integration).
# Extra args go to pytest (e.g. `-m "not integration"` for the fast unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
