"""Where a training run computes: its processes, its device and its precision.

Under torchrun (``WORLD_SIZE`` > 1) each process reads ``RANK`` and ``LOCAL_RANK``,
trains on the device it is given, else ``cuda:LOCAL_RANK`` (the CPU without CUDA), and
joins the process group (NCCL on CUDA, gloo on CPU) unless one is already initialised.
Without torchrun the run is one process, rank 0. ``train.precision: auto`` picks bf16
only where the hardware does it fast (see :func:`resolve_precision`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lorakit.errors import ConfigError

__all__ = ["DistContext", "setup_distributed", "resolve_precision", "int8_note", "quantized_base_note"]

_CPUINFO = Path("/proc/cpuinfo")


@dataclass
class DistContext:
    """This process's place in a (possibly one-process) run.

    Attributes:
        rank: Global rank; 0 without torchrun.
        world: Number of processes.
        device: This process's training device.
        owns_group: Whether :func:`setup_distributed` created the process group (and the
            caller should destroy it).
    """

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints."""
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place across processes (a no-op in a one-process run); return it."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def setup_distributed(device: str | torch.device | None) -> DistContext:
    """Read torchrun's environment, choose the device, join the process group.

    Args:
        device: Training device; default ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.

    Returns:
        The :class:`DistContext` of this process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # plain "cuda": this process's GPU
            dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank, world, dev, owns)


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """Choose fp32, bf16 or int8 for ``train.precision``.

    ``auto`` picks bf16 on a CUDA GPU with bf16 support, and on a CPU whose
    ``/proc/cpuinfo`` flags include ``amx_bf16`` or ``avx512_bf16``; else fp32.
    It never picks int8 (the frozen base's matmuls in int8, :mod:`lorakit.int8`):
    that changes the numerics, so it is asked for by name.

    Args:
        requested: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"int8"``.
        device: The training device.

    Returns:
        ``(precision, reason)``.

    Raises:
        ConfigError: bf16 asked for on a GPU without bf16 support; int8 off the CPU or
            without int8 kernels (the message says what to use instead).
    """
    if requested == "fp32":
        return "fp32", "train.precision is fp32"
    if requested == "int8":
        from lorakit.int8 import INT8_ALTERNATIVE, require_int8

        if device.type != "cpu":
            raise ConfigError(
                f"train.precision: int8 runs the frozen base's matmuls on the CPU's int8 kernels; this run is on "
                f"{device.type}. Use {INT8_ALTERNATIVE}."
            )
        require_int8("train.precision: int8")
        return "int8", "train.precision is int8 (frozen base matmuls int8 x int8 -> int32, per-row activation scales)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        supported = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not supported:
            raise ConfigError(f"train.precision is bf16, but {name} has no bf16 support; set train.precision: fp32.")
        if requested == "bf16":
            return "bf16", "train.precision is bf16"
        return ("bf16", f"auto: {name} supports bf16") if supported else ("fp32", f"auto: {name} has no bf16")
    try:
        flags = set(_CPUINFO.read_text().split())
    except OSError:
        flags = None
    fast = flags is not None and ("amx_bf16" in flags or "avx512_bf16" in flags)
    if requested == "bf16":
        return "bf16", "train.precision is bf16" + ("" if fast else " (this CPU has no AMX/AVX512-BF16: slow)")
    if device.type != "cpu":
        return "fp32", f"auto: bf16 is chosen only on CUDA and on CPUs with AMX/AVX512-BF16, not on {device.type}"
    if flags is None:
        return "fp32", "auto: no /proc/cpuinfo to look for AMX/AVX512-BF16"
    if fast:
        which = "AMX (amx_bf16)" if "amx_bf16" in flags else "AVX512-BF16 (avx512_bf16)"
        return "bf16", f"auto: the CPU has {which}"
    return "fp32", "auto: the CPU has neither AMX nor AVX512-BF16 (no amx_bf16/avx512_bf16 flag)"


def int8_note(precision: str, device: torch.device) -> str:
    """What the run summary says about int8 on this CPU when the run is not int8 (measured, not guessed).

    Args:
        precision: The resolved precision (``"fp32"`` / ``"bf16"`` / ``"int8"``).
        device: The training device.

    Returns:
        ``"; train.precision: int8 would run the frozen base's matmuls in 0.31x the fp32 time here ..."``
        when int8 kernels exist here and measure at least 10% faster; else ``""``.
    """
    if device.type != "cpu" or precision not in ("fp32", "bf16"):
        return ""
    from lorakit.int8 import measured_speedup

    ratio = measured_speedup(torch.float32 if precision == "fp32" else torch.bfloat16)
    if not ratio < 0.9:  # also nan: no int8 kernels here
        return ""
    return (
        f"; train.precision: int8 would run the frozen base's matmuls in {ratio:.2f}x the {precision} time on "
        "this CPU (measured; other numerics, so auto does not pick it)"
    )


def quantized_base_note(precision: str, compute_dtype: str) -> str:
    """What a run on a 4-bit base computes in, for its start line, summary and model card.

    The policy (issue 12; measured in benchmarks/RESULTS.md, qlora): a 4-bit layer's
    matmul runs in its compute dtype and its output comes back in fp32 (the input's
    dtype, as bitsandbytes' ``Linear4bit`` returns it; under autocast fp32 also for
    o_proj's bf16 input), where the LoRA term is added (:func:`lorakit.branches.prepare`).
    Embeddings, norms, the residual stream and the LoRA masters stay fp32 (a 4-bit load
    keeps them so). With ``train.precision`` bf16 the rest of the forward (attention,
    the head) runs under bf16 autocast, as for PEFT + bitsandbytes under the Trainer's
    bf16. Summing in bf16 instead lost the small LoRA term to the rounding of the base
    output: +6.4% loss after 30 steps against fp32 LoRA, vs +4.5% this way.

    Args:
        precision: The resolved ``train.precision`` (``"fp32"``, ``"bf16"``).
        compute_dtype: The 4-bit layers' compute dtype name (``"fp32"``, ``"bf16"``, ``"fp16"``).

    Returns:
        ``", 4-bit outputs plus LoRA summed in fp32 ..."``, or ``""`` when everything is fp32.
    """
    if precision == "fp32" and compute_dtype == "fp32":
        return ""
    rest = "attention and head under bf16 autocast" if precision == "bf16" else "the rest in fp32"
    return (
        f", 4-bit matmuls in {compute_dtype} with outputs and LoRA terms summed in fp32 "
        f"(as PEFT + bitsandbytes; residual stream, norms, LoRA fp32), {rest}"
    )
