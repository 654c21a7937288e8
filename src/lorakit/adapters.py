"""Adapter bookkeeping and lifecycle: inject / add / set / disable / delete, merge / unmerge / unload.

All functions take the (injected) model itself; there is no wrapper class. The
bookkeeping (which adapters a model has, their configs, which are active, which
are loaded for inference only) lives in attributes of the model that only this
module reads and writes; :mod:`lorakit.inject` does the module surgery.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from . import few_rows
from .config import LoraConfig
from .errors import AdapterNotFoundError, ConfigError
from .fusion import unfuse_mlps, unfuse_shared_inputs
from .inject import add_lora, lora_layers, remove_lora, route_adapters, set_module, set_requires_grad
from .layers import LoraLayer, ModulesToSaveWrapper
from .norms import unroute_rms_norms

__all__ = [
    "inject",
    "get_configs",
    "adapter_config",
    "freeze_adapter",
    "restore_on_error",
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

_CONFIGS_ATTR = "lorakit_configs"  # model attribute: {adapter_name: LoraConfig}, in the order added
_ACTIVE_ATTR = "lorakit_active"  # model attribute: list of active adapter names
_FROZEN_ATTR = "lorakit_frozen"  # model attribute: set of adapters loaded for inference only
_BOOKKEEPING = (_CONFIGS_ATTR, _ACTIVE_ATTR, _FROZEN_ATTR)
_INFERENCE_ATTR = "_lorakit_inference_state"


def get_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters on ``model`` and their configs, in the order added (empty if none)."""
    return dict(getattr(model, _CONFIGS_ATTR, {}))


def adapter_config(model: nn.Module, name: str) -> LoraConfig:
    """The config adapter ``name`` was added with.

    Raises:
        AdapterNotFoundError: the adapter is not on the model.
    """
    _require(model, [name])
    return get_configs(model)[name]


def _require(model: nn.Module, names: list[str]) -> None:
    have = list(get_configs(model))
    if not have:
        raise AdapterNotFoundError("this model has no LoRA adapters; add one with lorakit.inject(model, config).")
    for name in names:
        if name not in have:
            raise AdapterNotFoundError(f"no adapter named {name!r} on this model; adapters: {', '.join(have)}.")


def _set_active(model: nn.Module, names: list[str]) -> None:
    """Record ``names`` as the active adapters, route every layer to them and set requires_grad to match."""
    setattr(model, _ACTIVE_ATTR, list(names))
    route_adapters(model, names)
    _update_requires_grad(model)


def _update_requires_grad(model: nn.Module) -> None:
    """Trainable = the active adapters that are not frozen (see :func:`lorakit.inject.set_requires_grad`)."""
    frozen = getattr(model, _FROZEN_ATTR, set())
    set_requires_grad(model, [n for n in active_adapters(model) if n not in frozen], get_configs(model))


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to ``model`` in place and return the model.

    On a model without adapters this wraps the targeted modules, freezes every
    base parameter and makes the new adapter the active, trainable one. On a
    model that already has adapters the new one is added inactive (as PEFT's
    ``add_adapter``); switch to it with :func:`lorakit.set_adapter`. When it
    fails, the model is left as it was.

    Args:
        model: any ``nn.Module`` (a transformers model or your own).
        config: what to adapt and how.
        adapter_name: name of the new adapter.

    Returns:
        The same model object, modified in place.

    Raises:
        ConfigError: the name is taken or the config is unusable.
        TargetNotFoundError: a target matches no module.
        UnsupportedModuleError: a matched module is of an unsupported kind.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}.")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ConfigError(f"adapter_name={adapter_name!r} must be a non-empty string without dots.")
    configs = get_configs(model)
    if adapter_name in configs:
        raise ConfigError(
            f"adapter {adapter_name!r} already exists on this model; pick another name or delete it first."
        )
    with restore_on_error(model):
        add_lora(model, config, adapter_name)
        if not configs:
            model.requires_grad_(False)
        setattr(model, _CONFIGS_ATTR, {**configs, adapter_name: config})
        if not hasattr(model, _FROZEN_ATTR):
            setattr(model, _FROZEN_ATTR, set())
        _set_active(model, active_adapters(model) if configs else [adapter_name])
    return model


