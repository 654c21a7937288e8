"""Padding-free forward passes: a padded batch's real tokens as one row, attention per example.

A right-padded batch spends every matmul, norm and elementwise pass on its padding
too (the short benchmark batch: 653 positions for 567 tokens, 13% waste), and a
packed row's block-diagonal mask makes attention compute every pair of tokens in the
row and throw most away. Here the batch's real tokens run as one row of ``N`` tokens
(``input_ids [1, N]``, ``position_ids`` restarting at 0 for each example), so every
layer but attention sees exactly the real tokens, and attention runs once per
example, or once per run of adjacent examples of one length (causal, no mask: SDPA's
own CPU kernel, each output written straight into the row's output tensor, which is
all its backward keeps; transformers' SDPA function where that kernel does not apply).
The math is the padded batch's: each real token sees the same tokens at the same
positions; only the matmuls' row blocking, and so float rounding, differs.

It works through transformers' attention interface: :func:`enable_padding_free`
switches a model's attention to :data:`ATTENTION`, a function that splits the row at
the example bounds it is given (``lorakit_segments=``, passed down by the model like
any attention kwarg, and kept by a gradient-checkpointing rerun) and is transformers'
SDPA otherwise, with SDPA's masks, so the model still runs ordinary padded batches
(eval, generation) unchanged. :func:`flatten_batch` builds the one-row inputs; the
loss (:mod:`lorakit.train.lm_loss`) maps labels to the flat rows.

    enable_padding_free(model)            # after loading; padding_free_blocker(model) says why not
    flat = flatten_batch(batch, model)    # None when the batch has nothing to gain or cannot
    hidden = backbone(**flat.inputs).last_hidden_state[0]   # [N, H]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .logprobs import attends_causally, right_padded

__all__ = [
    "ATTENTION",
    "FlatBatch",
    "padding_free_blocker",
    "enable_padding_free",
    "disable_padding_free",
    "setup_padding_free",
    "flatten_batch",
]

ATTENTION = "lorakit_padding_free"  # the attention implementation's name in transformers' registry
_SEGMENTS = "lorakit_segments"  # the keyword the model passes down to the attention function
_BEFORE = "_lorakit_attention_before"  # the model's attention implementation before enable_padding_free


def _example_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """Causal attention of B examples of one length: ``(out [B, heads, T, d], logsumexp)``, SDPA's CPU kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)


def _runs(sizes: list[int]) -> list[tuple[int, int, int]]:
    """``(start, count, length)`` of each run of adjacent examples with one length, in row order."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for n in sizes:
        if runs and runs[-1][2] == n:
            a, c, _ = runs[-1]
            runs[-1] = (a, c + 1, n)
        else:
            runs.append((start, 1, n))
        start += n
    return runs


def _heads_view(x: Tensor, start: int, count: int, length: int) -> Tensor:
    """``x [1, heads, N, d]``'s tokens ``[start, start + count·length)`` as ``[count, heads, length, d]`` (a view)."""
    return x[0, :, start : start + count * length].unflatten(1, (count, length)).transpose(0, 1)


def _tokens_view(x: Tensor, start: int, count: int, length: int) -> Tensor:
    """``x [1, N, heads, d]``'s tokens ``[start, start + count·length)`` as ``[count, heads, length, d]`` (a view)."""
    return x[0, start : start + count * length].unflatten(0, (count, length)).transpose(1, 2)


