#!/usr/bin/env bash
# Set up .venv and run the whole pipeline on the embedded digits dataset (extra flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_USE_LEGACY_KERAS=1
exec .venv/bin/python local_runner.py "$@"
