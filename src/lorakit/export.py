"""What leaves lorakit from a run or adapter directory: a merged model, a per-module report.

The ``lorakit merge`` and ``lorakit inspect`` verbs, as library functions::

    merge_to_dir("runs/quickstart", "out/merged")   # plain transformers model dir
    inspect_adapter("runs/quickstart")              # per-module r, alpha, params, ||ΔW||

Both take what :func:`lorakit.runs.open_adapter` takes (a run directory written
by ``lorakit train``, or a plain lorakit / PEFT adapter directory) and build on
it, so this module sits after :mod:`lorakit.runs` in the data flow.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .adapters import merge_and_unload
from .errors import AdapterFormatError, ConfigError
from .inject import pattern_value
from .io import LORA_KEY, read_adapter, write_dir_atomic
from .runs import find_adapter_dir, natural_key, open_adapter

__all__ = ["merge_to_dir", "inspect_adapter"]

_MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- merge


def merge_to_dir(
    run_or_adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    model: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Fold an adapter into its base model and save a plain transformers model directory.

    The merge is done in float32 and cast to ``dtype`` afterwards. The directory
    (safetensors weights, config, generation config, tokenizer) loads with
    ``AutoModelForCausalLM.from_pretrained`` without lorakit. It is written into a
    temporary folder beside ``out_dir`` and renamed into place, so an interrupted
    merge leaves nothing half-written.

    Args:
        run_or_adapter: A run directory or an adapter directory.
        out_dir: Where the merged model goes.
        dtype: ``"fp32"`` or ``"bf16"`` weights.
        model: Base model override, as in :func:`lorakit.runs.open_adapter`.
        overwrite: Replace ``out_dir`` if it exists and is not empty.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: bad ``dtype``, or ``out_dir`` exists and is not empty (without ``overwrite``).
        AdapterFormatError, ModelLoadError, ModelMismatchError: as :func:`lorakit.runs.open_adapter`.
    """
    if dtype not in _MERGE_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported for merge; use one of {', '.join(_MERGE_DTYPES)}.")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the merged model needs a directory. Choose another path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose a new output directory or overwrite it "
                          "(--force / overwrite=True).")
    lora_model, tokenizer, _ = open_adapter(run_or_adapter, model=model, dtype="fp32")
    merged = merge_and_unload(lora_model)
    merged = merged.to(_MERGE_DTYPES[dtype])

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(out, write)
    return out


# --------------------------------------------------------------------------- inspect


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
            extra.append({"module": key, "kind": kind, "r": None, "alpha": None, "scaling": None,
                          "params": value.numel(), "norm": None})
    rows = []
    for module in sorted(pairs, key=natural_key):
        parts = pairs[module]
        embedding = "lora_embedding_A" in parts
        A, B = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else (
            parts.get("lora_A"), parts.get("lora_B"))
        if A is None or B is None:
            raise AdapterFormatError(f"{adapter_dir}: module {module!r} has only one of its two LoRA matrices; "
                                     "the adapter file is incomplete. Re-save it.")
        r = A.shape[0]
        alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        scaling = config.scaling_for(r, alpha)
        kind = "embedding" if embedding else ("conv" if A.dim() > 2 else "linear")
        rows.append({"module": module, "kind": kind, "r": r, "alpha": alpha, "scaling": scaling,
                     "params": A.numel() + B.numel(), "norm": _update_norm(A, B, scaling)})
    rows += sorted(extra, key=lambda row: natural_key(row["module"]))
    total_norm = math.sqrt(sum(row["norm"] ** 2 for row in rows if row["norm"] is not None))
    rows.append({"module": "total", "kind": "total", "r": None, "alpha": None, "scaling": None,
                 "params": sum(row["params"] for row in rows), "norm": total_norm})
    return rows
