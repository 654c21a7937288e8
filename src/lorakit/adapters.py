"""Adapter lifecycle on a model: add / set / disable / delete, merge / unmerge / unload.

All functions take the (injected) model itself; there is no wrapper class.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .config import LoraConfig
from .errors import AdapterNotFoundError, ConfigError
from .inject import (
    _ACTIVE_ATTR,
    _CONFIGS_ATTR,
    _FROZEN_ATTR,
    _set_module,
    get_configs,
    inject,
    lora_layers,
    set_active,
)
from .fusion import unfuse_mlps, unfuse_shared_inputs
from .layers import LoraLayer, ModulesToSaveWrapper

__all__ = [
    "add_adapter",
    "set_adapter",
    "active_adapters",
    "list_adapters",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "for_inference",
    "for_training",
]

_INFERENCE_ATTR = "_lorakit_inference_state"


def _require(model: nn.Module, names: list[str]) -> None:
    have = list(get_configs(model))
    if not have:
        raise AdapterNotFoundError("this model has no LoRA adapters; add one with lorakit.inject(model, config).")
    for name in names:
        if name not in have:
            raise AdapterNotFoundError(f"no adapter named {name!r} on this model; adapters: {', '.join(have)}.")


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> nn.Module:
    """Add adapter ``name`` to ``model`` (inactive if others exist). See :func:`lorakit.inject`."""
    return inject(model, config, adapter_name=name)


def set_adapter(model: nn.Module, name_or_names: str | list[str]) -> None:
    """Make the named adapter(s) active and trainable; the others stay but do nothing.

    Raises:
        AdapterNotFoundError: a name is not on the model.
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    _require(model, names)
    set_active(model, names)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(getattr(model, _ACTIVE_ATTR, []))


def list_adapters(model: nn.Module) -> list[str]:
    """Names of every adapter on the model, in the order they were added."""
    return list(get_configs(model))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (unmerging it first if merged).

    Raises:
        AdapterNotFoundError: the name is not on the model.
    """
    _require(model, [name])
    for _, layer in lora_layers(model):
        if name in layer.r:
            layer.delete_adapter(name)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.delete_adapter(name)
    configs = dict(get_configs(model))
    del configs[name]
    setattr(model, _CONFIGS_ATTR, configs)
    getattr(model, _FROZEN_ATTR, set()).discard(name)
    set_active(model, [a for a in active_adapters(model) if a != name])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes the base model's output.

    Merged adapters are unmerged for the duration and merged back after; the
    adapters come back on exit, also when the body raises.
    """
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            if merged[id(layer)]:
                layer.merge(merged[id(layer)])
        for w in wrappers:
            w.disabled = False


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights, in place.

    Args:
        model: an injected model.
        adapter_names: which adapters to merge; ``None`` means the active ones.
        safe: check the merged weights for NaN/Inf before writing them.

    Raises:
        AdapterNotFoundError: an unknown adapter name.
        LorakitError: with ``safe=True``, when a merge would write NaN/Inf.
    """
    names = active_adapters(model) if adapter_names is None else list(adapter_names)
    _require(model, names)
    for _, layer in lora_layers(model):
        layer.merge(names, safe=safe)


def unmerge(model: nn.Module) -> None:
    """Undo every merge: the base weights go back to their original values."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def _unwrap(model: nn.Module, merge_first: bool) -> nn.Module:
    unfuse_mlps(model)
    unfuse_shared_inputs(model)
    names = [name for name, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if isinstance(module, LoraLayer):
            if merge_first:
                pending = [a for a in module.active_adapters if a not in module.merged_adapters]
                module.merge(pending)
            else:
                module.unmerge()
            _set_module(model, name, module.base_layer)
        else:
            keep = module.current if merge_first else module.original_module
            _set_module(model, name, keep)
    for attr in (_CONFIGS_ATTR, _ACTIVE_ATTR, _FROZEN_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters and return the model with its original module classes.

    The result is a plain model (e.g. ``nn.Linear`` again, a transformers model
    that ``save_pretrained`` / ``from_pretrained`` handle as usual). Trained
    ``modules_to_save`` copies replace their originals.

    Raises:
        LorakitError: with ``safe=True``, when a merge would write NaN/Inf.
    """
    if safe:
        merge(model, [a for a in active_adapters(model)], safe=True)
    model = _unwrap(model, merge_first=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the base model, unchanged (merges undone)."""
    if not get_configs(model):
        raise ConfigError("this model has no LoRA adapters to unload.")
    return _unwrap(model, merge_first=False)


def for_inference(model: nn.Module, merge_adapter: bool = True) -> nn.Module:
    """Put an injected model in its fastest inference state, in place.

    With exactly one active adapter its update is merged into the base weights
    (the forward is then the plain model's, and each merged wrapper hands its calls
    straight to its base layer: :meth:`LoraLayer.shortcut_if_plain`); with several, the unmerged path
    runs them. Dropout is off (``eval()``) and no parameter requires grad.
    :func:`for_training` undoes all of it exactly: the original base weights are
    kept aside while merged (bit-exact restore, also for bf16 bases; costs one
    copy of the adapted weights), and every ``requires_grad`` flag and the
    train/eval mode come back as they were.

    Args:
        model: an injected model.
        merge_adapter: merge a single active adapter (default); False keeps the unmerged path.

    Returns:
        The model.
    """
    if getattr(model, _INFERENCE_ATTR, None) is not None:
        return model
    state = {
        "training": model.training,
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "backups": {},
    }
    active = active_adapters(model)
    if merge_adapter and len(active) == 1:
        for name, layer in lora_layers(model):
            if active[0] in layer.r and active[0] not in layer.merged_adapters:
                state["backups"][name] = layer.base_layer.weight.detach().clone()
                layer.merge(active)
    for _, layer in lora_layers(model):
        layer.shortcut_if_plain()  # merged layers: no wrapper code left in the call path
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, _INFERENCE_ATTR, state)
    return model


def for_training(model: nn.Module) -> nn.Module:
    """Undo :func:`for_inference`: base weights, ``requires_grad`` flags and mode as before.

    Returns:
        The model (unchanged if it was not in inference mode).
    """
    state = getattr(model, _INFERENCE_ATTR, None)
    if state is None:
        return model
    layers = dict(lora_layers(model))
    for name, weight in state["backups"].items():
        layer = layers[name]
        layer.base_layer.weight.data.copy_(weight)
        layer.merged_adapters = [a for a in layer.merged_adapters if a not in layer.active_adapters]
    for name, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"].get(name, p.requires_grad))
    model.train(state["training"])
    setattr(model, _INFERENCE_ATTR, None)
    return model
