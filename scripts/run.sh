#!/usr/bin/env bash
# Quickstart "run": set up the venv if needed, then train the embedded default ELF (local Ray,
# local MLflow, a small ELF on the bundled corpus, offline). Extra args go to pipelines/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python pipelines/train.py "$@"
