"""The optimizer and its learning-rate schedule: AdamW; linear warmup, then constant, linear or cosine decay.

The loop wraps :func:`lr_factor` in a ``torch.optim.lr_scheduler.LambdaLR`` over AdamW,
stepped once per optimizer step; the scheduler's state (its step count) is saved in
each checkpoint, so a resumed run goes on with the same learning rates.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "make_optimizer"]


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate multiplier of (0-based) optimizer step ``step``.

    Warmup: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``. After it,
    with ``p = (step - warmup_steps) / max(1, total_steps - warmup_steps)``:
    constant ``1``, linear ``1 - p``, cosine ``(1 + cos(pi * p)) / 2``.

    Args:
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        step: Optimizer steps done before this one.
        total_steps: Steps of the run.
        warmup_steps: Linear warmup steps.

    Returns:
        The multiplier of ``train.lr``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's fused kernel on a CPU or CUDA device (as transformers'
    Trainer defaults to ``adamw_torch_fused``), the per-tensor loop elsewhere.

    Fused, one step is one kernel per parameter group instead of a dozen ops per parameter: on CUDA one
    launch instead of hundreds; on a CPU, for the default model's 420 LoRA tensors, ~5 ms a step
    against ~17 ms (same results to ~1e-8).
    """
    fused = device.type in ("cpu", "cuda") and all(
        p.device.type == device.type and p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)
