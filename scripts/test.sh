#!/usr/bin/env bash
# Set up .venv, lint, and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
# The report test renders HTML in Debian's headless Chromium: installed (where missing and
# possible) while the Python stack installs, since both mostly wait on downloads.
browser=""
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/tmp/chromium-install.log 2>&1 &
  browser=$!
fi
bash scripts/bootstrap.sh
if [ -n "$browser" ] && ! wait "$browser"; then
  echo "chromium could not be installed (/tmp/chromium-install.log): the browser part of the" \
    "report test will be skipped"
fi
export TF_USE_LEGACY_KERAS=1
.venv/bin/ruff check .
# pytest-xdist workers, one per core up to 2 (tests sharing the pipeline scenario stay on one):
# most tests use one core, and two workers take the suite from 22.5 to 13.4 minutes on a 2-core
# Intel machine (docs/benchmarks.md, Test suite). PYTEST_WORKERS=N sets N; 0 runs serially.
cores=$(nproc 2>/dev/null || echo 1)
workers=${PYTEST_WORKERS:-$((cores < 2 ? 0 : 2))}
parallel=()
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadgroup); fi
exec .venv/bin/python -m pytest -q --durations=15 "${parallel[@]}" "$@"
