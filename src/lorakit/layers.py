"""LoRA layer wrappers: a frozen base layer plus named adapters.

Each wrapper keeps the layout PEFT uses (``base_layer``, ``lora_A`` /
``lora_B`` as ``nn.ModuleDict`` keyed by adapter name, ``lora_embedding_A`` /
``lora_embedding_B`` as ``nn.ParameterDict`` for embeddings), so state-dict
keys line up with PEFT's on-disk format without translation tables.

State changes are explicit calls (``merge``, ``unmerge``, ``set_adapter``);
nothing happens as a side effect of ``.eval()``.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, quant, routing
from .errors import LorakitError, UnsupportedModuleError
from .rerun import output_unread

__all__ = [
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "ModulesToSaveWrapper",
    "SUPPORTED_KINDS",
    "wrap_module",
]

try:  # GPT-2 style Conv1D: weight stored (in, out), y = x @ W + b.
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    HFConv1D = None

SUPPORTED_KINDS = "nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, transformers Conv1D (GPT-2)"

_ROUTE_OWNER = __name__  # lorakit.routing owner tag of the merged-layer shortcut


class LoraLayer(nn.Module):
    """Common state of a LoRA wrapper around one frozen base layer.

    Attributes:
        base_layer: the original module (frozen).
        r, lora_alpha, scaling: per-adapter rank, alpha and scaling.
        active_adapters: adapters whose update is applied in forward.
        merged_adapters: adapters currently folded into ``base_layer.weight``.
        disabled: when True, forward is the base layer alone.
    """

    adapter_param_names = ("lora_A", "lora_B")
    # Setting any of these may change what forward computes: it drops the shortcut (see shortcut_if_plain).
    _STATE_ATTRS = frozenset({"active_adapters", "merged_adapters", "disabled"})

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name in LoraLayer._STATE_ATTRS:
            routing.remove_forward(self, _ROUTE_OWNER)
        super().__setattr__(name, value)

    def shortcut_if_plain(self) -> bool:
        """Route calls straight to the base layer while forward would compute nothing else.

        With every active adapter merged (or none active, or adapters disabled), forward
        is ``base_layer(x)``; this makes the wrapper's ``forward`` the base layer's own,
        so a merged model makes the same module calls as the plain one (on a GPU,
        decoding is bound by that Python overhead). Any change of adapter state (merge,
        unmerge, add, delete, active or disabled adapters) drops the shortcut again.
        Hooks on the wrapper still run; a base layer that has hooks keeps the full
        path (hooks added to the base layer later run only after the next state change).
        The shortcut is a :mod:`lorakit.routing` override that steps aside: a wrapper
        whose forward another owner has replaced keeps that route.

        Returns:
            True if the shortcut is now in place.
        """
        routing.remove_forward(self, _ROUTE_OWNER)
        base = self.base_layer
        if self._pending() or base._forward_hooks or base._forward_pre_hooks or routing.forward_owner(self):
            return False
        routing.set_forward(self, base.forward, _ROUTE_OWNER)
        return True

    # Attributes transformers and user code read off the layer they replaced.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(
        self, name: str, r: int, lora_alpha: float, scaling: float, dropout: float, init: bool | str
    ) -> None:
        """Create adapter ``name`` on this layer and initialise it."""
        routing.remove_forward(self, _ROUTE_OWNER)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, lora_alpha, scaling
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create(name, r)
        self.reset_parameters(name, init)
        weight = self.base_layer.weight
        # Adapters live on the base layer's device, in fp32 unless the base is fp64.
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        for pname in self.adapter_param_names:
            container = getattr(self, pname)
            container[name] = container[name].to(device=weight.device, dtype=dtype)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if merged)."""
        routing.remove_forward(self, _ROUTE_OWNER)
        if name in self.merged_adapters:
            self.unmerge()
        for pname in (*self.adapter_param_names, "lora_dropout"):
            container = getattr(self, pname)
            if name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def mergeable(self) -> bool:
        """Whether adapters can be folded into the base weight in memory (not into a quantized one)."""
        return getattr(self, "quantized", None) is None

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        """Fold the given (default: active) adapters into the base weight.

        The delta is computed in fp32 (or fp64) and the weight cast back once.
        Merging an adapter that is already merged is a no-op with a warning.

        Raises:
            LorakitError: with ``safe=True``, when the merged weight would hold NaN/Inf; on a
                quantized (4-bit) base, always (see the message).
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        if not self.mergeable and any(n in self.r and n not in self.merged_adapters for n in names):
            raise LorakitError(
                "cannot merge into a 4-bit base in memory: the merged weight dequant(W4) + ΔW would have to be "
                "rounded back to 4 bits, which loses most of the update. Keep the adapter unmerged on the 4-bit "
                "base, or write a full-precision merged model with `lorakit merge RUN OUT --dtype bf16` "
                "(lorakit.merging.merge_adapter)."
            )
        weight = self.base_layer.weight
        routing.remove_forward(self, _ROUTE_OWNER)
        for name in names:
            if name not in self.r:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; nothing to do", stacklevel=3)
                continue
            delta = self.delta_weight(name)
            new = weight.data.to(delta.dtype) + delta
            if safe and not torch.isfinite(new).all():
                raise LorakitError(
                    f"merging adapter {name!r} would put NaN/Inf into the base weight; the adapter is broken "
                    f"(check its training loss); nothing was changed."
                )
            weight.data.copy_(new.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight (last merged first)."""
        weight = self.base_layer.weight
        routing.remove_forward(self, _ROUTE_OWNER)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.delta_weight(name)
            weight.data.copy_((weight.data.to(delta.dtype) - delta).to(weight.dtype))

    def _pending(self) -> list[str]:
        """Active adapters whose update forward must still compute."""
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a in self.r and a not in self.merged_adapters]

    # Subclasses implement these three.
    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def reset_parameters(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` shaped like the base weight, in fp32 (fp64 for fp64 adapters)."""
        raise NotImplementedError


def _init_linear_pair(A: torch.Tensor, B: torch.Tensor, r: int, init: bool | str) -> None:
    if init is False:  # both random (nn.Linear's default init), the model changes at once
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        return
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``) or a 4-bit bitsandbytes ``Linear4bit``.

    On a quantized base (4-bit bitsandbytes or int8; ``quantized`` is its
    :class:`lorakit.quant.QuantizedBase`) the adapted forward is the same
    :func:`lorakit.ops.lora_linear` with that base in the weight slot (see
    :meth:`frozen_base`), and in-memory merging is refused (:mod:`lorakit.merging`
    writes ``dequant(W4) + ΔW`` instead).
    """

    # Set by lorakit.fusion.fuse_shared_inputs on q/k/v-like siblings: one op computes the group's outputs.
    shared_input: Any = None

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        # A quantized frozen base (4-bit bitsandbytes, int8): the LoRA op reaches its weight only through this.
        self.quantized = quant.quantized_base(base_layer)
        if self.quantized is not None:
            self.out_features, self.in_features = self.quantized.out_features, self.quantized.in_features
        else:
            w = base_layer.weight
            self.out_features, self.in_features = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)  # weight (r, in)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)  # weight (out, r)

    def reset_parameters(self, name: str, init: bool | str) -> None:
        _init_linear_pair(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        delta = (B.to(dtype) @ A.to(dtype)) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the storage layout."""
        base = self._modules["base_layer"]  # dict lookups: forward calls this on every projection
        w = base._parameters["weight"] if "weight" in base._parameters else base.weight
        return w.T if self.fan_in_fan_out else w

    def frozen_base(self) -> torch.Tensor | quant.QuantizedBase:
        """What lorakit's LoRA ops take in the weight slot: the quantized base, else :meth:`base_weight`."""
        return self.quantized if self.quantized is not None else self.base_weight()

    def _plain_inference(self, x: torch.Tensor, A: torch.Tensor, W: torch.Tensor) -> bool:
        """Whether a one-adapter call on ``x`` takes the inference path (``F.linear`` plus an in-place LoRA term)."""
        return (
            self.quantized is None
            and not torch.is_grad_enabled()
            and x.dtype == A.dtype == W.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _quantized_inference(self, x: torch.Tensor, A: torch.Tensor) -> bool:
        """Whether a one-adapter call on ``x`` over a quantized base takes the inference path: the base's own
        product (its integer kernel, or its dequantized weight) plus an in-place LoRA term, the same math as
        the fused op's forward without its autograd node and argument checks (a decoding step's 210 calls
        over the default model's int8 base: about half of each call's time)."""
        return (
            self.quantized is not None
            and not torch.is_grad_enabled()
            and x.dtype == A.dtype == getattr(self.quantized, "compute_dtype", None)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def inference_operands(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        """``(W, bias, A, B, scale)`` when :meth:`forward` on ``x`` would compute ``F.linear(x, W, bias) +
        scale·(x·Aᵀ)·Bᵀ`` on its inference path (one active unmerged adapter, a full-precision base, no
        autograd, autocast or dropout, ``x`` in the weights' dtype), else None: for other implementations
        of the same call (lorakit.graph_decode's one-kernel LoRA term)."""
        active = self.active_adapters
        if len(active) != 1 or self.merged_adapters or self.disabled or active[0] not in self.r:
            return None
        name = active[0]
        A, B, W = self.lora_A[name].weight, self.lora_B[name].weight, self.base_weight()
        if (self.training and isinstance(self.lora_dropout[name], nn.Dropout)) or not self._plain_inference(x, A, W):
            return None
        return W, getattr(self.base_layer, "bias", None), A, B, self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.active_adapters
        # The common case (one active adapter, unmerged) without building the pending list.
        simple = len(active) == 1 and not self.merged_adapters and not self.disabled and active[0] in self.r
        pending = active if simple else self._pending()
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        if len(pending) == 1 and not args and not kwargs:
            group = self.shared_input
            if group is not None:  # lorakit.fusion: siblings reading one x share one op in training
                y = group.output(self, x)
                if y is not None:
                    return y
            # Hot path (every projection, every step): plain dict lookups instead of nn.Module.__getattr__.
            name, mods = pending[0], self._modules
            base = mods["base_layer"]
            drop = mods["lora_dropout"]._modules[name]
            A = mods["lora_A"]._modules[name]._parameters["weight"]
            B = mods["lora_B"]._modules[name]._parameters["weight"]
            W = self.frozen_base()  # a quantized base is dequantized per call inside the op, never kept
            bias = base._parameters["bias"] if "bias" in base._parameters else getattr(base, "bias", None)
            dropping = self.training and isinstance(drop, nn.Dropout)
            if not dropping and self._plain_inference(x, A, W):
                # Inference: no autograd bookkeeping, LoRA term added into the base output in place.
                y = F.linear(x, W, bias)  # (..., out)
                xa = F.linear(x, A)  # (..., r)
                y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), B.T, alpha=self.scaling[name])
                return y
            if not dropping and self._quantized_inference(x, A):
                x2 = x.reshape(-1, x.shape[-1])
                y = W.output(x2, x.dtype)  # [N, out], a new tensor: the base's kernel
                if bias is not None:
                    y.add_(bias)
                y.addmm_(F.linear(x2, A), B.T, alpha=self.scaling[name])
                return y.view(*x.shape[:-1], y.shape[-1])
            # The fused path: one autograd node, LoRA term added in place, x saved once.
            return ops.lora_linear(
                x,
                W,
                bias,
                A,
                B,
                self.scaling[name],
                dropout_p=drop.p if dropping else 0.0,
                training=self.training,
                compute_output=not output_unread(self),
            )
        result = self.base_layer(x, *args, **kwargs)
        for name in pending:  # several adapters at once: the plain composition
            A, B = self.lora_A[name], self.lora_B[name]
            xd = self.lora_dropout[name](x).to(A.weight.dtype)
            result = result + (B(A(xd)) * self.scaling[name]).to(result.dtype)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: ``A`` (r, num_embeddings) is looked up, then ``B`` (dim, r)."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, r: int) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r))

    def reset_parameters(self, name: str, init: bool | str) -> None:
        if init is False:  # keep the random normal init of both
            return
        # As PEFT: A zero, B normal, so the product starts at zero.
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        return (B.to(dtype) @ A.to(dtype)).T * self.scaling[name]  # (num, dim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self._pending():
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_a = F.embedding(
                x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )  # (..., r)
            result = result + ((after_a @ B.T) * self.scaling[name]).to(result.dtype)
        return result


class LoraConv(LoraLayer):
    """LoRA around ``nn.Conv1d`` / ``nn.Conv2d``: A is a conv to r channels, B a 1x1 conv back."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise UnsupportedModuleError(
                f"grouped convolutions (groups={base_layer.groups}) are not supported for LoRA; "
                f"exclude this module with exclude_modules."
            )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, dilation=base.dilation, bias=False
        )
        self.lora_B[name] = conv(r, base.out_channels, ones, ones, bias=False)

    def reset_parameters(self, name: str, init: bool | str) -> None:
        _init_linear_pair(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        A, B = A.to(dtype), B.to(dtype)
        # B is 1x1: delta[o, i, k...] = sum_r B[o, r] A[r, i, k...]
        delta = torch.einsum("or,r...->o...", B.flatten(1), A)
        return delta * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self._pending():
            A, B = self.lora_A[name], self.lora_B[name]
            xd = self.lora_dropout[name](x).to(A.weight.dtype)
            result = result + (B(A(xd)) * self.scaling[name]).to(result.dtype)
        return result


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module and one trainable copy per adapter (PEFT's layout)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules:
                raise
            return getattr(self.current, name)


def wrap_module(module: nn.Module, fan_in_fan_out: bool) -> LoraLayer:
    """Return the LoRA wrapper for ``module``.

    Raises:
        UnsupportedModuleError: for a module kind lorakit cannot adapt.
    """
    if isinstance(module, nn.Linear):
        if fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but the target is nn.Linear; using fan_in_fan_out=False", stacklevel=3)
        return LoraLinear(module, fan_in_fan_out=False)
    if HFConv1D is not None and isinstance(module, HFConv1D):
        return LoraLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoraConv(module)
    raise UnsupportedModuleError(
        f"cannot apply LoRA to a {type(module).__module__}.{type(module).__name__}; "
        f"supported layers are {SUPPORTED_KINDS}. Narrow target_modules or add it to exclude_modules."
    )
