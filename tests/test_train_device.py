"""lorakit.train.device: the training precision chosen from the config and the CPU's flags."""

from __future__ import annotations

import torch

from lorakit.train import device as train_device
from lorakit.train.device import resolve_precision


def test_auto_precision_reads_cpu_flags(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(train_device, "_CPUINFO", info)
    info.write_text("flags\t: fpu sse avx2 avx512f\n")
    precision, why = resolve_precision("auto", cpu)
    assert precision == "fp32" and "neither AMX nor AVX512-BF16" in why
    info.write_text("flags\t: fpu avx512f avx512_bf16\n")
    assert resolve_precision("auto", cpu) == ("bf16", "auto: the CPU has AVX512-BF16 (avx512_bf16)")
    info.write_text("flags\t: fpu amx_bf16 amx_tile\n")
    assert resolve_precision("auto", cpu)[0] == "bf16"
    assert resolve_precision("fp32", cpu) == ("fp32", "train.precision is fp32")
    assert resolve_precision("bf16", cpu)[0] == "bf16"
    info.unlink()
    assert resolve_precision("auto", cpu)[0] == "fp32"
