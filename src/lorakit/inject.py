"""Model surgery: match target modules, wrap them in LoRA layers, freeze the rest.

Matching follows PEFT exactly (so a config means the same thing in both), with
one difference: a ``target_modules`` list entry that matches nothing is an
error naming it and the closest real module names, where PEFT ignores it.

This module changes modules and ``requires_grad`` flags only; which adapters a
model has, their configs and which are active is :mod:`lorakit.adapters`'
bookkeeping (``lorakit.inject(model, config)`` lives there: it calls
:func:`add_lora` and records the adapter).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping

from torch import nn

from .config import LoraConfig
from .errors import ConfigError, TargetNotFoundError
from .layers import HFConv1D, LoraLayer, ModulesToSaveWrapper, wrap_module

__all__ = [
    "find_targets",
    "lora_layers",
    "add_lora",
    "remove_lora",
    "set_module",
    "route_adapters",
    "set_requires_grad",
    "trainable_parameters",
    "print_trainable_parameters",
    "pattern_value",
]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(dotted name, layer)`` for every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return set()
    if isinstance(head, (LoraLayer, ModulesToSaveWrapper)):
        return set()
    return {name for name, module in model.named_modules() if module is head}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (HFConv1D is not None and isinstance(module, HFConv1D))


def _list_matches(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _excluded(config: LoraConfig, key: str) -> bool:
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return True
        elif _list_matches(ex, key):
            return True
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return True
    return False


def _skip_internal(model: nn.Module) -> set[str]:
    """Names of modules that live inside LoRA / modules_to_save wrappers (never targets)."""
    skip = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            skip.update(f"{prefix}.{sub}" for sub, _ in module.named_modules() if sub)
    return skip


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the modules ``config`` adapts in ``model``, in model order.

    Raises:
        ConfigError: no ``target_modules`` given.
        TargetNotFoundError: a list entry matches no module, or nothing matches at all.
    """
    targets = config.target_modules
    if targets is None:
        raise ConfigError(
            "target_modules is not set; name the modules to adapt, e.g. ['q_proj', 'v_proj'], or use 'all-linear'."
        )
    skip = _skip_internal(model)
    names = [n for n, _ in model.named_modules() if n and n not in skip]
    modules = dict(model.named_modules())
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    heads = _output_head_names(model) if all_linear else set()

    def wanted(key: str) -> bool:
        if all_linear:
            module = modules[key]
            hit = _is_linear(module) or (
                isinstance(module, LoraLayer)
                and hasattr(module, "lora_A")
                and not isinstance(module.base_layer, (nn.Conv1d, nn.Conv2d))
            )
            hit = hit and key not in heads
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, key) is not None
        else:
            hit = _list_matches(targets, key)
        return hit and not _excluded(config, key) and _layer_index_ok(config, key)

    found = [n for n in names if wanted(n)]
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            short = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            hints = []
            for t in missing:
                close = difflib.get_close_matches(t.rsplit(".", 1)[-1], short, n=3, cutoff=0.5)
                hints.append(f"{t!r} (closest: {', '.join(close)})" if close else repr(t))
            raise TargetNotFoundError(
                f"target_modules entries match no module in {type(model).__name__}: {'; '.join(hints)}. "
                f"Module names in this model include: {', '.join(short[:25])}."
            )
    if not found:
        raise TargetNotFoundError(
            f"target_modules={targets!r} (with exclude_modules / layers_to_transform applied) matches no module "
            f"in {type(model).__name__}; check the names with `lorakit inspect` or model.named_modules()."
        )
    return found


def pattern_value(pattern: dict, key: str, default):
    """The value of the first ``rank_pattern`` / ``alpha_pattern`` key matching module ``key``, else ``default``.

    PEFT's rule: a key matches the module path's end, as a regular expression.
    """
    for p in pattern:
        if re.match(rf"(.*\.)?({p})$", key):
            return pattern[p]
    return default


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Wrap the modules ``config`` targets (once) and add adapter ``adapter_name`` to them.

    Also adds the adapter's ``modules_to_save`` copies. Touches no bookkeeping and
    no ``requires_grad`` flag; a failure part way leaves the surgery done so far
    (:func:`lorakit.adapters.inject` undoes it).

    Raises:
        ConfigError: the config is unusable.
        TargetNotFoundError: a target matches no module.
        UnsupportedModuleError: a matched module is of an unsupported kind.
    """
    targets = find_targets(model, config)
    modules = dict(model.named_modules())
    for name in targets:
        module = modules[name]
        if not isinstance(module, LoraLayer):
            module = wrap_module(module, config.fan_in_fan_out)
            set_module(model, name, module)
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        module.add_adapter(
            adapter_name, r, alpha, config.scaling_for(r, alpha), config.lora_dropout, config.init_lora_weights
        )
    for mts in config.modules_to_save or []:
        _add_modules_to_save(model, mts, adapter_name)


def remove_lora(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every LoRA layer and modules_to_save wrapper (wrappers stay)."""
    for _, layer in lora_layers(model):
        if adapter_name in layer.r:
            layer.delete_adapter(adapter_name)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.delete_adapter(adapter_name)


def _add_modules_to_save(model: nn.Module, target: str, adapter_name: str) -> None:
    skip = _skip_internal(model)
    hits = [n for n, m in model.named_modules() if n and n not in skip and (n == target or n.endswith(f".{target}"))]
    if not hits:
        raise TargetNotFoundError(f"modules_to_save entry {target!r} matches no module in {type(model).__name__}.")
    modules = dict(model.named_modules())
    for name in hits:
        module = modules[name]
        if isinstance(module, LoraLayer):
            raise ConfigError(f"{name!r} is both a LoRA target and in modules_to_save; choose one.")
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            set_module(model, name, module)
        module.add_adapter(adapter_name)


def route_adapters(model: nn.Module, names: list[str]) -> None:
    """Make every LoRA layer and modules_to_save wrapper compute with the adapters in ``names`` it has."""
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.r]
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.active_adapter = next((n for n in names if n in module.modules_to_save), None)


def set_requires_grad(model: nn.Module, trainable: list[str], configs: Mapping[str, LoraConfig]) -> None:
    """Make exactly the weights of the ``trainable`` adapters trainable (+ bias / modules_to_save per config).

    Base weights are left as they are, except biases: with any adapter whose
    config trains biases (``bias`` not ``"none"``) they follow the trainable ones.

    Args:
        model: an injected model.
        trainable: the adapters to train.
        configs: every adapter's config, by name.
    """
    for _, layer in lora_layers(model):
        for pname in layer.adapter_param_names:
            for name, sub in getattr(layer, pname).items():
                sub.requires_grad_(name in trainable)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for name, sub in module.modules_to_save.items():
                sub.requires_grad_(name in trainable)
    modes = {configs[n].bias for n in trainable if n in configs}
    if any(c.bias != "none" for c in configs.values()):
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora_" not in pname and ".modules_to_save." not in pname:
                p.requires_grad_(False)
    if "all" in modes:
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora_" not in pname:
                p.requires_grad_(True)
    if "lora_only" in modes:
        for _, layer in lora_layers(model):
            b = getattr(layer.base_layer, "bias", None)
            if b is not None and any(configs[n].bias == "lora_only" for n in layer.r if n in trainable):
                b.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as PEFT counts them.

    Shared (tied) parameters count once; bitsandbytes 4-bit parameters count
    twice their packed element count, as PEFT does.
    """
    trainable = total = 0
    for _, p in model.named_parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = n * 2 * (p.element_size() if hasattr(p, "element_size") else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
