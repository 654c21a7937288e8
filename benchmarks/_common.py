"""Shared bits of the benchmark scripts: machine description and RESULTS.md sections."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
MODEL_ENV = "LORAKIT_BENCH_MODEL"


def load_bench_model(device):
    """The benchmark model and tokenizer: the embedded default, or ``$LORAKIT_BENCH_MODEL``.

    ``$LORAKIT_BENCH_MODEL`` names a model directory. When it holds only a config and a
    tokenizer (no weights), the model is built from the config with random weights
    (seed 0): same shapes, same FLOPs, same speed. That is how the benchmarks run on a
    GPU machine that cannot receive the 94 MB default model.
    """
    from lorakit.models import load_model, load_tokenizer

    path = os.environ.get(MODEL_ENV)
    if not path or any(Path(path).glob("*.safetensors")):
        return load_model(path or None, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    return model.to(device).eval(), load_tokenizer(path)


def model_note() -> str:
    """Say where the benchmark's weights came from (for the results header)."""
    path = os.environ.get(MODEL_ENV)
    if path and not any(Path(path).glob("*.safetensors")):
        return "random weights (seed 0) with SmolLM2-135M-Instruct's config and tokenizer"
    return "SmolLM2-135M-Instruct weights"


def section(name: str, device: str) -> str:
    """RESULTS.md section name: the script's name, plus the device when it is not the CPU."""
    return name if device == "cpu" else f"{name} ({device})"


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> str:
    """One line: date, CPU model (family/model), the matmul-relevant CPU flags, threads, torch (and GPU if used).

    The flags decide what ``precision: auto`` picks (``avx512_bf16`` / ``amx_bf16``: bf16 matmuls are fast)
    and which int8 kernels exist, so every result header names them.
    """
    model, family, flags = platform.processor() or platform.machine(), "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1) if m else model
        fam, mod = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M), re.search(r"^model\s*:\s*(\d+)$", text, re.M)
        family = f", family {fam.group(1)} model {mod.group(1)}" if fam and mod else ""
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{datetime.date.today().isoformat()}, {model}{family} ({os.cpu_count()} cores; flags: "
        f"{', '.join(have) or 'none'}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load avg {load:.1f}{gpu}"
    )


def rss_kib(field: str = "VmHWM") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB (Linux).

    Not ``ru_maxrss``: Linux carries it over from the parent through fork and exec, so
    a worker started by a parent that held more than the worker ever does reads flat.
    ``VmHWM`` belongs to the process's own address space, which exec starts afresh.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def write_section(name: str, body: str) -> None:
    """Replace (or add) the ``## name`` section of RESULTS.md, keeping the others.

    A new section goes before the first ``## History`` section (results from earlier
    machines and commits, kept as they were).
    """
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    header = f"## {name}"
    parts = [p for p in re.split(r"(?m)^(?=## )", text) if p.strip()]
    new = f"{header}\n\n{body.strip()}\n\n"
    if any(p.splitlines()[0].rstrip() == header for p in parts):
        parts = [new if p.splitlines()[0].rstrip() == header else p for p in parts]
    else:
        at = next((i for i, p in enumerate(parts) if p.startswith("## History")), len(parts))
        parts.insert(at, new)
    parts = [p.rstrip() + "\n\n" for p in parts]
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text("".join(parts).rstrip() + "\n")
    os.replace(tmp, RESULTS)


def git_rev() -> str:
    """The short commit, plus a note when the measured code (src/, benchmarks/*.py) has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "benchmarks/*.py"], capture_output=True, text=True, cwd=root
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{rev} + uncommitted changes" if dirty else rev


def lorakit_train_env() -> dict[str, str]:
    """The environment ``lorakit train`` runs in here: jemalloc preloaded where :mod:`lorakit.allocator` finds it
    (the CLI starts itself again under it), else this process's own environment."""
    from lorakit.allocator import relaunch_plan

    plan = relaunch_plan(["train"], os.environ, "glibc")  # as from a fresh shell (this process is not preloaded)
    return plan[1] if plan else dict(os.environ)


def run_worker(script: str, args: list[str], label: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script --worker ARGS`` in a fresh process (its own VmHWM) and return the dict it printed.

    ``env`` is the worker's environment (None: this process's; :func:`lorakit_train_env` for a lorakit variant
    run as ``lorakit train`` runs). The worker prints one line ``RESULT <json>``; a worker that fails or prints
    none stops the benchmark with its output's tail.
    """
    out = subprocess.run(
        [sys.executable, script, "--worker", *args],
        capture_output=True,
        text=True,
        env={**(os.environ if env is None else env), "TQDM_DISABLE": "1"},
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        sys.exit(f"worker {label} failed")
    return json.loads(line[7:])
