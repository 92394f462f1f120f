#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs mer_jax with its test extra.
# Finds a 3.12+ interpreter by itself: $PYTHON, python3.13/python3.12 on PATH, or pyenv.
set -euo pipefail
cd "$(dirname "$0")"

is_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

find_python() {
  local candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  candidates+=(python3.13 python3.12 python3)
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && is_ok "$(command -v "$c")"; then
      command -v "$c"; return 0
    fi
  done
  for root in "${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv; do
    for p in "$root"/versions/3.1[2-9]*/bin/python3; do
      if [ -x "$p" ] && is_ok "$p"; then echo "$p"; return 0; fi
    done
  done
  return 1
}

PY=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
echo "setup.sh: using $PY ($("$PY" --version))"
[ -x .venv/bin/python ] && is_ok .venv/bin/python || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "setup.sh: ready (.venv)"
