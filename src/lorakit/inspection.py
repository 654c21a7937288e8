"""Inspect an adapter from its files alone: per-module rank, alpha, parameters, update norm.

The ``lorakit inspect`` verb, as a library function::

    inspect_adapter("runs/quickstart")   # per-module r, alpha, params, ||ΔW||; no base model loaded
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .errors import AdapterFormatError
from .inject import pattern_value
from .io import LORA_KEY, read_adapter
from .runs import find_adapter_dir, natural_key

__all__ = ["inspect_adapter"]


def _update_norm(A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    """``||scaling · B @ A||_F`` via r x r Gram matrices: ||BA||² = <BᵀB, AAᵀ> (no out x in product)."""
    A2 = A.reshape(A.shape[0], -1).double()  # (r, in·k)
    B2 = B.reshape(B.shape[0], -1).double()  # (out, r)
    squared = float((B2.T @ B2 * (A2 @ A2.T)).sum())  # (r, r) elementwise, summed = trace(BᵀB A Aᵀ)
    return abs(scaling) * math.sqrt(max(squared, 0.0))


def inspect_adapter(run_or_adapter: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per-module summary of an adapter, read from its files alone (no base model).

    Args:
        run_or_adapter: A run directory or an adapter directory.

    Returns:
        One row per adapted module, in name order (layer numbers numerically): ``module``, ``kind``
        (``"linear"``/``"conv"`` for ``lora_A``/``lora_B``, ``"embedding"``), ``r``,
        ``alpha``, ``scaling``, ``params`` and ``norm`` = ``||scaling · B·A||_F``
        (computed in float64); then one row per other saved tensor (``kind`` =
        ``"bias"`` or ``"modules_to_save"``; ``r``, ``alpha``, ``scaling``, ``norm``
        None); then a last row with ``module`` = ``"total"``, ``kind`` = ``"total"``
        and the summed ``params`` (``norm`` = the root of the summed squared norms).

    Raises:
        AdapterFormatError: missing / corrupt files, or an A without its B.
        ConfigError: an invalid ``adapter_config.json``.
    """
    adapter_dir, _ = find_adapter_dir(run_or_adapter)
    config, tensors = read_adapter(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    extra: list[dict[str, Any]] = []
    for key, value in tensors.items():
        m = LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("kind")] = value
        else:
            kind = "bias" if key.endswith(".bias") else "modules_to_save"
            extra.append(
                {
                    "module": key,
                    "kind": kind,
                    "r": None,
                    "alpha": None,
                    "scaling": None,
                    "params": value.numel(),
                    "norm": None,
                }
            )
    rows = []
    for module in sorted(pairs, key=natural_key):
        parts = pairs[module]
        embedding = "lora_embedding_A" in parts
        A, B = (
            (parts.get("lora_embedding_A"), parts.get("lora_embedding_B"))
            if embedding
            else (parts.get("lora_A"), parts.get("lora_B"))
        )
        if A is None or B is None:
            raise AdapterFormatError(
                f"{adapter_dir}: module {module!r} has only one of its two LoRA matrices; "
                "the adapter file is incomplete. Re-save it."
            )
        r = A.shape[0]
        alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        scaling = config.scaling_for(r, alpha)
        kind = "embedding" if embedding else ("conv" if A.dim() > 2 else "linear")
        rows.append(
            {
                "module": module,
                "kind": kind,
                "r": r,
                "alpha": alpha,
                "scaling": scaling,
                "params": A.numel() + B.numel(),
                "norm": _update_norm(A, B, scaling),
            }
        )
    rows += sorted(extra, key=lambda row: natural_key(row["module"]))
    total_norm = math.sqrt(sum(row["norm"] ** 2 for row in rows if row["norm"] is not None))
    rows.append(
        {
            "module": "total",
            "kind": "total",
            "r": None,
            "alpha": None,
            "scaling": None,
            "params": sum(row["params"] for row in rows),
            "norm": total_norm,
        }
    )
    return rows
