"""Log-probabilities of given tokens under a causal LM, only where they are asked for.

Preference objectives (DPO and kin) score a completion by the sum of its tokens'
log-probabilities, ``log p(y | x) = Σ_t log softmax(W h_t)[y_t]``. As with the
cross-entropy of :mod:`lorakit.losses`, the fp32 logits of every position
(``4 · tokens · V`` bytes; V = 49,152 for SmolLM2) are never held: the head runs
only at completion positions, ``chunk_size`` rows at a time, and each row's
gradient is computed in the same pass::

    logits  = W h_cᵀ                              # [V, C], one chunk only, vocab-major
    logp    = logits[target] − logsumexp(logits)  # [C]
    dh_c    = (onehot − softmax(logits))ᵀ W       # [C, H] = ∂logp_i/∂h_i, saved

A row's log-prob depends on its own hidden state only, so ``∂logp_i/∂h_i`` is a
row of ``[M, H]`` whatever the upstream gradient is: backward scales row ``i`` by
``grad[i]`` and never recomputes a logit. Only a frozen plain head goes this way;
a trained or adapted head (or one with logit scaling) takes the generic path on
the gathered rows.

:func:`completion_logps` puts it together for a batch whose ``labels`` mark the
tokens to score (-100 elsewhere), as :func:`lorakit.examples.collate` builds;
:func:`scored_logps` for any layout that names, per scored token, the position
that predicts it (a prompt shared by two answers: :func:`lorakit.pairs.pack_pairs`).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .precision import compute_dtype, no_autocast

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "token_logprobs",
    "scored_logps",
    "completion_logps",
    "split_head",
    "attends_causally",
    "drop_right_padding_mask",
    "right_padded",
]

DEFAULT_CHUNK_SIZE = 512  # rows per chunk, as lorakit.losses (measured fastest on the project's CPU)
IGNORE_INDEX = -100
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling")
_CAUSAL: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()  # attends_causally, per model


def _chunked_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, cd: torch.dtype, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """``(logp [M] fp32, ∂logp_i/∂h_i [M, H] or None)``, one chunk of logits at a time."""
    acc = torch.promote_types(cd, torch.float32)  # fp32 (fp64 under gradcheck)
    m, dev = targets.numel(), hidden.device
    W = weight.to(cd)  # [V, H]
    vocab = W.shape[0]
    out = torch.empty(m, dtype=acc, device=dev)
    gh = torch.empty_like(hidden) if need_grad else None  # [M, H]
    buf = torch.empty(vocab * max(min(chunk, m), 1), dtype=acc, device=dev)  # one chunk's logits, reused
    for c0 in range(0, m, chunk):
        h = hidden[c0 : c0 + chunk].to(cd)  # [C, H]
        t = targets[None, c0 : c0 + chunk]  # [1, C]
        logits = buf[: vocab * h.shape[0]].view(vocab, h.shape[0])  # [V, C]
        if cd == acc:
            torch.mm(W, h.t(), out=logits)
        else:
            logits.copy_(W @ h.t())  # bf16 matmul, fp32 softmax
        picked = logits.gather(0, t)  # [1, C]
        top = logits.amax(0, keepdim=True)  # [1, C]
        expd = logits.sub_(top).exp_()  # in place: no [V, C] temporary
        norm = expd.sum(0, keepdim=True)  # [1, C]
        out[c0 : c0 + h.shape[0]] = (picked - top - norm.log())[0]
        if need_grad:
            dlogits = expd.mul_(norm.reciprocal_().neg_())  # −softmax
            dlogits.scatter_add_(0, t, torch.ones(t.shape, dtype=acc, device=dev))  # onehot − softmax
            gh[c0 : c0 + h.shape[0]] = (dlogits.to(cd).t() @ W).to(gh.dtype)  # [C, H]
    return out, gh


class _TokenLogprobsFn(torch.autograd.Function):
    """Per-row log-probs; each row's gradient computed in forward, scaled by its upstream gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, cd):
        with no_autocast(hidden.device.type):
            logp, gh = _chunked_logprobs(hidden, weight, targets, chunk, cd, True)
        ctx.save_for_backward(gh)
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        (gh,) = ctx.saved_tensors
        return (gh * grad_logp[:, None].to(gh.dtype)), None, None, None, None


def token_logprobs(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``log softmax(hidden @ head_weightᵀ)[targets]`` per row, without the full logits.

    Memory is one chunk's fp32 logits (``4 · chunk_size · V`` bytes) plus, when a
    gradient will be needed, ``∂logp/∂hidden`` (hidden's size); no ``[M, V]``
    tensor is ever made. The head weight gets no gradient.

    Args:
        hidden: Hidden states ``[M, H]`` of the rows to score (already gathered).
        head_weight: LM head ``[V, H]``; must not require a gradient.
        targets: Token ids ``[M]`` in ``[0, V)``.
        chunk_size: Rows of logits computed at once.
        dtype: Matmul dtype; None means autocast's dtype if on, else hidden's.

    Returns:
        ``[M]`` log-probs in fp32 (fp64 for fp64 inputs), differentiable once w.r.t. ``hidden``.

    Raises:
        ValueError: shapes disagree, ``chunk_size`` < 1, a target is outside the
            vocabulary, or ``head_weight`` requires a gradient while grad mode is on.
    """
    if (
        hidden.dim() != 2
        or targets.shape != hidden.shape[:1]
        or head_weight.dim() != 2
        or head_weight.shape[1] != hidden.shape[1]
    ):
        raise ValueError(
            f"token_logprobs: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)} and "
            f"head_weight {tuple(head_weight.shape)} must be [M, H], [M] and [V, H]"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"token_logprobs: chunk_size must be at least 1, got {chunk_size}")
    vocab = head_weight.shape[0]
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"token_logprobs: a target id is outside the vocabulary [0, {vocab})")
    if torch.is_grad_enabled() and head_weight.requires_grad:
        raise ValueError(
            "token_logprobs: the head weight requires a gradient; score a trained head with "
            "completion_logps, which takes the generic path for it"
        )
    cd = compute_dtype(hidden, dtype)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _TokenLogprobsFn.apply(hidden, head_weight, targets, int(chunk_size), cd)
    with no_autocast(hidden.device.type):
        return _chunked_logprobs(hidden, head_weight, targets, int(chunk_size), cd, False)[0]


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(backbone, head)`` of a transformers causal LM, or None when it cannot be split safely.

    Args:
        model: A causal LM.

    Returns:
        The decoder stack (its output has ``last_hidden_state``) and the output
        head, or None for models without both or whose logits are more than
        ``head(hidden)`` (soft-capping, logit scales).
    """
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if backbone is None or backbone is model or head is None:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_EXTRAS):
        return None
    return backbone, head


def attends_causally(model: nn.Module) -> bool:
    """Whether no attention in ``model`` looks ahead: not encoder-decoder, no bidirectional attention module.

    Args:
        model: A transformers model.

    Returns:
        True when every token sees only the tokens before it (cached per model).
    """
    known = _CAUSAL.get(model)
    if known is None:
        config = getattr(model, "config", None)
        known = not (
            getattr(config, "is_encoder_decoder", False)
            or getattr(config, "use_bidirectional_attention", False)  # Gemma-family embedding models
            or any(vars(m).get("is_causal", getattr(type(m), "is_causal", True)) is False for m in model.modules())
        )
        _CAUSAL[model] = known
    return known


def drop_right_padding_mask(inputs: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``inputs`` without ``attention_mask`` when dropping it changes nothing a label reads.

    Under causal attention a real token sees only the tokens before it, all real when
    the padding is on the right, so the mask changes nothing a label reads; without it
    transformers' SDPA path takes the plain causal kernel, reads grouped K/V heads
    without repeating them and builds no ``[B, 1, T, T]`` mask (see
    :mod:`lorakit.train.lm_loss` for the measured saving). Left or inner padding keeps
    its mask, and so does every model whose attention looks ahead (encoder-decoder,
    ``use_bidirectional_attention``, a module with ``is_causal = False``) or a batch
    with ``token_type_ids`` (prefix-LM masks).

    Args:
        inputs: The model's keyword inputs (``input_ids``, ``attention_mask``, ...).
        model: The model they go to.

    Returns:
        ``inputs`` itself, or a copy without ``attention_mask``.
    """
    mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
    if (
        not isinstance(mask, Tensor)
        or ids is None
        or mask.dim() != 2
        or mask.shape != ids.shape
        or "token_type_ids" in inputs
        or not attends_causally(model)
    ):
        return inputs
    if not right_padded(mask):
        return inputs
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def right_padded(mask: Tensor) -> bool:
    """Whether a ``[B, T]`` padding mask pads only on the right (no 0 followed by a 1 in any row).

    Args:
        mask: 1 on tokens, 0 on padding.

    Returns:
        False for left or inner padding.
    """
    return not bool((mask[:, 1:] > mask[:, :-1]).any())


def scored_logps(
    model: nn.Module,
    inputs: dict[str, Tensor],
    index: Tensor,
    targets: Tensor,
    groups: Tensor,
    n_groups: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Sums of ``log p(targets[i] | hidden state index[i])``, grouped: the head runs only at the scored positions.

    The general form of :func:`completion_logps` for layouts where the position that
    predicts a token is not simply the one before it (a prompt shared by two answers,
    :func:`lorakit.pairs.pack_pairs`).

    Args:
        model: A causal LM (with or without LoRA).
        inputs: The model's keyword inputs (``input_ids`` ``(R, T)``, masks, positions).
        index: ``[M]`` flat indices into the ``R * T`` positions: the hidden state that predicts each token.
        targets: ``[M]`` the predicted token ids.
        groups: ``[M]`` the group (sequence, answer) each token's log-prob is added to, in ``[0, n_groups)``.
        n_groups: Number of groups.
        chunk_size: Rows of the head computed at once.

    Returns:
        ``[n_groups]`` summed log-probs (fp32; fp64 for an fp64 model), differentiable when grad mode
        is on and the model has trainable parameters.
    """
    parts = split_head(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[index]  # (M, V)
        with no_autocast(logits.device.type):
            lp = logits.float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    else:
        backbone, head = parts
        hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (R, T, H)
        picked = hidden.reshape(-1, hidden.shape[-1])[index]  # (M, H)
        plain = type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
        if plain:
            lp = token_logprobs(picked, head.weight, targets, chunk_size)
        else:  # an adapted or trained head: its module on the gathered rows
            logits = head(picked)  # (M, V)
            with no_autocast(logits.device.type):
                logits = logits if logits.dtype == torch.float64 else logits.float()
                lp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    return torch.zeros(n_groups, dtype=lp.dtype, device=lp.device).index_add(0, groups, lp)


def completion_logps(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """Per row, the summed log-probability of the labelled tokens and their count.

    Equal to ``log_softmax(model(...).logits[:, :-1]).gather(labels[:, 1:])`` summed
    over positions whose label is not -100, but the head runs only there.

    Args:
        model: A causal LM (with or without LoRA).
        batch: ``input_ids`` / ``labels`` ``(R, T)`` plus ``attention_mask`` or
            ``position_ids``; any other keys go to the model as they are.
        chunk_size: Rows of the head computed at once.

    Returns:
        ``(logps [R] fp32, tokens [R] long)``: ``logps`` is differentiable when grad
        mode is on and the model has trainable parameters.
    """
    labels = batch["labels"]
    inputs = drop_right_padding_mask({k: v for k, v in batch.items() if k != "labels"}, model)
    rows, t = labels.shape
    keep = labels[:, 1:] != IGNORE_INDEX  # (R, T-1): position p predicts token p+1
    where = keep.nonzero()  # (M, 2): (row, position) of each predicting position
    index = where[:, 0] * t + where[:, 1]
    targets = labels[:, 1:][keep]
    return scored_logps(model, inputs, index, targets, where[:, 0], rows, chunk_size), keep.sum(1)
