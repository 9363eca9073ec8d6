#!/usr/bin/env bash
# Set up .venv, lint, and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_USE_LEGACY_KERAS=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q --durations=15 "$@"
