#!/usr/bin/env bash
# Set up .venv with CPU torch and this package. Idempotent: when pyproject.toml has not
# changed since the last successful install, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP=.venv/.installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" && -x .venv/bin/dhte ]]; then
  exit 0
fi
echo "setting up .venv (one time; about a minute)" >&2
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
echo "$want" > "$STAMP"
