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
    kept = [p for p in parts if not p.startswith(header + "\n") and not p.startswith(header + " ")]
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
