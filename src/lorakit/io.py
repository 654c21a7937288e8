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
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, LoraConfig
from .errors import AdapterFormatError, ConfigError, ModelMismatchError
from .inject import _FROZEN_ATTR, get_configs, inject, lora_layers, set_requires_grad
from .layers import LoraLayer, ModulesToSaveWrapper

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter", "write_dir_atomic", "LORA_KEY"]

PREFIX = "base_model.model."
_BIN_NAME = "adapter_model.bin"
# Splits a saved tensor key into module path, kind and suffix.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<rest>(\.weight)?)$")


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (without the ``base_model.model.`` prefix).

    Raises:
        AdapterNotFoundError: the adapter is not on the model.
    """
    from .adapters import _require

    _require(model, [adapter_name])
    config = get_configs(model)[adapter_name]
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


def write_dir_atomic(final: Path, write: Callable[[Path], None], keep_extras: bool = False) -> Path:
    """Write a directory via ``write(tmp_dir)`` and move it into place by renames.

    On any error the temp dir is removed and ``final`` is untouched.

    Args:
        final: the directory to (re)place.
        write: fills the temporary directory it is given.
        keep_extras: ``final`` may hold other files (a run dir's checkpoints, metrics, a
            non-default adapter's subfolder): only the files ``write`` produced are replaced,
            each by one atomic rename, ``adapter_config.json`` last; nothing else in
            ``final`` is moved. Without it an existing ``final`` is swapped out whole.

    Returns:
        ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        if final.exists() and keep_extras:
            produced = sorted(p.name for p in tmp.iterdir())
            for name in sorted(produced, key=lambda n: n == CONFIG_NAME):  # the config is the "complete" marker
                os.replace(tmp / name, final / name)
            if WEIGHTS_NAME in produced:
                (final / _BIN_NAME).unlink(missing_ok=True)  # a stale pickle-era copy must not shadow the new weights
        elif final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Save one adapter in PEFT's format (atomically: a temp dir renamed into place).

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
    config = _config_for_save(model, get_configs(model)[adapter_name], adapter_name)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    final = Path(path) if adapter_name == "default" else Path(path) / adapter_name

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(tmp, base_model_name_or_path=base_name)

    write_dir_atomic(final, write, keep_extras=True)
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
    return config, {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}


def _check_modules_exist(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = {n for n, _ in model.named_modules()}
    for key in tensors:
        m = LORA_KEY.match(key)
        module = m.group("module") if m else key.rsplit(".", 1)[0].removesuffix(".base_layer")
        if module not in names:
            raise ModelMismatchError(
                f"{path}: the adapter has weights for module {module!r}, which {type(model).__name__} does not "
                f"have; load the adapter onto the base model it was trained on."
            )


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Inject an adapter as its saved config says and load its weights (PEFT's or ours).

    On a model without adapters the loaded one becomes active; otherwise it is
    added inactive (use :func:`lorakit.set_adapter`), as PEFT's ``load_adapter``.

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
    targets: dict[str, LoraLayer] = {}
    inject(model, config, adapter_name)
    try:
        for name, layer in lora_layers(model):
            if adapter_name in layer.r:
                targets[name] = layer
        _load_tensors(model, path, config, tensors, targets, adapter_name)
    except BaseException:
        from .adapters import delete_adapter

        delete_adapter(model, adapter_name)
        raise
    if not is_trainable:
        getattr(model, _FROZEN_ATTR).add(adapter_name)
    set_requires_grad(model)
    return model


def _load_tensors(model, path: Path, config: LoraConfig, tensors, targets: dict[str, LoraLayer], adapter_name: str):
    params = dict(model.named_parameters(remove_duplicate=False))
    seen = set()
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
            seen.add(module)
        elif key.endswith(".bias") or (key.endswith(".weight") and ".base_layer." in key):
            dest = key  # a trained bias, or a base embedding PEFT saved alongside
        else:
            owner, _, leaf = key.rpartition(".")
            wrapper = model.get_submodule(owner) if owner else None
            if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
                dest = f"{owner}.modules_to_save.{adapter_name}.{leaf}"
            else:
                dest = key
        if dest not in params:
            raise AdapterFormatError(
                f"{path}: config and weights disagree: {key!r} has no place in the model with this config "
                f"(expected LoRA, bias or modules_to_save weights)."
            )
        target = params[dest]
        if tuple(target.shape) != tuple(value.shape):
            raise ModelMismatchError(
                f"{path}: shape mismatch for {key!r}: the model expects {tuple(target.shape)}, the adapter has "
                f"{tuple(value.shape)}. Was it trained on another base model, or with another r / rank_pattern?"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
    missing = sorted(set(targets) - seen)
    if missing:
        raise AdapterFormatError(
            f"{path}: config and weights disagree: the config targets {len(missing)} module(s) with no weights in "
            f"{WEIGHTS_NAME}, e.g. {missing[0]!r}. The file is incomplete or belongs to another config."
        )
