"""Shared bits of the benchmark scripts: machine description and RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
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


def machine() -> str:
    """One line: date, CPU model, bf16/AMX flags, threads, torch version (and GPU if used)."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1) if m else model
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{datetime.date.today().isoformat()}, {model} ({os.cpu_count()} cores; flags: {', '.join(have) or 'none'}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {load:.1f}{gpu}")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``## name`` section of RESULTS.md, keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    header = f"## {name}"
    parts = re.split(r"(?m)^(?=## )", text)
    kept = [p for p in parts if p.splitlines()[0].rstrip() != header] if text.strip() else []
    kept = kept or ["# Benchmark results\n"]
    new = "".join(kept).rstrip() + f"\n\n{header}\n\n{body.strip()}\n"
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, RESULTS)


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"
