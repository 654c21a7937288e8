"""Combine adapters into a new one: PEFT's ``add_weighted_adapter``, with its names and semantics.

``linear`` (and ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) combine the
``A`` and ``B`` factors *separately*, as PEFT does: with ``cᵢ = wᵢ·sᵢ`` (weight times scaling)::

    A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ        B = Σ √|cᵢ|·Bᵢ
    B·A = Σᵢ cᵢ·Bᵢ·Aᵢ  +  Σᵢ≠ⱼ sign(cⱼ)·√|cᵢ cⱼ|·Bᵢ·Aⱼ      <- cross terms

so the result is *not* the weighted sum of the updates unless there is one adapter
(PEFT's issue 3004). It is kept for compatibility (same numbers as PEFT). The exact
combinations work on the updates ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` themselves:

* ``cat``: ``A = [c₁A₁; c₂A₂; …]``, ``B = [B₁ B₂ …]``, so ``B·A = Σ cᵢ·Bᵢ·Aᵢ`` exactly
  (rank ``Σ rᵢ``).
* ``svd``: the best rank-``svd_rank`` approximation of ``Σ wᵢ·ΔWᵢ``; exact when the
  rank is at least ``Σ rᵢ``.

Every call reports the relative residual ``‖ΔW − Σ wᵢΔWᵢ‖ / ‖Σ wᵢΔWᵢ‖`` of what it
built (0 for ``cat``; the truncation error for ``svd``; the cross terms for
``linear``), over all layers together and for the worst layer.

Differences from PEFT, on purpose: a name that already exists is an error (PEFT
silently returns), and the new adapter's config has ``use_rslora=False`` so that its
scaling is exactly 1 (PEFT copies ``use_rslora`` and then scales by √r).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from .adapters import delete_adapter, get_configs, inject
from .errors import AdapterNotFoundError, ConfigError
from .inject import lora_layers
from .layers import LoraConv, LoraLayer

__all__ = ["add_weighted_adapter", "CombineResult", "COMBINATION_TYPES"]

_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*_FACTOR_TYPES, "cat", *_SVD_TYPES)
_NEEDS_DENSITY = {
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
}


@dataclasses.dataclass(frozen=True)
class CombineResult:
    """What :func:`add_weighted_adapter` built.

    Attributes:
        adapter_name: the new adapter's name.
        combination_type: the method used (``linear`` when one adapter was given, as PEFT).
        r: the new adapter's rank.
        residual: ``‖ΔW − Σ wᵢΔWᵢ‖ / ‖Σ wᵢΔWᵢ‖`` over all adapted layers together (0 when the
            target is zero everywhere).
        max_layer_residual: the same ratio for the worst single layer.
    """

    adapter_name: str
    combination_type: str
    r: int
    residual: float
    max_layer_residual: float


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of adapter ``name`` as stored: A (r, in...), B (out, r...)."""
    if hasattr(layer, "lora_A"):
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _max_rank(config) -> int:
    """The largest rank an adapter may have on any layer (PEFT's rule, for sizing the new adapter)."""
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _prune(t: torch.Tensor, density: float, method: str) -> torch.Tensor:
    if density >= 1:
        return t
    if method == "magnitude":
        k = int(density * t.numel())
        mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
        return t * mask.view_as(t)
    return t * torch.bernoulli(torch.full_like(t, density)) / density  # DARE: random drop, rescaled


