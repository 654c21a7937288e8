"""The causal-LM training loss, computed only where there is something to learn, and its padding policy.

A causal LM's output head is a [hidden -> vocab] matmul at every position
(49,152 wide for SmolLM2: about a fifth of the model's FLOPs), yet in chat
fine-tuning most positions are prompt tokens whose labels are -100. Here the
decoder runs as usual, the hidden states of labelled positions are gathered,
and the head plus cross-entropy run on those alone, chunk by chunk
(:func:`lorakit.losses.chunked_cross_entropy`, which also computes the
gradients in the same pass), so the full [tokens, vocab] fp32 logits never
exist.

Models whose head does more than a plain matmul (logit soft-capping, logit
scales, a trained or adapted head) take the generic path: the head module on
the gathered positions, then cross-entropy.

Right-padded batches (what :func:`lorakit.examples.collate` builds) run
without their padding mask: under causal attention a real token only sees the
tokens before it, all real, so the mask changes nothing a label reads, while
without it transformers' SDPA path takes the plain causal kernel and reads
grouped K/V heads without repeating them (``repeat_kv``): the step saves K and V
at their own width (11% fewer saved activation bytes on the short benchmark
batch: 606 -> 541 MB), builds no [B, 1, T, T] mask, and on CUDA can use the
flash kernel. Padding positions then compute on the real tokens before them;
their labels are -100, so nothing reads them. Left or inner padding keeps its mask, and so does every model with
attention that looks ahead (encoder-decoder, ``use_bidirectional_attention``, a
module with ``is_causal = False``) or with ``token_type_ids`` (prefix-LM masks).
That rule and the head split are :mod:`lorakit.logprobs`' (``drop_right_padding_mask``,
``split_head``), shared with the DPO log-probs.

A padding-free model (``train.padding_free``, on for CPU runs: :mod:`lorakit.padding_free`)
skips the padding altogether: the batch's real tokens run as one row, attention once per
example, and the labelled positions are picked from that row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..examples import IGNORE_INDEX
from ..logprobs import drop_right_padding_mask, split_head
from ..losses import DEFAULT_CHUNK_SIZE, chunked_cross_entropy
from ..padding_free import flatten_batch

__all__ = ["causal_lm_loss"]


def causal_lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens (fp32) and their count.

    Equal to ``F.cross_entropy(model(...).logits[:, :-1], labels[:, 1:], reduction="sum")``
    but the head runs only at labelled positions.

    Args:
        model: a causal LM (a transformers ``*ForCausalLM``, possibly with LoRA injected).
        batch: ``input_ids`` / ``labels`` (B, T) plus ``attention_mask`` or ``position_ids``.
        chunk_size: rows of the head computed at once.

    Returns:
        ``(loss_sum, n_tokens)``.
    """
    labels = batch["labels"]
    given = {k: v for k, v in batch.items() if k != "labels"}
    inputs = drop_right_padding_mask(given, model)
    parts = split_head(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        targets = labels[:, 1:]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return loss, int((targets != IGNORE_INDEX).sum())
    backbone, head = parts
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    flat = flatten_batch(given, model)  # a padding-free model: the real tokens as one row (lorakit.padding_free)
    rows = None if flat is None else flat.index[:, :-1][keep]  # (n,): the flat row predicting each label
    if rows is not None and bool((rows >= 0).all()):
        hidden = backbone(**flat.inputs, use_cache=False).last_hidden_state[0]  # (N, H)
        picked = hidden[rows]  # (n, H)
    else:
        hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        picked = hidden[:, :-1][keep]  # (n, H)
    wanted = targets[keep]  # (n,)
    if n == 0:
        return picked.sum().float() * 0.0, 0
    plain = type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
    if plain:
        return chunked_cross_entropy(picked, head.weight, wanted, chunk_size=chunk_size) * n, n
    logits = head(picked)  # (n, V): an adapted or trained head
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits, wanted, reduction="sum"), n