class _ExamplesAttention(torch.autograd.Function):
    """Causal flash attention per example of a padding-free row, the outputs written into one tensor.

    Stock autograd would keep every example's SDPA output for its backward and, beside them,
    their concatenation, which the output projection's LoRA saves: the same numbers twice.
    This function writes each output into the concatenated tensor at once and saves only that
    tensor; its backward hands each example's slice back to the same kernel. The kernel is
    the one SDPA itself runs on a CPU here (``aten._scaled_dot_product_flash_attention_for_cpu``,
    grouped K/V heads read unrepeated), so an example's outputs and gradients are bitwise SDPA's.

    Adjacent examples of one length (a batch of rows cut at ``max_seq_len``) go to the kernel as
    one batch, through views: its backward splits work only over examples x heads, so one
    example's 9 heads (the default model's) go 5 and 4 to two threads, and fewer calls cost
    less (4 x 256 tokens, the default model's heads: 17% less attention time, forward and
    backward). There an example's numbers agree with those of a call of its own up to float
    rounding: the batched kernel splits its work over the threads differently, and the last bit moves.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, sizes: list[int], scale: float | None) -> Tensor:
        _, heads, n, _ = query.shape
        out = query.new_empty(1, n, heads, value.shape[-1])  # [1, N, heads, d]: what attention functions return
        runs = _runs(sizes)
        lse = []
        for run in runs:
            q, k, v = (_heads_view(x, *run) for x in (query, key, value))
            o, m = _example_attention(q, k, v, scale)
            _tokens_view(out, *run).copy_(o)  # o is freed here, not kept for backward
            lse.append(m)
        ctx.runs, ctx.scale = runs, scale
        ctx.save_for_backward(query, key, value, out, *lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        query, key, value, out, *lse = ctx.saved_tensors
        grads: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for run, m in zip(ctx.runs, lse, strict=True):
            q, k, v = (_heads_view(x, *run) for x in (query, key, value))
            o, do = _tokens_view(out, *run), _tokens_view(grad_out, *run)
            got = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, o, m, 0.0, True, scale=ctx.scale
            )
            for acc, g in zip(grads, got, strict=True):  # [count, heads, T, d] -> [1, heads, count·T, d]
                acc.append(g.transpose(0, 1).flatten(1, 2).unsqueeze(0))
        return *(g[0] if len(g) == 1 else torch.cat(g, 2) for g in grads), None, None


def _kernel_fits(query: Tensor, key: Tensor, value: Tensor, dropout: float) -> bool:
    """Whether :class:`_ExamplesAttention` computes what SDPA would: CPU, no dropout, grouped heads, one dtype."""
    return (
        query.device.type == "cpu"
        and dropout == 0.0
        and query.dtype in (torch.float32, torch.float64, torch.bfloat16)
        and query.dtype == key.dtype == value.dtype
        and query.shape[1] % key.shape[1] == 0
        and key.shape[1] == value.shape[1]
        and key.shape[-1] == value.shape[-1] <= 256  # transformers' own condition for grouped heads in SDPA
    )


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    lorakit_segments: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' SDPA attention, once per example when the row is a padding-free batch.

    ``query`` is ``[1, heads, N, d]`` there and ``lorakit_segments`` the examples' bounds
    ``(0, n_1, n_1 + n_2, ..., N)``; each example attends causally to itself only. The
    output is ``[1, N, heads, d]``, as transformers' attention functions return it.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if lorakit_segments is None:  # an ordinary batch (eval, generation): SDPA with its mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    sizes = [b - a for a, b in zip(lorakit_segments[:-1], lorakit_segments[1:], strict=False)]
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if grad and _kernel_fits(query, key, value, kwargs.get("dropout", 0.0)):
        return _ExamplesAttention.apply(query, key, value, sizes, kwargs.get("scaling")), None
    # split, not slicing: split's backward writes the examples' gradients into one tensor (a cat), where each
    # slice's would allocate a zero-filled full-size gradient and add it to the others
    parts = [
        sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True)
    ]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # ordinary batches: SDPA's masks


def padding_free_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot run padding-free, or None when it can.

    It can when its attention is transformers' SDPA (the default on a CPU), every token
    sees only the tokens before it, and no attention is windowed or soft-capped.

    Args:
        model: A transformers causal LM (adapters injected or not).

    Returns:
        None, or the reason in a few words.
    """
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention == ATTENTION:
        return None
    if attention != "sdpa":
        return f"its attention is {attention!r}, not transformers' 'sdpa'"
    if not attends_causally(model):
        return "its attention looks ahead (not a causal LM)"
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    ):
        return "it has sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "it soft-caps attention logits"
    return None


def enable_padding_free(model: nn.Module) -> None:
    """Switch ``model``'s attention to :data:`ATTENTION` (undone by :func:`disable_padding_free`).

    Args:
        model: A transformers causal LM.

    Raises:
        ConfigError: :func:`padding_free_blocker` names a reason.
    """
    why = padding_free_blocker(model)
    if why is not None:
        raise ConfigError(f"padding-free batches need SDPA attention in a causal LM, but {why}; set padding_free: off")
    if model.config._attn_implementation == ATTENTION:
        return
    _register()
    setattr(model, _BEFORE, model.config._attn_implementation)
    model.config._attn_implementation = ATTENTION  # the setter passes it on to sub-configs