def _merge_tasks(
    kind: str, tensors: list[torch.Tensor], weights: list[float], density: float | None, sign_method: str
) -> torch.Tensor:
    """Σ wᵢ·tᵢ after the pruning / sign election that ``kind`` names (PEFT's merge_utils semantics)."""
    base = kind.removesuffix("_svd")
    if base in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude") for t in tensors]
    elif base in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random") for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if base not in ("ties", "dare_ties"):
        return weighted.sum(0)
    magnitude = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(magnitude >= 0, 1.0, -1.0)  # the elected sign per entry
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _check(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    density: float | None,
    majority_sign_method: str,
) -> None:
    configs = get_configs(model)
    if not configs:
        raise AdapterNotFoundError("this model has no LoRA adapters to combine; load some with lorakit.load_adapter.")
    if not adapters:
        raise ConfigError("adapters is empty; name at least one adapter to combine.")
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise AdapterNotFoundError(
            f"no adapter named {', '.join(map(repr, missing))} on this model; adapters: {', '.join(configs)}."
        )
    if len(weights) != len(adapters):
        raise ConfigError(f"weights has {len(weights)} value(s) for {len(adapters)} adapter(s); give one per adapter.")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights={weights!r} must be finite numbers (negative ones subtract an adapter).")
    if adapter_name in configs:
        raise ConfigError(f"adapter {adapter_name!r} already exists on this model; pick a new name or delete it first.")
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(
            f"combination_type={combination_type!r} is not known; use one of {', '.join(COMBINATION_TYPES)}."
        )
    if combination_type in _NEEDS_DENSITY and len(adapters) > 1 and (density is None or not 0 <= density <= 1):
        raise ConfigError(
            f"combination_type={combination_type!r} needs density in [0, 1] (the fraction of values "
            f"kept), got {density!r}."
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method={majority_sign_method!r}; use 'total' or 'frequency'.")
    with_saved = [a for a in adapters if configs[a].modules_to_save]
    if with_saved:
        raise ConfigError(
            f"adapter(s) {', '.join(map(repr, with_saved))} train whole modules (modules_to_save), "
            f"which cannot be combined; combine adapters without modules_to_save."
        )
    merged = [n for n, layer in lora_layers(model) if any(a in layer.merged_adapters for a in adapters)]
    if merged:
        raise ConfigError(
            f"adapters to combine are merged into the base weights (e.g. at {merged[0]!r}); "
            f"call lorakit.unmerge(model) first."
        )


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: Literal[
        "svd",
        "linear",
        "cat",
        "ties",
        "ties_svd",
        "dare_ties",
        "dare_linear",
        "dare_ties_svd",
        "dare_linear_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    ] = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> CombineResult:
    """Add adapter ``adapter_name`` that combines ``adapters`` with ``weights`` (PEFT's names and results).

    The new adapter is added inactive (switch to it with :func:`lorakit.set_adapter`); its
    rank is ``r`` of the inputs for the factor-wise types (all must share it), ``Σ r`` for
    ``cat``, ``svd_rank`` (default: the largest input rank) for the ``*_svd`` types; its
    ``lora_alpha`` equals its rank, so its scaling is 1. See the module docstring for
    which types are exact (``cat``; ``svd`` at full rank) and which add cross terms (``linear``).

    Args:
        model: a model holding the adapters.
        adapters: names of the adapters to combine.
        weights: one weight per adapter; negative weights subtract.
        adapter_name: name of the new adapter (must not exist yet).
        combination_type: ``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune`` or a ``*_svd`` variant of the last four (PEFT's list and default).
        svd_rank: rank of the result for the ``*_svd`` types.
        svd_clamp: quantile at which the SVD factors are clamped (PEFT's ``svd_clamp``); None: no clamping.
        svd_full_matrices: passed to ``torch.linalg.svd``.
        density: fraction of values kept, for ``ties``, ``dare_*`` and ``magnitude_prune``.
        majority_sign_method: ``"total"`` or ``"frequency"`` (``ties`` and ``dare_ties``).

    Returns:
        A :class:`CombineResult` with the rank and the relative residual against ``Σ wᵢΔWᵢ``.

    Raises:
        AdapterNotFoundError: an adapter is not on the model.
        ConfigError: ``adapter_name`` exists, unequal ranks for a factor-wise type, a bad
            ``combination_type`` / ``density`` / weight, adapters with ``modules_to_save``, or merged adapters.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check(model, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    configs = get_configs(model)
    kind = "linear" if len(adapters) == 1 else combination_type
    ranks = [_max_rank(configs[a]) for a in adapters]
    if kind in _FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ConfigError(
                f"combination_type={kind!r} combines A and B factor-wise and needs equal ranks; got "
                f"{dict(zip(adapters, ranks))}. Use 'cat' (exact) or 'svd' instead."
            )
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
        if not isinstance(new_rank, int) or new_rank < 1:
            raise ConfigError(f"svd_rank={svd_rank!r} must be an int >= 1.")
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.r for a in adapters)]
    first = configs[adapters[0]]
    config = dataclasses.replace(
        first,
        r=new_rank,
        lora_alpha=new_rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=[n for n, _ in layers],
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
    )
    inject(model, config, adapter_name)
    err2 = ref2 = 0.0
    worst = 0.0
    try:
        for _, layer in layers:
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
            new_A, new_B = _factors(layer, adapter_name)
            with torch.no_grad():
                A, B = _combine_layer(
                    layer, kind, present, new_rank, svd_clamp, svd_full_matrices, density, majority_sign_method
                )
                new_A.zero_()
                new_B.zero_()
                new_A[: A.shape[0]].copy_(A.reshape(A.shape[0], *new_A.shape[1:]))
                new_B[:, : B.shape[1]].copy_(B.reshape(B.shape[0], B.shape[1], *new_B.shape[2:]))
                target = sum(w * layer.delta_weight(a) for a, w in present)
                err = (layer.delta_weight(adapter_name) - target).norm().item() ** 2
                ref = target.norm().item() ** 2
            err2, ref2 = err2 + err, ref2 + ref
            worst = max(worst, math.sqrt(err / ref) if ref > 0 else 0.0)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    residual = math.sqrt(err2 / ref2) if ref2 > 0 else 0.0
    return CombineResult(adapter_name, kind, new_rank, residual, worst)


def _combine_layer(
    layer: LoraLayer,
    kind: str,
    present: list[tuple[str, float]],
    new_rank: int,
    clamp: float | None,
    full_matrices: bool,
    density: float | None,
    sign_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new ``(A, B)`` of one layer, A (r', in...) and B (out, r'...) with r' <= new_rank."""
    if kind == "cat":
        As = [_factors(layer, a)[0] * (w * layer.scaling[a]) for a, w in present]
        Bs = [_factors(layer, a)[1] for a, _ in present]
        return torch.cat(As, 0), torch.cat(Bs, 1)
    if kind in _FACTOR_TYPES:
        wa, wb, As, Bs = [], [], [], []
        for a, w in present:
            c = w * layer.scaling[a]
            wa.append(math.copysign(math.sqrt(abs(c)), c) if c != 0 else 0.0)
            wb.append(math.sqrt(abs(c)))
            A, B = _factors(layer, a)
            As.append(A.detach())
            Bs.append(B.detach())
        return (_merge_tasks(kind, As, wa, density, sign_method), _merge_tasks(kind, Bs, wb, density, sign_method))
    # *_svd: decompose the combined update ΔW (as (out, in); delta_weight applies each adapter's scaling).
    deltas = [layer.delta_weight(a) for a, _ in present]
    delta = _merge_tasks(kind, deltas, [w for _, w in present], density, sign_method)
    conv = isinstance(layer, LoraConv)
    if conv:
        delta = delta.flatten(1)  # (out, in*k...)
    elif getattr(layer, "fan_in_fan_out", False) or not hasattr(layer, "lora_A"):
        delta = delta.T  # Conv1D and embeddings store ΔW transposed
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])
    Vh = Vh[:new_rank]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return Vh, U
