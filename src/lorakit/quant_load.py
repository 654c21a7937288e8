"""Load a 4-bit base from local disk without mapping its weights file: one tensor in memory at a time.

transformers' own 4-bit load (``from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))``) quantizes one weight at a time, but reads the weights
through a memory map of the safetensors file, and every page it touches stays in
the process's resident set while the file is open: loading the default model
peaks at its whole fp32 file (0.49 GiB) next to a 0.16 GiB 4-bit base.

:func:`load_4bit` runs the same transformers loader (the skeleton on the ``meta``
device, the key mapping, bitsandbytes' quantizer, tied weights, non-persistent
buffers such as rotary ``inv_freq`` computed as usual), but on a state dict of
safetensors *slices* opened with the ``pread`` backend, the one transformers
itself uses where it cannot map files (Windows, MPS). transformers materializes
a slice only when it gets to that tensor and, when it quantizes on the fly,
one tensor at a time: each weight is read into memory of its own, quantized and
dropped, so besides the tensors the model keeps (embeddings, norms) at most one
full-precision tensor is alive, and the file is never mapped. Those reads are
heap allocations, which glibc keeps once freed; the load hands them back
(:func:`lorakit.memory.return_freed_memory`). The model is the one the mapped
path makes, bit for bit (tests/test_quant_load.py).

Directories without safetensors weights (``pytorch_model.bin``) and configs that
resolve to a model class other than a single causal LM class (remote code) load
through transformers' mapped path, after which
:func:`lorakit.quant_model.release_checkpoint` copies the kept tensors off the map.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .memory import return_freed_memory
from .quant import check_quantization, require_bitsandbytes, resolve_compute_dtype
from .quant_model import prepare_quantized

__all__ = ["load_4bit", "safetensors_files"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path] | None:
    """The safetensors weight files of a model directory, or None when it has none.

    Args:
        path: A Hugging Face-format model directory.

    Returns:
        The shards an index file (``model.safetensors.index.json``) names, or
        ``[model.safetensors]``; None for a directory holding neither.
    """
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a readable safetensors index ({e}); re-save the model.") from e
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / SINGLE_FILE
    return [single] if single.is_file() else None


def _model_class(config: Any) -> type | None:
    """The one causal-LM class transformers' auto class would build for ``config``, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls if isinstance(cls, type) else None  # a tuple: several classes share the config; let Auto choose


def _generation_config(path: Path) -> Any:
    """The generation config transformers' ``from_pretrained`` reads from ``path`` (its file, else config.json)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        return GenerationConfig.from_pretrained(
            path, config_file_name="config.json", _from_model_config=True, local_files_only=True
        )


def _load_streamed(path: Path, files: list[Path], bnb_config: Any, device: torch.device) -> Any | None:
    """transformers' 4-bit load over ``pread`` slices of ``files``; None where the config needs the auto class."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = _model_class(config)
    if cls is None:
        return None
    with contextlib.ExitStack() as stack:
        state_dict: dict[str, Any] = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu", backend="pread"))
            state_dict.update((key, handle.get_slice(key)) for key in handle.keys())  # read when transformers asks
        model = cls.from_pretrained(
            None,  # transformers takes either a path or a state dict; config and generation config come from `path`
            config=config,
            state_dict=state_dict,
            quantization_config=bnb_config,
            dtype=torch.float32,
            device_map={"": str(device)},
        )
        del state_dict
    model.config.name_or_path = str(path)  # what a load from the path records (adapters name their base by it)
    if model.can_generate():
        model.generation_config = _generation_config(path)
    return model


def _load_mapped(path: Path, bnb_config: Any, device: torch.device) -> Any:
    """transformers' own 4-bit load (the weights file memory-mapped while it runs)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config, dtype=torch.float32, device_map={"": str(device)}, local_files_only=True
    )


def load_4bit(
    path: Path,
    device: torch.device | str | None = None,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
) -> Any:
    """Load a model directory with its Linear layers quantized to 4 bits, in QLoRA's state.

    Quantized from fp32 (as :func:`lorakit.quantize` and the streaming merge do), one
    tensor at a time, streamed from the safetensors files where there are any (see
    the module docstring), then :func:`lorakit.quant_model.prepare_quantized`.

    Args:
        path: A Hugging Face-format model directory.
        device: Where the model goes (default CPU).
        quantization: ``"nf4"`` or ``"fp4"``.
        double_quant: Quantize the per-block scales too.
        compute_dtype: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype.

    Returns:
        The ``*ForCausalLM`` model, in eval mode.

    Raises:
        ModelLoadError: bitsandbytes missing; transformers fails to load the directory.
        ConfigError: unknown quantization or compute dtype.
    """
    from transformers import BitsAndBytesConfig

    q = check_quantization(quantization)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cd, _ = resolve_compute_dtype(compute_dtype, dev)
    require_bitsandbytes()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q, bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=cd
    )
    path = Path(path)
    files = safetensors_files(path)
    try:
        model = _load_streamed(path, files, bnb_config, dev) if files else None
        mapped = model is None
        if mapped:
            model = _load_mapped(path, bnb_config, dev)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any transformers failure is a load failure here
        raise ModelLoadError(
            f"could not load the model in {path} in 4 bits ({q}): {type(e).__name__}: {e}. Check that the "
            "directory holds a complete full-precision model saved with save_pretrained."
        ) from e
    prepare_quantized(model, cd, release=mapped)  # streamed tensors are the model's own already: no copies
    model.eval()
    return_freed_memory()  # the weights read and dropped were heap: give their pages back (glibc keeps them)
    return model
