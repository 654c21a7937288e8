"""The LM head plus cross-entropy, fused, chunked, and only at labelled rows.

A causal LM's head is ``logits = h Wᵀ`` with ``W [V, H]`` (V = 49,152 for
SmolLM2), so the fp32 logits of N rows take ``4·N·V`` bytes, often more than
the rest of the step's activations. :func:`chunked_cross_entropy` never holds
them: it takes the rows that carry a label, ``chunk_size`` at a time, and for
each chunk computes the logits, the loss terms and, when a gradient will be
needed, the gradients right away (Liger-Kernel's "fused linear
cross-entropy"). Within a chunk it walks the vocabulary in blocks of
``vocab_block`` rows of ``W``, with a running maximum ``M`` and sum ``S`` per
row (the online softmax of flash attention), so a block's logits are used while
they are in the cache and no ``[V, C]`` tensor exists::

    L_b  = W_b h_cᵀ                         # [Vb, C], one block of one chunk
    M'   = max(M, max_v L_b);  r = exp(M − M')
    E_b  = exp(L_b − M')                    # in place
    S    = r·S + Σ_v E_b
    G    = r·G + E_bᵀ W_b                   # [C, H]: the softmax's side of dh, unnormalised
    loss = Σ (M + log S − logit[target]);   dh_c = (G / S − W[target]) / M_rows

A trained head's gradient ``dW = (softmax − onehot)ᵀ h / M_rows`` needs the final
``M`` and ``S``, so it is a second pass over the blocks (each block's logits
computed again). Backward then only scales the saved gradients by the upstream
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import precision

__all__ = ["CPU_VOCAB_BLOCK", "chunked_cross_entropy"]

DEFAULT_CHUNK_SIZE = 512  # rows per chunk; measured fastest on CPU, see chunked_cross_entropy
# Vocabulary rows per block on a CPU: a block's logits (2048 x 512 rows x 4 bytes = 4 MiB) stay in the cache from
# its matmul to its gradient's. The head with its input gradient for 437 rows (V = 49,152, H = 576), 2 threads on an
# AMD EPYC (Zen 4): 286-287 ms at 1024-2048, 302 at 4096, against 381 ms before the blocks (a chunk's logits whole)
# (benchmarks/RESULTS.md, "The head in vocabulary blocks"). Elsewhere (GPUs) one block holds the whole vocabulary: the
# same math in the fewest kernel launches.
CPU_VOCAB_BLOCK = 2048


def _in_block(t: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """Targets ``t [1, C]`` as row indices into the block ``[v0, v1)`` (clamped into it) and whether each is in it."""
    local = t - v0
    return local.clamp(0, v1 - v0 - 1), (local >= 0) & (local < v1 - v0)


def _fused_ce(hidden, weight, rows, targets, chunk, cd, need_h, need_w, vocab_block):
    """Loss (and, if asked, the gradients for an upstream gradient of 1) chunk by chunk, block by block.

    Returns:
        ``(loss, grad_hidden [N, H] or None, grad_weight [V, H] fp32 or None)``.
    """
    acc = torch.promote_types(cd, torch.float32)  # fp32 (fp64 under gradcheck)
    dev, m = hidden.device, rows.numel()
    W = weight.to(cd)  # [V, H]
    vocab = W.shape[0]
    vb = min(vocab_block, vocab)
    blocks = [(v0, min(v0 + vb, vocab)) for v0 in range(0, vocab, vb)]
    gh = torch.zeros_like(hidden) if need_h else None  # [N, H]; unlabelled rows stay 0
    gw = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None  # [V, H]
    total = torch.zeros((), dtype=acc, device=dev)
    buf = torch.empty(vb * min(chunk, m), dtype=acc, device=dev)  # one block's logits, reused

    def logits_of(v0, v1, ht):  # [v1 - v0, C] in buf
        out = buf[: (v1 - v0) * ht.shape[1]].view(v1 - v0, ht.shape[1])
        if cd == acc:
            return torch.mm(W[v0:v1], ht, out=out)
        return out.copy_(W[v0:v1] @ ht)  # bf16 matmul, fp32 softmax

    for c0 in range(0, m, chunk):
        idx, t = rows[c0 : c0 + chunk], targets[None, c0 : c0 + chunk]  # [C], [1, C]
        h = hidden.index_select(0, idx).to(cd)  # [C, H]
        ht, n = h.t(), idx.numel()
        top = torch.full((1, n), float("-inf"), dtype=acc, device=dev)  # running max per row
        norm = torch.zeros(1, n, dtype=acc, device=dev)  # running Σ exp(logit − top)
        picked = torch.zeros(1, n, dtype=acc, device=dev)  # the target's logit
        g = torch.zeros(n, h.shape[1], dtype=acc, device=dev) if need_h else None  # Σ exp(logit − top) W_v
        for v0, v1 in blocks:
            logits = logits_of(v0, v1, ht)
            at, inside = _in_block(t, v0, v1)
            picked += logits.gather(0, at).mul_(inside)
            new_top = torch.maximum(top, logits.amax(0, keepdim=True))
            rescale = (top - new_top).exp_()  # [1, C]; 0 on the first block
            expd = logits.sub_(new_top).exp_()  # in place: one exp pass, no temporary
            norm.mul_(rescale).add_(expd.sum(0, keepdim=True))
            if need_h and cd == acc:
                g.mul_(rescale.t()).addmm_(expd.t(), W[v0:v1])
            elif need_h:
                g.mul_(rescale.t()).add_(expd.to(cd).t() @ W[v0:v1])
            top = new_top
        total += (top + norm.log() - picked).sum()  # logsumexp − target logit
        if need_h:  # (softmax − onehot) W / M: the mean's 1/M folded in
            g.div_(norm.t()).sub_(W.index_select(0, t[0]).to(acc)).mul_(1 / m)
            gh.index_copy_(0, idx, g.to(gh.dtype))
        if need_w:  # the final max and sum known: each block again, normalised, into dW = dlogits h
            for v0, v1 in blocks:
                dlogits = logits_of(v0, v1, ht).sub_(top).exp_().div_(norm).mul_(1 / m)  # softmax / M
                at, inside = _in_block(t, v0, v1)
                dlogits.scatter_add_(0, at, inside.to(acc).mul_(-1 / m))  # − onehot / M
                if cd == acc:
                    gw[v0:v1].addmm_(dlogits, h)  # [Vb, H], no temporary
                else:
                    gw[v0:v1] += dlogits.to(cd) @ h
    return total / max(m, 1), gh, gw


class _FusedCEFn(torch.autograd.Function):
    """Mean cross-entropy over selected rows; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk, cd, vocab_block):
        need_h, need_w = ctx.needs_input_grad[:2]
        with precision.no_autocast(hidden.device.type):
            loss, gh, gw = _fused_ce(hidden, weight, rows, targets, chunk, cd, need_h, need_w, vocab_block)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(gh, gw)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        gh, gw = ctx.saved_tensors
        gh = (gh * grad_loss).to(gh.dtype) if gh is not None else None
        gw = (gw * grad_loss).to(ctx.weight_dtype) if gw is not None else None
        return gh, gw, None, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
    vocab_block: int | None = None,
) -> Tensor:
    """Mean token cross-entropy of ``hidden @ head_weightᵀ`` without the full logits.

    ``hidden`` and ``labels`` come already aligned: row ``i`` predicts
    ``labels[i]`` (the caller does the causal shift, e.g.
    ``hidden[:, :-1]`` with ``labels[:, 1:]``). Only rows with a label are
    used; their logits are computed ``chunk_size`` rows at a time in the
    compute dtype, softmax and logsumexp in fp32. When a gradient will be
    needed (grad mode on and ``hidden`` or ``head_weight`` requires grad),
    each chunk's gradients are computed right after its loss, block by block
    of the vocabulary (module docstring), and backward only scales them by
    the upstream gradient: the head matmul runs once per block for the loss,
    once more for ``hidden``'s gradient, and twice more if the head trains
    (its gradient needs the final softmax, so the logits are computed again).
    Memory is one block's fp32 logits, ``4 · chunk_size · vocab_block``
    bytes, plus the saved gradients (``hidden``'s size, and ``head_weight``'s
    in fp32 if the head trains) instead of O(N · V). With no labelled row
    the loss is 0 (not NaN) so an all-masked micro-batch does not poison
    training.

    ``chunk_size`` trades time for that transient. Measured forward+backward
    on the project's 2-core AVX2 CPU (fp32, H = 576, V = 49,152, frozen head):
    512 rows was the fastest (1,000 labelled rows: 1.09 s; 256 rows 8%,
    128 rows 22% and 64 rows 50% slower, as each chunk streams the whole
    113 MB head weight twice; 1,024 rows no faster; measured before the
    vocabulary blocks, with a chunk's logits held whole).

    Args:
        hidden: Final hidden states ``[..., H]``.
        head_weight: LM head ``[V, H]``; gets a gradient only if it requires one.
        labels: Target ids ``[...]`` matching hidden's leading dims.
        chunk_size: Rows per logits chunk.
        ignore_index: Label value that marks a row to skip.
        compute_dtype: Matmul dtype; None means autocast's dtype if on, else hidden's.
        vocab_block: Vocabulary rows per block; None: :data:`CPU_VOCAB_BLOCK` on a CPU, the
            whole vocabulary elsewhere.

    Returns:
        Scalar loss in fp32 (fp64 for fp64 inputs). Differentiable once (no double backward).

    Raises:
        ValueError: shapes of ``hidden``, ``labels`` or ``head_weight`` disagree, ``chunk_size``
            or ``vocab_block`` is below 1, or a label is neither ``ignore_index`` nor in ``[0, V)``.
    """
    h2 = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    lab = labels.reshape(-1)  # [N]
    if lab.numel() != h2.shape[0] or head_weight.dim() != 2 or head_weight.shape[1] != h2.shape[1]:
        raise ValueError(
            f"chunked_cross_entropy: hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)} and "
            f"head_weight {tuple(head_weight.shape)} must be [..., H], [...] and [V, H]"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be at least 1, got {chunk_size}")
    if vocab_block is None:
        vocab_block = CPU_VOCAB_BLOCK if hidden.device.type == "cpu" else head_weight.shape[0]
    if int(vocab_block) < 1:
        raise ValueError(f"chunked_cross_entropy: vocab_block must be at least 1, got {vocab_block}")
    rows = (lab != ignore_index).nonzero().squeeze(1)  # [M]
    targets = lab.index_select(0, rows)  # [M]
    vocab = head_weight.shape[0]
    if bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(
            f"chunked_cross_entropy: label {bad} is outside the vocabulary [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )
    cd = precision.compute_dtype(hidden, compute_dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad):
        return _FusedCEFn.apply(h2, head_weight, rows, targets, int(chunk_size), cd, int(vocab_block))
    with precision.no_autocast(hidden.device.type):  # loss only: one matmul per block, no gradient work
        return _fused_ce(h2, head_weight, rows, targets, int(chunk_size), cd, False, False, int(vocab_block))[0]
