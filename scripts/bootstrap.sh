#!/usr/bin/env bash
# Creates .venv with Python 3.10 (pyenv reads .python-version) and installs the pinned stack.
# Idempotent: reinstalls only when requirements.txt or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for candidate in "${PYTHON:-}" python3.10 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.10 not found (install it, e.g. 'pyenv install 3.10.13', or set PYTHON=...)" >&2
  return 1
}

if [ ! -x .venv/bin/python ] ||
   ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
  py=$(pick_python)
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=.venv/.installed-$(cat requirements.txt constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "Installing the pinned TFX 1.16 stack into .venv (about 5 minutes and 3.3 GB the first time)..."
  .venv/bin/python -m pip install --quiet --upgrade pip 'setuptools<70' wheel
  .venv/bin/python -m pip install --quiet -r requirements.txt -c constraints.txt
  rm -f .venv/.installed-*
  touch "$stamp"
fi
