"""Merge an adapter into its base model and save a plain transformers model directory.

The ``lorakit merge`` verb, as a library function::

    merge_to_dir("runs/quickstart", "out/merged")   # loads without lorakit

It takes what :func:`lorakit.runs.open_adapter` takes (a run directory written
by ``lorakit train``, or a plain lorakit / PEFT adapter directory) and builds on
it, so this module sits after :mod:`lorakit.runs` in the data flow.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapters import merge_and_unload
from .errors import ConfigError
from .files import write_dir_atomic
from .runs import open_adapter

__all__ = ["merge_to_dir"]

_MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
        raise ConfigError(
            f"{out} already exists and is not empty; choose a new output directory or overwrite it "
            "(--force / overwrite=True)."
        )
    lora_model, tokenizer, _ = open_adapter(run_or_adapter, model=model, dtype="fp32")
    merged = merge_and_unload(lora_model)
    merged = merged.to(_MERGE_DTYPES[dtype])

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(out, write)
    return out
