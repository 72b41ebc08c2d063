#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 (megatron-core 0.17+ requires it) and installs the pinned
# requirements plus this package (editable). Idempotent: a second run installs nothing new.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ ! -x .venv/bin/python ]]; then
  PY=""
  for candidate in "${PYTHON312:-}" python3.12 python3.13 \
      "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; do
    if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
      PY="$candidate"; break
    fi
  done
  if [[ -z "$PY" ]]; then
    echo "error: no Python >= 3.12 found (megatron-core 0.19.2 needs it). Install one, or set" \
         "PYTHON312=/path/to/python3.12" >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .
