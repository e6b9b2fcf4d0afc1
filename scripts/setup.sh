#!/usr/bin/env bash
# Creates .venv (if missing) and installs fxclip with its test and peer extras, torch pinned to the
# CPU build so that no CUDA wheels are pulled. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt torch 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[test,peers,data]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, fxclip; print('fxclip ready: torch', torch.__version__)"