def freeze_adapter(model: nn.Module, name: str) -> None:
    """Mark adapter ``name`` inference-only: its weights stay frozen, also while it is active.

    Raises:
        AdapterNotFoundError: the adapter is not on the model.
    """
    _require(model, [name])
    getattr(model, _FROZEN_ATTR).add(name)
    _update_requires_grad(model)


@contextlib.contextmanager
def restore_on_error(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: if its body raises, the adapters it added are removed without a trace.

    The module tree (every module object at its place), the ``requires_grad`` flags,
    the bookkeeping and each layer's active adapters come back as they were on
    entry. Parameter values the body wrote into existing parameters are the
    body's to restore.
    """
    modules = list(model.named_modules())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    routing = [
        (m, list(m.active_adapters) if isinstance(m, LoraLayer) else m.active_adapter)
        for _, m in modules
        if isinstance(m, (LoraLayer, ModulesToSaveWrapper))
    ]
    before = {m: set(m.r) if isinstance(m, LoraLayer) else set(m.modules_to_save) for m, _ in routing}
    saved = {a: model.__dict__[a] for a in _BOOKKEEPING if a in model.__dict__}
    saved = {a: (dict(v) if isinstance(v, dict) else type(v)(v)) for a, v in saved.items()}
    try:
        yield model
    except BaseException:
        added = set()
        for _, m in model.named_modules():
            if isinstance(m, (LoraLayer, ModulesToSaveWrapper)):
                have = set(m.r) if isinstance(m, LoraLayer) else set(m.modules_to_save)
                added |= have - before.get(m, set())
        for name in added:
            remove_lora(model, name)
        for name, module in modules:  # parents first, so each path resolves in the restored tree
            if name and model.get_submodule(name) is not module:
                set_module(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, active in routing:
            if isinstance(m, LoraLayer) and m.active_adapters != active:
                m.active_adapters = active
            elif isinstance(m, ModulesToSaveWrapper):
                m.active_adapter = active
        for attr in _BOOKKEEPING:
            model.__dict__.pop(attr, None)
            if attr in saved:
                setattr(model, attr, saved[attr])
        raise


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> nn.Module:
    """Add adapter ``name`` to ``model`` (inactive if others exist). See :func:`inject`."""
    return inject(model, config, adapter_name=name)


def set_adapter(model: nn.Module, name_or_names: str | list[str]) -> None:
    """Make the named adapter(s) active and trainable; the others stay but do nothing.

    Raises:
        AdapterNotFoundError: a name is not on the model.
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    _require(model, names)
    _set_active(model, names)


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
    remove_lora(model, name)
    configs = get_configs(model)
    del configs[name]
    setattr(model, _CONFIGS_ATTR, configs)
    getattr(model, _FROZEN_ATTR, set()).discard(name)
    _set_active(model, [a for a in active_adapters(model) if a != name])


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
    few_rows.unroute_head(model)  # the plain model gets its stock head back
    unfuse_mlps(model)
    unfuse_shared_inputs(model)
    unroute_rms_norms(model)
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
            set_module(model, name, module.base_layer)
        else:
            keep = module.current if merge_first else module.original_module
            set_module(model, name, keep)
    for attr in _BOOKKEEPING:
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
        merge_adapter: merge a single active adapter (default); False keeps the unmerged path. Layers on a
            4-bit base stay unmerged either way (merging would round the update back to 4 bits).

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
            if active[0] in layer.r and active[0] not in layer.merged_adapters and layer.mergeable:
                state["backups"][name] = layer.base_layer.weight.detach().clone()
                layer.merge(active)
    for _, layer in lora_layers(model):
        layer.shortcut_if_plain()  # merged layers: no wrapper code left in the call path
    state["head_routed"] = few_rows.route_head(model)  # CPU fp32 decoding: (W·xᵀ)ᵀ for few rows
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
    if state.get("head_routed"):
        few_rows.unroute_head(model)
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
