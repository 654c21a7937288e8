"""Save and load adapters in PEFT's on-disk format.

An adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in),
``...lora_B.weight`` (out, r), ``...lora_embedding_A`` / ``...lora_embedding_B``
for embeddings, plus biases and ``modules_to_save`` weights where the config
asks for them. The adapter name is not part of the keys; a non-default adapter
is saved in a subfolder named after it, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import adapter_config, freeze_adapter, get_configs, inject, restore_on_error
from .config import CONFIG_NAME, WEIGHTS_NAME, LoraConfig
from .errors import AdapterFormatError, ConfigError, ModelMismatchError
from .files import write_dir_atomic
from .inject import lora_layers
from .int8_head import Int8Head
from .layers import LoraLayer, ModulesToSaveWrapper
from .quant_model import quantization_info

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter", "touches_output_head", "LORA_KEY"]

PREFIX = "base_model.model."
_BIN_NAME = "adapter_model.bin"
_BASE_KEY = "lorakit_base_quantization"  # safetensors metadata: nf4 / fp4 / none (the base's storage in training)
# Splits a saved tensor key into module path, kind and suffix.
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<rest>(\.weight)?)$"
)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (without the ``base_model.model.`` prefix).

    Raises:
        AdapterNotFoundError: the adapter is not on the model.
    """
    config = adapter_config(model, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        if hasattr(layer, "lora_A"):
            out[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        else:
            out[f"{name}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name]
            out[f"{name}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
        if config.bias == "lora_only" and layer.bias is not None:
            out[f"{name}.base_layer.bias"] = layer.bias
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora_" not in pname and ".modules_to_save." not in pname:
                out[pname] = p
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter_name].named_parameters():
                out[f"{name}.{pname}"] = p
    return {k: v.detach() for k, v in out.items()}


def _config_for_save(model: nn.Module, config: LoraConfig, adapter_name: str) -> LoraConfig:
    """The config as saved: 'all-linear' expanded to module names."""
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        wrapped = [n for n, layer in lora_layers(model) if adapter_name in layer.r]
        short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
        covered = [n for n, _ in model.named_modules() if n and any(n == s or n.endswith(f".{s}") for s in short)]
        covered = [n for n in covered if not any(n.startswith(w + ".") for w in wrapped)]
        targets = short if sorted(covered) == sorted(wrapped) else sorted(wrapped)
    return dataclasses.replace(config, target_modules=targets)


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Save one adapter in PEFT's format, atomically (:func:`lorakit.files.write_dir_atomic`).

    Args:
        model: an injected model.
        path: the adapter directory. A non-default adapter goes into ``path/<adapter_name>``, as PEFT does.
        adapter_name: which adapter to save.

    Returns:
        The directory written.

    Raises:
        AdapterNotFoundError: the adapter is not on the model.
    """
    tensors = {PREFIX + k: v.contiguous().clone().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    config = _config_for_save(model, adapter_config(model, adapter_name), adapter_name)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    final = Path(path) if adapter_name == "default" else Path(path) / adapter_name
    info = quantization_info(model)  # the base it was trained on: 4-bit or not (a note when loaded on the other)
    quantized = info["quantization"] if info else "none"

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", _BASE_KEY: quantized})
        config.save(tmp, base_model_name_or_path=base_name)

    # Only the adapter files are replaced (a run dir keeps its checkpoints), the config last: it marks "complete".
    write_dir_atomic(final, write, existing="update", last=CONFIG_NAME)
    (final / _BIN_NAME).unlink(missing_ok=True)  # a stale pickle-era copy must not shadow the new weights
    return final


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory: its config and tensors (prefix stripped), checked for format.

    Refuses pickle: ``adapter_model.bin`` is read only with ``torch.load(weights_only=True)``.

    Raises:
        AdapterFormatError: missing, truncated or corrupt files.
        ConfigError: invalid config values.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"adapter directory {path} does not exist; pass the folder that holds {CONFIG_NAME}.")
    config = LoraConfig.load(path)
    st, binary = path / WEIGHTS_NAME, path / _BIN_NAME
    if st.is_file():
        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFormatError(
                f"{st} is truncated or corrupt ({exc}); re-save or re-download the adapter."
            ) from None
    elif binary.is_file():
        try:
            tensors = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise AdapterFormatError(
                f"{binary} could not be read safely ({type(exc).__name__}): it holds more than plain tensors, and "
                f"lorakit never unpickles code (torch.load with weights_only=True). Convert it to {WEIGHTS_NAME} "
                f"where you trust the file."
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterFormatError(f"{binary} does not hold a mapping of tensor names to tensors.")
    else:
        raise AdapterFormatError(
            f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter was not saved completely. Re-save it."
        )
    if not tensors:
        raise AdapterFormatError(f"{path}: the weights file holds no tensors.")
    return config, {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}


def _check_modules_exist(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every saved key must name a module of this base; the error lists every key that does not."""
    names = {n for n, _ in model.named_modules()}
    unmatched: list[tuple[str, str]] = []  # (saved key, the module it names)
    for key in tensors:
        m = LORA_KEY.match(key)
        module = m.group("module") if m else key.rsplit(".", 1)[0].removesuffix(".base_layer")
        if module not in names:
            unmatched.append((key, module))
    if unmatched:
        keys = [k for k, _ in unmatched]
        shown = ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ModelMismatchError(
            f"{path}: the adapter has weights for module {unmatched[0][1]!r}, which {type(model).__name__} does not "
            f"have; {len(keys)} of its {len(tensors)} tensors match no module of this model: {shown}. Load the "
            f"adapter onto the base model it was trained on (other module names or another key prefix mean "
            f"another model)."
        )


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Inject an adapter as its saved config says and load its weights (PEFT's or ours).

    On a model without adapters the loaded one becomes active; otherwise it is
    added inactive (use :func:`lorakit.set_adapter`), as PEFT's ``load_adapter``.
    When loading fails, the model is left exactly as it was: same modules, same
    parameter values (also base biases the adapter trains) and flags, same adapters.

    Args:
        model: the base model (or a model that already has other adapters).
        path: the adapter directory.
        adapter_name: the name to give the adapter on the model.
        is_trainable: keep its weights trainable (to continue training); else frozen.

    Returns:
        The model, modified in place.

    Raises:
        AdapterFormatError: missing / corrupt files, or config and weights that disagree.
        ModelMismatchError: weights for modules the model lacks, or with wrong shapes.
        ConfigError: invalid config, or the adapter name is taken.
    """
    path = Path(path)
    config, tensors = read_adapter(path)
    if adapter_name in get_configs(model):
        raise ConfigError(f"adapter {adapter_name!r} already exists on this model; load it under another name.")
    _check_modules_exist(model, path, tensors)
    get_head = getattr(model, "get_output_embeddings", None)
    if isinstance(get_head() if callable(get_head) else None, Int8Head) and touches_output_head(model, list(tensors)):
        raise ConfigError(
            f"the adapter in {path} adapts or replaces the output head (or the input embedding tied to it), "
            "but this model's head has int8 weights (--quantize int8); load the base without --quantize int8 "
            "to use this adapter."
        )
    _note_base(model, path)
    with restore_on_error(model):
        inject(model, config, adapter_name)
        targets = {name: layer for name, layer in lora_layers(model) if adapter_name in layer.r}
        _copy_into(_plan_copies(model, path, tensors, targets, adapter_name))
        if not is_trainable:
            freeze_adapter(model, adapter_name)
    return model


def touches_output_head(model: nn.Module, keys: list[str]) -> bool:
    """Whether adapter tensors (keys as :func:`read_adapter` gives them) adapt or replace the model's output head,
    or an input embedding tied to it (``modules_to_save`` of either, LoRA on either)."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return False
    emb = get_in() if callable(get_in) else None
    tied = emb is not None and getattr(emb, "weight", None) is getattr(head, "weight", None)
    names = [n for n, m in model.named_modules() if m is head or (tied and m is emb)]
    return any(k.startswith(f"{n}.") for k in keys for n in names)


def _note_base(model: nn.Module, path: Path) -> None:
    """Warn (a note, not an error) when a lorakit adapter trained on a 4-bit base is loaded on a full one, or back."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            trained = (f.metadata() or {}).get(_BASE_KEY)
    except (SafetensorError, OSError):
        return
    if trained is None:  # saved by PEFT or an older lorakit: not recorded
        return
    info = quantization_info(model)
    if (trained != "none") == (info is not None):
        return
    how = (
        f"on a 4-bit base ({trained}), now loaded on a full-precision one"
        if trained != "none"
        else f"on a full-precision base, now loaded on a 4-bit one ({info['quantization']})"
    )
    warnings.warn(
        f"note: the adapter in {path} was trained {how}; outputs differ by the quantization error.", stacklevel=3
    )


def _copy_into(copies: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
    """Copy each value into its parameter; if one copy fails, put the model's own parameters back first.

    The new adapter's parameters need no backup (a failed load removes them); the
    others (base biases, base embedding weights) are cloned before they are written.
    """
    backups = []
    try:
        with torch.no_grad():
            for target, value, owned in copies:
                if not owned:
                    backups.append((target, target.detach().clone()))
                target.copy_(value)
    except BaseException:
        with torch.no_grad():
            for target, old in backups:
                target.copy_(old)
        raise


def _plan_copies(
    model: nn.Module, path: Path, tensors: dict[str, torch.Tensor], targets: dict[str, LoraLayer], adapter_name: str
) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Check every tensor against the model before anything is written.

    Returns:
        ``(parameter, value, owned)`` triples; ``owned``: the parameter belongs to the new adapter.

    Raises:
        AdapterFormatError: config and weights disagree (a tensor has no place, or a target has no weights).
        ModelMismatchError: a tensor's shape differs from its parameter's.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    copies = []
    seen = set()
    wrong: list[tuple[str, tuple, tuple]] = []  # (key, the model's shape, the adapter's)
    for key, value in tensors.items():
        m = LORA_KEY.match(key)
        if m:
            module = m.group("module")
            if module not in targets:
                raise AdapterFormatError(
                    f"{path}: config and weights disagree: {WEIGHTS_NAME} has {key!r}, but the config's "
                    f"target_modules do not select {module!r}. The adapter files do not belong together."
                )
            kind = m.group("kind")
            dest = f"{module}.{kind}.{adapter_name}" + (".weight" if kind in ("lora_A", "lora_B") else "")
            owned = True
            seen.add(module)
        else:  # a modules_to_save copy's tensor (its bias too), a trained bias, a base embedding PEFT saved
            owner, _, leaf = key.rpartition(".")
            owner = owner.removesuffix(".base_layer")  # saved from a wrapped or a plain module: either fits
            holder = model.get_submodule(owner)
            owned = isinstance(holder, ModulesToSaveWrapper) and adapter_name in holder.modules_to_save
            if owned:
                dest = f"{owner}.modules_to_save.{adapter_name}.{leaf}"
            elif isinstance(holder, LoraLayer):
                dest = f"{owner}.base_layer.{leaf}"
            else:
                dest = f"{owner}.{leaf}" if owner else leaf
        if dest not in params:
            raise AdapterFormatError(
                f"{path}: config and weights disagree: {key!r} has no place in the model with this config "
                f"(expected LoRA, bias or modules_to_save weights)."
            )
        target = params[dest]
        if tuple(target.shape) != tuple(value.shape):
            wrong.append((key, tuple(target.shape), tuple(value.shape)))
            continue
        copies.append((target, value.to(target.dtype), owned))
    if wrong:
        (key, expected, got), more = wrong[0], [k for k, _, _ in wrong[1:]]
        raise ModelMismatchError(
            f"{path}: shape mismatch for {key!r}: the model expects {expected}, the adapter has {got}"
            + (f"; {len(more)} more tensor(s) do not fit either: {', '.join(map(repr, more[:8]))}" if more else "")
            + ". Was it trained on another base model, or with another r / rank_pattern?"
        )
    missing = sorted(set(targets) - seen)
    if missing:
        raise AdapterFormatError(
            f"{path}: config and weights disagree: the config targets {len(missing)} module(s) with no weights in "
            f"{WEIGHTS_NAME}, e.g. {missing[0]!r}. The file is incomplete or belongs to another config."
        )
    return copies
