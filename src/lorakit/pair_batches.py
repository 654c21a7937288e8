"""Preference pairs as tensors: ``2B`` padded rows (:func:`collate_pairs`) or each prompt once (:func:`pack_pairs`).

Both take tokenized pairs (``{"prompt_ids", "chosen_ids", "rejected_ids"}``, as
:func:`lorakit.pairs.load_pairs` makes them) and are re-exported by :mod:`lorakit.pairs`.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError
from .examples import IGNORE_INDEX, collate

__all__ = ["collate_pairs", "PACKED_ROW_TOKENS", "pack_pairs"]

PACKED_ROW_TOKENS = 256  # pack_pairs: pairs share a row up to this many tokens (attention grows with a row squared)


def collate_pairs(
    pairs: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """One right-padded batch of ``2B`` rows: the chosen sequences, then the rejected ones.

    Args:
        pairs: Tokenized pairs from :func:`lorakit.pairs.load_pairs`.
        pad_token_id: Token id put in padding positions.
        pad_to_multiple_of: Round the padded length up to a multiple of this.

    Returns:
        ``input_ids``, ``labels`` (-100 except on answer tokens) and ``attention_mask``,
        each ``(2B, T)``.

    Raises:
        ConfigError: ``pairs`` is empty.
    """
    if not pairs:
        raise ConfigError("collate_pairs needs at least one pair, got an empty list")
    rows = [
        {"input_ids": p["prompt_ids"] + p[key], "labels": [IGNORE_INDEX] * len(p["prompt_ids"]) + p[key]}
        for key in ("chosen_ids", "rejected_ids")
        for p in pairs
    ]
    return collate(rows, pad_token_id, pad_to_multiple_of)


def pack_pairs(
    pairs: list[dict[str, Any]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    row_tokens: int = PACKED_ROW_TOKENS,
) -> dict[str, torch.Tensor]:
    """A batch of pairs with each prompt once: ``prompt, chosen, rejected`` back to back, pairs packed into rows.

    A pair's tokens are ``[prompt | chosen | rejected]``; the rejected answer's positions
    restart where the chosen one's began (``position_ids``), and
    :func:`lorakit.preference.pair_attention_mask` lets each token see only earlier tokens of
    its own pair, never the chosen answer from the rejected one: every answer token sees
    exactly what it sees in :func:`collate_pairs`' layout, while the prompt is computed once
    instead of twice and there is no padding between pairs. Pairs fill rows of up to
    ``row_tokens`` tokens in order (a longer pair gets its own row); rows are right-padded
    to the longest.

    Args:
        pairs: Tokenized pairs from :func:`lorakit.pairs.load_pairs`.
        pad_token_id: Token id put in padding positions.
        pad_to_multiple_of: Round the row length up to a multiple of this.
        row_tokens: Most tokens of a row holding more than one pair.

    Returns:
        ``input_ids``, ``position_ids``, ``pair_ids`` (the pair of each token, -1 on padding) and
        ``pair_parts`` (0 prompt, 1 chosen, 2 rejected, -1 padding) and ``attention_mask`` (1 on real
        tokens: what a token count reads; the model gets the 4-D mask), each ``(R, T)``; and, per scored
        answer token, ``score_index`` (flat index into ``R * T`` of the position that predicts it),
        ``score_target`` (its id) and ``score_group`` (``i`` for pair ``i``'s chosen answer,
        ``B + i`` for its rejected one).

    Raises:
        ConfigError: ``pairs`` is empty.
    """
    if not pairs:
        raise ConfigError("pack_pairs needs at least one pair, got an empty list")
    b = len(pairs)
    sizes = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    cap = max(row_tokens, max(sizes))
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):  # in order: batches are already length-bucketed
        if rows[-1] and used + n > cap:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    t = max(sum(sizes[i] for i in row) for row in rows)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), t)
    ids, pos = torch.full(shape, pad_token_id, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    pair_ids, parts = torch.full(shape, -1, dtype=torch.long), torch.full(shape, -1, dtype=torch.long)
    index: list[int] = []
    target: list[int] = []
    group: list[int] = []
    for r, row in enumerate(rows):
        o = 0
        for i in row:
            p, c, j = pairs[i]["prompt_ids"], pairs[i]["chosen_ids"], pairs[i]["rejected_ids"]
            n_p, n_c, n_j = len(p), len(c), len(j)
            ids[r, o : o + sizes[i]] = torch.tensor(p + c + j, dtype=torch.long)
            pos[r, o : o + n_p + n_c] = torch.arange(n_p + n_c)
            pos[r, o + n_p + n_c : o + sizes[i]] = torch.arange(n_p, n_p + n_j)
            pair_ids[r, o : o + sizes[i]] = i
            parts[r, o : o + n_p], parts[r, o + n_p : o + n_p + n_c], parts[r, o + n_p + n_c : o + sizes[i]] = 0, 1, 2
            base = r * t + o
            last_prompt = base + n_p - 1  # predicts the first token of either answer
            for answer, start, g in ((c, base + n_p, i), (j, base + n_p + n_c, b + i)):
                # token k of the answer is predicted at start + k - 1; the first one by the prompt's last
                # token (not scored when there is no prompt, as in collate_pairs' shifted labels)
                first = 0 if n_p else 1
                index += [last_prompt if k == 0 else start + k - 1 for k in range(first, len(answer))]
                target += answer[first:]
                group += [g] * (len(answer) - first)
            o += sizes[i]
    return {
        "input_ids": ids,
        "position_ids": pos,
        "pair_ids": pair_ids,
        "pair_parts": parts,
        "attention_mask": (pair_ids >= 0).long(),
        "score_index": torch.tensor(index, dtype=torch.long),
        "score_target": torch.tensor(target, dtype=torch.long),
        "score_group": torch.tensor(group, dtype=torch.long),
    }