def disable_padding_free(model: nn.Module) -> None:
    """Give ``model`` back the attention it had before :func:`enable_padding_free` (a no-op if never enabled).

    Args:
        model: The model.
    """
    before = vars(model).pop(_BEFORE, None)
    if before is not None:
        model.config._attn_implementation = before


def setup_padding_free(
    model: nn.Module, mode: str, device: torch.device, graphs: bool = False, run_blocker: str | None = None
) -> str:
    """``train.padding_free``: make ``model`` padding-free when ``mode`` and the run allow it.

    ``auto`` turns it on for CPU runs whose model allows it: there every padded position
    costs its full share of the step. On a GPU the per-example attention calls cost
    launches and CUDA graphs record one padded shape per batch, so only ``on`` asks for it.

    Args:
        model: The model to train.
        mode: ``"auto"``, ``"on"`` or ``"off"``.
        device: The training device.
        graphs: Whether CUDA graphs replay the decoder layers (they take no per-batch bounds).
        run_blocker: Why the run itself cannot use it (e.g. its objective keeps its own batch layout), or None.

    Returns:
        A few words for the run's start line ("padding-free batches"), or "" when off.

    Raises:
        ConfigError: ``mode == "on"`` but the model or the run cannot (the reason is in the message).
    """
    if mode == "off":
        return ""
    why = run_blocker
    why = why or ("CUDA graphs replay the decoder layers (train.cuda_graphs)" if graphs else None)
    why = why or padding_free_blocker(model)
    if why is not None:
        if mode == "on":
            raise ConfigError(f"train.padding_free is on, but {why}; set it to auto or off")
        return ""
    if mode == "auto" and device.type != "cpu":
        return ""
    enable_padding_free(model)
    return "padding-free batches"


@dataclass(frozen=True)
class FlatBatch:
    """A padded batch as one row of its real tokens.

    Attributes:
        inputs: The model's keyword inputs: ``input_ids`` and ``position_ids`` ``[1, N]`` and the
            examples' bounds for the attention function.
        index: ``[B, T]`` long: the flat position of each padded position's token, -1 on padding.
    """

    inputs: dict[str, Any]
    index: Tensor


def flatten_batch(inputs: dict[str, Tensor], model: nn.Module) -> FlatBatch | None:
    """The one-row, padding-free form of a right-padded or packed batch, for a model made padding-free.

    Plain rows are right-padded (``attention_mask`` 1s then 0s): their real tokens, row after
    row, each row one example. Packed rows (``position_ids`` restarting at 0 per example, no
    mask) keep every position, and each restart begins an example.

    Args:
        inputs: The model's keyword inputs: ``input_ids [B, T]`` and ``attention_mask`` or ``position_ids``.
        model: The model (flattening only pays where :func:`enable_padding_free` was called on it).

    Returns:
        The flat batch, or None where the batch is not of those kinds (left padding, extra
        inputs such as ``token_type_ids``), the model is not padding-free, or there is nothing to gain.
    """
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != ATTENTION:
        return None
    ids, mask, positions = inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("position_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or set(inputs) - {"input_ids", "attention_mask", "position_ids"}:
        return None
    b, t = ids.shape
    if positions is None:  # plain rows: right padding only, one example per row
        if mask is None or mask.shape != ids.shape or not right_padded(mask):
            return None
        real = mask.bool()
        lengths = real.sum(dim=1)
        if int(lengths.min()) == 0 or (b == 1 and int(lengths[0]) == t):
            return None  # an empty row; or one unpadded row: the ordinary pass is this one
        positions = torch.arange(t, device=ids.device).expand(b, t)
        starts = real & (positions == 0)
    else:  # packed rows: every position, an example begins wherever the positions restart
        if mask is not None or positions.shape != ids.shape:
            return None
        real = torch.ones_like(ids, dtype=torch.bool)
        starts = torch.ones_like(real)
        starts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    flat_starts = starts[real].nonzero().flatten().tolist()
    n = int(real.sum())
    index = torch.full((b, t), -1, dtype=torch.long, device=ids.device)
    index[real] = torch.arange(n, device=ids.device)
    flat = {
        "input_ids": ids[real][None],
        "position_ids": positions[real][None],
        _SEGMENTS: (*flat_starts, n),
    }
    return FlatBatch(flat, index)
