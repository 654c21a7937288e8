"""Open a run or adapter directory: the base model with the adapter on it, and the run's metrics.

The ``generate``, ``chat`` and ``eval`` verbs start here, then call
:mod:`lorakit.generation` or :mod:`lorakit.evaluation`; ``merge`` and ``inspect``
(:mod:`lorakit.merging`, :mod:`lorakit.inspection`) find the adapter here too::

    model, tokenizer, info = open_adapter("runs/quickstart", dtype="bf16")
    last_metrics("runs/quickstart")   # {"step": ..., "loss": ..., "eval_loss": ...}

A *run directory* (written by ``lorakit train``) holds the adapter at its root
(``adapter_config.json`` + ``adapter_model.safetensors``) plus ``lorakit.yaml``
(the resolved run config), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/``.
A plain *adapter directory* (lorakit's or PEFT's) holds only the adapter files.
Both are accepted wherever ``run_or_adapter`` appears.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from . import models
from .config import CONFIG_NAME, WEIGHTS_NAME, LoraConfig
from .errors import AdapterFormatError, ConfigError, ModelMismatchError
from .io import load_adapter, read_adapter, touches_output_head

__all__ = [
    "RUN_CONFIG_NAME",
    "METRICS_NAME",
    "AdapterInfo",
    "find_adapter_dir",
    "choose_base_model",
    "natural_key",
    "open_adapter",
    "last_metrics",
]

RUN_CONFIG_NAME = "lorakit.yaml"
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class AdapterInfo:
    """Where an opened adapter came from.

    Attributes:
        adapter_dir: The folder holding ``adapter_config.json``.
        run_dir: The run directory, or None for a plain adapter directory.
        model: The base model as named (None = the embedded default).
        model_source: Which rule chose it: ``"argument"``, ``"lorakit.yaml"``,
            ``"adapter_config.json"`` or ``"default"``.
        config: The adapter's LoRA config.
        spec: The base model as loaded (name and 4-bit settings).
    """

    adapter_dir: Path
    run_dir: Path | None
    model: str | None
    model_source: str
    config: LoraConfig
    spec: models.ModelSpec | None = None


# --------------------------------------------------------------------------- open


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key for dotted names that puts ``layers.2`` before ``layers.10``.

    Args:
        name: A dotted name such as a module path.

    Returns:
        One ``(0, number)`` or ``(1, text)`` item per dot-separated part.
    """
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def find_adapter_dir(run_or_adapter: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """Check that a path holds an adapter and say whether it is a run directory.

    Args:
        run_or_adapter: A run directory or an adapter directory.

    Returns:
        ``(adapter_dir, run_dir)``: the folder holding ``adapter_config.json``, and
        the same folder when it holds ``lorakit.yaml`` (else None).

    Raises:
        AdapterFormatError: the path is missing, is a file, or holds no
            ``adapter_config.json`` (for an unfinished run, naming its latest checkpoint).
    """
    path = Path(run_or_adapter).expanduser()
    if not path.exists():
        raise AdapterFormatError(
            f"{path} does not exist; pass a run directory written by `lorakit train` or an adapter "
            f"directory holding {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    if not path.is_dir():
        raise AdapterFormatError(
            f"{path} is a file; pass the folder that holds {CONFIG_NAME} (a run or adapter directory)."
        )
    run_dir = path if (path / RUN_CONFIG_NAME).is_file() else None
    if not (path / CONFIG_NAME).is_file():
        checkpoints = (
            sorted(
                (path / "checkpoints").glob("*/" + CONFIG_NAME),
                key=lambda p: natural_key(p.parent.name.replace("-", ".")),
            )
            if run_dir
            else []
        )
        hint = (
            f" Training may not have finished; pass a checkpoint such as {checkpoints[-1].parent}."
            if checkpoints
            else ""
        )
        kind = "run directory" if run_dir else "directory"
        raise AdapterFormatError(
            f"{kind} {path} holds no {CONFIG_NAME}, so it is not an adapter.{hint} Pass a run directory "
            f"written by `lorakit train` or an adapter directory saved by lorakit.save_adapter / PEFT."
        )
    return path, run_dir


def _run_model(run_dir: Path) -> tuple[bool, models.ModelSpec]:
    """(whether lorakit.yaml has a ``model`` key, its value as a spec: name None = the default), paths resolved."""
    file = run_dir / RUN_CONFIG_NAME
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{file} is not readable YAML ({e}); re-run training or fix the file.") from None
    if not isinstance(data, dict) or "model" not in data:
        return False, models.ModelSpec()
    spec = models.ModelSpec.parse(data["model"])  # a name, or {name, quantization, double_quant, compute_dtype}
    if spec.name is None:
        return True, spec
    candidate = Path(spec.name).expanduser()
    if not candidate.is_absolute() and (run_dir / candidate).exists():
        return True, dataclasses.replace(spec, name=str(run_dir / candidate))
    return True, spec


def _resolves_locally(name: str) -> bool:
    path = Path(name).expanduser()
    return (
        name.strip().lower() == models.DEFAULT_MODEL
        or (path.is_dir() and (path / "config.json").is_file())
        or (path.is_file() and path.suffix.lower() == ".gguf")
    )


def _choose_spec(model: Any, adapter_dir: Path, run_dir: Path | None) -> tuple[models.ModelSpec, str]:
    trained = _run_model(run_dir)[1] if run_dir is not None else None  # what the run trained on
    if model is not None:
        if isinstance(model, (str, os.PathLike)):  # a name: the run's 4-bit settings (if any) stay
            spec = models.ModelSpec(str(model)) if trained is None else dataclasses.replace(trained, name=str(model))
        else:
            spec = models.ModelSpec.parse(model)
        return spec, "argument"
    if trained is not None and _run_model(run_dir)[0]:
        return trained, RUN_CONFIG_NAME
    try:
        base = json.loads((adapter_dir / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None  # read_adapter reports a broken config with a better message
    if isinstance(base, str) and base and _resolves_locally(base):
        return models.ModelSpec(base), CONFIG_NAME
    return models.ModelSpec(), "default"


def _choose_model(model: Any, adapter_dir: Path, run_dir: Path | None) -> tuple[str | None, str]:
    """(base model name, which rule chose it): :func:`_choose_spec` without the 4-bit settings."""
    spec, source = _choose_spec(model, adapter_dir, run_dir)
    return spec.name, source


def choose_base_model(run_or_adapter: str | os.PathLike[str], model: Any = None) -> tuple[models.ModelSpec, str]:
    """The base model :func:`open_adapter` would load, without loading it.

    Args:
        run_or_adapter: A run directory or an adapter directory.
        model: An override, as :func:`open_adapter` takes it.

    Returns:
        ``(spec, source)``: the model spec (name, and the run's 4-bit settings) and which rule chose it.

    Raises:
        AdapterFormatError: the path holds no adapter.
        ConfigError: ``lorakit.yaml`` is invalid.
    """
    adapter_dir, run_dir = find_adapter_dir(run_or_adapter)
    return _choose_spec(model, adapter_dir, run_dir)


def open_adapter(
    run_or_adapter: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | models.ModelSpec | dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> tuple[Any, Any, AdapterInfo]:
    """Load a base model with an adapter on it, ready for inference.

    The base model is, in order: ``model`` if given; else ``lorakit.yaml``'s
    ``model`` for a run directory; else the adapter's ``base_model_name_or_path``
    if it names something on local disk (a model directory, a ``.gguf`` file or
    the default model's name; never the hub); else the embedded default. A run
    trained on a 4-bit base (``model: {name, quantization: nf4, ...}``) is opened on
    the same 4-bit base; a different precision is allowed, with a note (a warning from
    :func:`lorakit.io.load_adapter`).

    Args:
        run_or_adapter: A run directory or an adapter directory (lorakit's or PEFT's).
        model: Base model override: a name (anything :func:`lorakit.models.resolve_model` takes;
            a run's 4-bit settings stay), or a mapping / :class:`lorakit.models.ModelSpec` (used as is).
        dtype: Weight dtype for the base model (``"fp32"``, ``"bf16"``, ``"fp16"``, a
            ``torch.dtype``); None or ``"auto"`` keeps the dtype the weights are stored in.
            The adapter's own weights stay float32.
        device: Where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...); None = the CPU.
        quantize: ``"int8"``: the base's Linear layers become int8 with both matmuls in int8
            (:mod:`lorakit.int8`, CPU), the output head int8 weights with fp32 activations
            (:mod:`lorakit.int8_head`; not where the adapter adapts or replaces it), the adapter
            unmerged in fp32 on top;
            ``"nf4"`` / ``"fp4"``: the base loaded in 4 bits (:mod:`lorakit.quant`);
            None / ``"none"``: as loaded (a run trained on a 4-bit base reopens on it).

    Returns:
        ``(model, tokenizer, info)``: the model in eval mode with the adapter
        active, its tokenizer, and an :class:`AdapterInfo`.

    Raises:
        AdapterFormatError: the path is missing or holds no complete adapter.
        ModelLoadError: the base model cannot be found or loaded, ``dtype`` is unknown,
            or the model cannot be moved to ``device``.
        ModelMismatchError: the adapter does not fit the chosen base model.
        ConfigError: ``lorakit.yaml`` or ``adapter_config.json`` is invalid.
    """
    adapter_dir, run_dir = find_adapter_dir(run_or_adapter)
    config, saved = read_adapter(adapter_dir)  # format errors before a slow model load
    keys = list(saved)
    del saved
    spec, source = _choose_spec(model, adapter_dir, run_dir)
    name = spec.name
    if quantize is not None and str(quantize).lower() in ("nf4", "fp4"):  # a 4-bit base asked for by name
        spec = dataclasses.replace(spec, quantization=str(quantize).lower())
        quantize = None
    base, tokenizer = models.load_model(name, dtype=dtype, device=device, **spec.load_kwargs())
    if quantize is not None and str(quantize).lower() != "none":  # before the adapter: LoRA wraps int8 layers
        from .int8_model import quantize_for_inference

        # SmoothQuant calibrated on the built-in text; the head int8 too unless the adapter adapts or replaces it
        quantize_for_inference(base, quantize, tokenizer, head=not touches_output_head(base, keys))
    try:
        load_adapter(base, adapter_dir)
    except ModelMismatchError as e:
        chosen = name or models.DEFAULT_MODEL
        raise ModelMismatchError(
            f"{e} (base model {chosen!r}, chosen from {source}; pass --model / model= to use another)"
        ) from None
    base.eval()
    return base, tokenizer, AdapterInfo(adapter_dir, run_dir, name, source, config, spec)


def last_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The latest value of every key in a run's ``metrics.jsonl``.

    Later records win key by key, so the result holds the last train loss and the
    last eval loss even when they were logged on different steps. Unreadable lines
    (e.g. a line being written while training runs) are skipped.

    Args:
        run_dir: A run directory (or any folder; then None).

    Returns:
        The merged record, or None when there is no ``metrics.jsonl`` or it holds no record.
    """
    file = Path(run_dir) / METRICS_NAME
    if not file.is_file():
        return None
    merged: dict[str, Any] = {}
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            merged.update(record)
    return merged or None
