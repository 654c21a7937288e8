"""Training-only batching: packed rows, seed-deterministic length-bucketed batches, the eval split.

Everything here works on example dicts as :func:`lorakit.examples.load_examples`
makes them (``input_ids`` and ``labels``, lists of ints, labels unshifted with -100
where no loss is taken) and needs no tokenizer. Every function is a pure function of
its arguments, so a training run can resume at an (epoch, batch index) position by
calling :func:`make_batches` again. Padding a batch into tensors is
:func:`lorakit.examples.collate` (shared with eval).

Packing and attention. A packed row holds several examples one after the other, with
``position_ids`` restarting at 0 for each. transformers (5.x, ``masking_utils``)
detects this from ``position_ids`` and builds a block-diagonal causal mask, so one
example never attends to another, but only when the model is called with
``attention_mask=None`` *and* without a KV cache (``use_cache=False``; with the
config's default ``use_cache=True`` a cache is created and the detection is silently
skipped). For models or code paths without that detection, pass
:func:`packed_attention_mask` as a 4-D ``attention_mask`` instead.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from lorakit.errors import ConfigError, DataError
from lorakit.examples import IGNORE_INDEX

__all__ = [
    "pack_examples",
    "make_batches",
    "packed_attention_mask",
    "split_eval",
]


def pack_examples(examples: list[dict[str, Any]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Packs examples into rows of at most ``max_seq_len`` tokens (best-fit decreasing).

    Examples are placed longest first, each into the fullest row it still fits in.
    Each packed row gets ``position_ids`` that restart at 0 for every example, and the
    label of each example's first token is set to -100: unpacked, that label is never
    used (nothing precedes it), packed it would teach the model to predict one example
    from the end of another.

    Args:
        examples: Dicts with ``input_ids`` and ``labels`` (equal-length int lists).
        max_seq_len: The most tokens a packed row may hold.

    Returns:
        Packed rows, dicts with ``input_ids``, ``labels`` and ``position_ids``, in a
        deterministic order (a pure function of the examples' lengths and order).

    Raises:
        ConfigError: ``max_seq_len`` is not a positive int.
        DataError: An example is longer than ``max_seq_len`` or is empty.
    """
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n == 0 or n > max_seq_len:
            raise DataError(
                f"example {i} has {n} tokens; packing needs 1..max_seq_len={max_seq_len} tokens per example "
                "(load the examples with the same max_seq_len so they are truncated first)"
            )
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index) of bins with room
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))  # the fullest bin it fits in
        if j < len(free):
            room, b = free.pop(j)
            bins[b].append(i)
        else:
            room, b = max_seq_len, len(bins)
            bins.append([i])
        room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    rows = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            row["input_ids"] += examples[i]["input_ids"]
            row["labels"] += [IGNORE_INDEX] + list(examples[i]["labels"][1:])
            row["position_ids"] += list(range(lengths[i]))
        rows.append(row)
    return rows


def _seeded(seed: int, epoch: int = 0) -> torch.Generator:
    # Distinct streams for (seed, epoch) pairs, unlike seed + epoch (where (1, 0) == (0, 1)).
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


def make_batches(
    examples: list[dict[str, Any]],
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    bucket: bool = True,
    window: int = 50,
) -> list[list[int]]:
    """Splits example indices into batches for one epoch, deterministically.

    The result is a pure function of (example lengths, batch_size, seed, epoch, flags),
    so a resumed run can skip to batch ``k`` of epoch ``e`` by recomputing it.

    With ``bucket``, the (shuffled) order is cut into windows of ``window`` batches;
    each window is sorted by length and chunked into batches, so rows in a batch have
    similar lengths and little padding; the batches are then shuffled again so that
    lengths do not come in order.

    Args:
        examples: Dicts with ``input_ids`` (only their lengths are read).
        batch_size: Rows per batch; the last batch of the epoch may be smaller.
        seed: Run seed.
        epoch: Epoch number (a new order for each epoch).
        shuffle: Shuffle examples and batches. Without it, order is the input order.
        bucket: Group rows of similar length (see above).
        window: Batches per bucketing window.

    Returns:
        A list of batches, each a list of indices into ``examples``.

    Raises:
        ConfigError: ``batch_size`` or ``window`` is not a positive int.
    """
    for name, value in (("batch_size", batch_size), ("window", window)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    n = len(examples)
    g = _seeded(seed, epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    if bucket:
        span = window * batch_size
        windows = [order[w : w + span] for w in range(0, n, span)]
        order = [i for win in windows for i in sorted(win, key=lambda i: len(examples[i]["input_ids"]))]
    batches = [order[b : b + batch_size] for b in range(0, n, batch_size)]
    if shuffle:
        batches = [batches[p] for p in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Builds the 4-D additive block-diagonal causal mask for packed rows.

    A new segment starts wherever a position id is not the previous one plus 1 (the
    rule transformers uses). Works as ``attention_mask`` for both the "eager" and
    "sdpa" attention implementations, which take 4-D masks as given.

    Args:
        position_ids: (B, T) positions restarting at 0 for each packed example.
        dtype: The model's compute dtype.

    Returns:
        (B, 1, T, T) tensor: 0 where query t may attend key s (same segment, s <= t),
        the dtype's most negative value elsewhere.
    """
    first = position_ids[:, :1] - 1
    segment = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)  # (B, T)
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def split_eval(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Holds out a random fraction of the examples for evaluation.

    Args:
        examples: Any list (examples or rows).
        fraction: Share held out, 0 < fraction < 1; at least one row goes each way.
        seed: Seed of the split (the same seed gives the same split).

    Returns:
        ``(train, eval)``, each in the original relative order.

    Raises:
        ConfigError: ``fraction`` is outside (0, 1) or there are fewer than 2 examples.
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"eval fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    n = len(examples)
    if n < 2:
        raise ConfigError(f"cannot hold out an eval split from {n} example(s); need at least 2")
    n_eval = min(n - 1, max(1, round(n * fraction)))
    held = set(torch.randperm(n, generator=_seeded(seed)).tolist()[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals
