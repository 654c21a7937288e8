"""Rows -> training examples: token ids, and labels only where the model should learn.

Training (:mod:`lorakit.train`) and eval (:mod:`lorakit.evaluation`) tokenize data the
same way, through :func:`load_examples`; :func:`collate` pads examples into tensors.
Rows are read and validated by :mod:`lorakit.rows` (four formats, one per file:
``chat``, ``prompt_completion``, ``alpaca``, ``text``).

Chat rows go through the tokenizer's chat template (:func:`render_chat`); loss is taken
on every assistant turn (its content and end marker), found by rendering the
conversation prefix by prefix: the tokens of ``messages[:i]`` with the generation prompt
are a prefix of the tokens of ``messages[:i+1]``, and the difference is assistant turn
``i``. Prompt / completion and alpaca rows are rendered as a user turn plus an assistant
turn when the tokenizer has a chat template, else as plain prompt + completion + eos.
Text rows are trained on every token, with eos appended. Labels are unshifted (as
transformers' causal-LM loss expects) and -100 (:data:`IGNORE_INDEX`) where no loss is
taken. :func:`tokenize_row` does this for one row.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lorakit.errors import ConfigError, DataError
from lorakit.rows import Row, read_row_file

__all__ = [
    "IGNORE_INDEX",
    "DataStats",
    "TokenizedRow",
    "render_chat",
    "tokenize_row",
    "load_examples",
    "collate",
]

IGNORE_INDEX = -100
"""Label value that the loss ignores (PyTorch's ``CrossEntropyLoss`` default)."""


@dataclass
class DataStats:
    """What :func:`load_examples` did with a file.

    Attributes:
        rows: Examples returned.
        skipped: Malformed rows skipped (``on_error="skip"``).
        truncated: Examples cut to ``max_seq_len`` tokens.
        dropped_no_labels: Examples dropped because no label token was left.
        tokens: Tokens in the returned examples.
        label_tokens: Tokens with a loss (label != -100).
        format: The row format of the file.
        template_fallbacks: Chat rows where the template broke the prefix property,
            so only the final assistant turn was trained.
    """

    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    label_tokens: int = 0
    format: str = ""
    template_fallbacks: int = 0


class TokenizedRow(NamedTuple):
    """One row as tokens; see :func:`tokenize_row`.

    Attributes:
        input_ids: The token ids.
        labels: Same length; the token id where a loss is taken, else :data:`IGNORE_INDEX`.
        fell_back: The chat template broke the prefix property, so only the final
            assistant turn is labelled.
    """

    input_ids: list[int]
    labels: list[int]
    fell_back: bool


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template.

    Args:
        tokenizer: A transformers tokenizer with ``chat_template`` set.
        messages: ``[{"role", "content"}, ...]``.
        generation_prompt: Append the template's assistant header (what a model answers after).

    Returns:
        The ids, without extra special tokens (the template writes its own).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text, special=False)


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _chat(
    tokenizer: Any, messages: list[dict[str, str]], train_all: bool, source: str
) -> tuple[list[int], list[int], bool]:
    """Tokenizes a conversation; returns (input_ids, labels, fell_back)."""
    full = render_chat(tokenizer, messages, False)
    if train_all:
        return full, list(full), False
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    spans = []
    for i in turns:
        start, end = render_chat(tokenizer, messages[:i], True), render_chat(tokenizer, messages[: i + 1], False)
        if not (_is_prefix(start, end) and _is_prefix(end, full)):
            break
        spans.append((len(start), len(end)))
    else:
        labels = [IGNORE_INDEX] * len(full)
        for a, b in spans:
            labels[a:b] = full[a:b]
        return full, labels, False
    # The template renders earlier turns differently once later turns exist (e.g. it
    # strips reasoning from old turns): train only the final assistant turn.
    last = turns[-1]
    full, start = render_chat(tokenizer, messages[: last + 1], False), render_chat(tokenizer, messages[:last], True)
    if not _is_prefix(start, full):
        raise DataError(
            f"{source}: the tokenizer's chat template does not render the prompt of assistant turn {last} as a "
            "prefix of the conversation, so the assistant tokens cannot be found; use a template where "
            "render(messages[:i], add_generation_prompt=True) is a prefix of render(messages[:i+1]), "
            "or set train_on_prompt=True"
        )
    return full, [IGNORE_INDEX] * len(start) + full[len(start) :], True


def tokenize_row(tokenizer: Any, row: Row, *, train_on_prompt: bool = False) -> TokenizedRow:
    """Tokenizes one row, with labels only where the model should learn (see the module doc).

    Args:
        tokenizer: A transformers tokenizer; with a ``chat_template``, chat / prompt_completion /
            alpaca rows are rendered with it.
        row: A row from :mod:`lorakit.rows` (a chat row needs a tokenizer with a chat template).
        train_on_prompt: Label every token, not only assistant turns / completions.

    Returns:
        A :class:`TokenizedRow` (not truncated).

    Raises:
        DataError: A chat row meets a tokenizer without a chat template, or the template does
            not render a conversation's prompt as a prefix of it (so the assistant tokens
            cannot be found).
    """
    eos = tokenizer.eos_token_id
    if row.text is not None:
        ids = _ids(tokenizer, row.text, special=True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return TokenizedRow(ids, list(ids), False)
    if getattr(tokenizer, "chat_template", None) is not None:
        return TokenizedRow(*_chat(tokenizer, row.messages, train_on_prompt, row.source))
    if row.prompt is None:
        raise DataError(
            f"{row.source}: chat rows need a tokenizer with a chat template, and this tokenizer has "
            "none; set tokenizer.chat_template (a jinja string) or use prompt/completion rows"
        )
    prompt = _ids(tokenizer, row.prompt, special=True)
    completion = _ids(tokenizer, row.completion, special=False) + ([eos] if eos is not None else [])
    labels = (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + completion
    return TokenizedRow(prompt + completion, list(labels), False)


def load_examples(
    path: str | Path,
    tokenizer: Any,
    *,
    format: str = "auto",
    max_seq_len: int = 512,
    train_on_prompt: bool = False,
    on_error: str = "raise",
) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Reads a JSONL file and tokenizes it into training examples.

    Args:
        path: The JSONL file.
        tokenizer: A transformers tokenizer (``chat_template`` set for chat rows).
        format: ``"auto"`` (detected from the first valid row) or one of :data:`lorakit.rows.FORMATS`.
        max_seq_len: Examples longer than this are cut, keeping the beginning.
        train_on_prompt: Take the loss on every token, not only assistant turns /
            completions.
        on_error: ``"raise"`` on the first malformed row, or ``"skip"`` such rows
            (counted in the stats and warned once).

    Returns:
        ``(examples, stats)``: each example is ``{"input_ids": [...], "labels": [...]}``
        (equal-length int lists, labels -100 where no loss is taken); examples with no
        label left after truncation are dropped.

    Raises:
        DataError: The file is missing, a row is malformed (``file:line``, what is
            wrong, what was expected), chat rows meet a tokenizer without a chat
            template, or no example is left.
        ConfigError: ``format``, ``on_error`` or ``max_seq_len`` is not allowed.
    """
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    rows, fmt, skipped, first_skip = read_row_file(path, format, on_error)
    stats = DataStats(skipped=skipped, format=fmt)
    templated = getattr(tokenizer, "chat_template", None) is not None
    if fmt == "chat" and not templated:
        raise DataError(
            f"{path}: chat rows need a tokenizer with a chat template, and this tokenizer has none; "
            "set tokenizer.chat_template (a jinja string) or use prompt/completion rows"
        )
    examples = []
    for row in rows:
        ids, labels, fell_back = tokenize_row(tokenizer, row, train_on_prompt=train_on_prompt)
        stats.template_fallbacks += fell_back
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            stats.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped_no_labels += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.tokens += len(ids)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in labels)
    stats.rows = len(examples)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed row(s); first: {first_skip}", stacklevel=2)
    if stats.template_fallbacks:
        warnings.warn(
            f"{path}: the chat template renders earlier turns differently once later turns exist; trained only "
            f"the final assistant turn of {stats.template_fallbacks} multi-turn row(s)",
            stacklevel=2,
        )
    if not examples:
        raise DataError(
            f"{path}: no examples left ({stats.dropped_no_labels} had no label tokens within "
            f"max_seq_len={max_seq_len}, {skipped} malformed skipped); raise max_seq_len or check the rows"
        )
    return examples, stats


def collate(
    rows: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pads rows into a batch of tensors.

    Args:
        rows: Example dicts (``input_ids``, ``labels``) or packed rows (those plus
            ``position_ids``); one kind per batch.
        pad_token_id: Token id put in padding positions.
        pad_to_multiple_of: Round the padded length up to a multiple of this (8 or 16
            keeps the number of distinct shapes, and so kernel builds, small).

    Returns:
        ``input_ids`` (B, T) long, ``labels`` (B, T) long with -100 on padding, and
        either ``attention_mask`` (B, T) long (1 on tokens, 0 on padding) for plain
        rows, or ``position_ids`` (B, T) long for packed rows (padding is its own
        segment, positions from 0). Packed batches carry no attention mask: call the
        model with ``use_cache=False`` so transformers builds the block-diagonal mask
        from ``position_ids`` (or pass :func:`lorakit.train.batching.packed_attention_mask`).

    Raises:
        ConfigError: ``rows`` is empty or ``pad_to_multiple_of`` is not a positive int.
        DataError: Packed and unpacked rows are mixed, or a row's fields differ in length.
    """
    if not rows:
        raise ConfigError("collate needs at least one row, got an empty list")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ConfigError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
    packed = {"position_ids" in r for r in rows}
    if len(packed) > 1:
        raise DataError("a batch mixes packed rows (with position_ids) and unpacked rows; pack all or none")
    packed_batch = packed.pop()
    keys = ("input_ids", "labels", "position_ids") if packed_batch else ("input_ids", "labels")
    t = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        t = math.ceil(t / pad_to_multiple_of) * pad_to_multiple_of
    b = len(rows)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    extra = torch.arange(t).repeat(b, 1) if packed_batch else torch.zeros((b, t), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        if any(len(r[k]) != n for k in keys):
            raise DataError(f"row {i} has fields of different lengths: " + ", ".join(f"{k}={len(r[k])}" for k in keys))
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        if packed_batch:
            extra[i, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
            extra[i, n:] = torch.arange(t - n)  # padding: a segment of its own
        else:
            extra[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed_batch else "attention_mask"): extra}
