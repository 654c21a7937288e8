"""Training data: JSONL rows -> token ids with labels only where the model should learn.

Rows are read and validated by :mod:`lorakit.train.rows` (four formats, one per file:
``chat``, ``prompt_completion``, ``alpaca``, ``text``); its public names are re-exported
here.

Chat rows go through the tokenizer's chat template; loss is taken on every assistant
turn (its content and end marker), found by rendering the conversation prefix by
prefix: the tokens of ``messages[:i]`` with the generation prompt are a prefix of the
tokens of ``messages[:i+1]``, and the difference is assistant turn ``i``. Prompt /
completion and alpaca rows are rendered as a user turn plus an assistant turn when the
tokenizer has a chat template, else as plain prompt + completion + eos. Text rows are
trained on every token, with eos appended. Labels are unshifted (as transformers'
causal-LM loss expects) and -100 where no loss is taken.

Batching, packing and padding live in :mod:`lorakit.train.batching` and are
re-exported here. :func:`load_run_data` puts the pieces together: what a training run
trains and evaluates on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from lorakit.errors import ConfigError, DataError
from lorakit.train.batching import (
    IGNORE_INDEX,
    collate,
    make_batches,
    pack_examples,
    packed_attention_mask,
    split_eval,
)
from lorakit.train.config import DataConfig
from lorakit.train.rows import FORMATS, ROLES, Row, _read, read_rows

__all__ = [
    "FORMATS",
    "ROLES",
    "IGNORE_INDEX",
    "Row",
    "DataStats",
    "read_rows",
    "load_examples",
    "RunData",
    "load_run_data",
    "pack_examples",
    "make_batches",
    "collate",
    "packed_attention_mask",
    "split_eval",
]


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


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text, special=False)


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _chat(
    tokenizer: Any, messages: list[dict[str, str]], train_all: bool, source: str
) -> tuple[list[int], list[int], bool]:
    """Tokenizes a conversation; returns (input_ids, labels, fell_back)."""
    full = _render(tokenizer, messages, False)
    if train_all:
        return full, list(full), False
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    spans = []
    for i in turns:
        start, end = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
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
    full, start = _render(tokenizer, messages[: last + 1], False), _render(tokenizer, messages[:last], True)
    if not _is_prefix(start, full):
        raise DataError(
            f"{source}: the tokenizer's chat template does not render the prompt of assistant turn {last} as a "
            "prefix of the conversation, so the assistant tokens cannot be found; use a template where "
            "render(messages[:i], add_generation_prompt=True) is a prefix of render(messages[:i+1]), "
            "or set train_on_prompt=True"
        )
    return full, [IGNORE_INDEX] * len(start) + full[len(start) :], True


def _tokenize(tokenizer: Any, row: Row, train_all: bool, templated: bool) -> tuple[list[int], list[int], bool]:
    eos = tokenizer.eos_token_id
    if row.text is not None:
        ids = _ids(tokenizer, row.text, special=True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, list(ids), False
    if templated:
        return _chat(tokenizer, row.messages, train_all, row.source)
    prompt = _ids(tokenizer, row.prompt, special=True)
    completion = _ids(tokenizer, row.completion, special=False) + ([eos] if eos is not None else [])
    labels = (prompt if train_all else [IGNORE_INDEX] * len(prompt)) + completion
    return prompt + completion, list(labels), False


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
        format: ``"auto"`` (detected from the first valid row) or one of :data:`FORMATS`.
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
    rows, skipped, fmt, first_skip = _read(path, format, on_error)
    stats = DataStats(skipped=skipped, format=fmt)
    templated = getattr(tokenizer, "chat_template", None) is not None
    if fmt == "chat" and not templated:
        raise DataError(
            f"{path}: chat rows need a tokenizer with a chat template, and this tokenizer has none; "
            "set tokenizer.chat_template (a jinja string) or use prompt/completion rows"
        )
    examples = []
    for row in rows:
        ids, labels, fell_back = _tokenize(tokenizer, row, train_on_prompt, templated)
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


class RunData(NamedTuple):
    """What a training run trains and evaluates on; see :func:`load_run_data`.

    Attributes:
        train_rows: Training examples (packed rows with ``data.packing``).
        eval_rows: Eval examples (packed likewise); empty without eval data.
        eval_batches: Batches of indices into ``eval_rows``, in order; empty without eval data.
        card: ``(split, source, examples)`` per split, for the model card.
    """

    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    eval_batches: list[list[int]]
    card: list[tuple[str, str, int]]


def load_run_data(data: DataConfig, tokenizer: Any, seed: int, batch_size: int,
                  say: Callable[..., Any]) -> RunData:
    """Loads a run's train and eval examples as its ``data`` section says.

    Eval examples come from ``data.eval``, or are held out of the train file
    (``data.eval_fraction``); with ``data.packing`` both sets are packed into rows of at
    most ``data.max_seq_len`` tokens. What was loaded is told through ``say``.

    Args:
        data: The run config's ``data`` section.
        tokenizer: The base model's tokenizer.
        seed: The run seed (held-out split, eval batches).
        batch_size: Rows per eval batch.
        say: ``print`` on the main process, a no-op on the others.

    Returns:
        A :class:`RunData`.

    Raises:
        DataError, ConfigError: as :func:`load_examples`.
    """
    kw = dict(format=data.format, max_seq_len=data.max_seq_len, train_on_prompt=data.train_on_prompt,
              on_error=data.on_error)
    train_rows, stats = load_examples(data.train, tokenizer, **kw)
    say(f"data: {data.train}: {stats.rows:,d} examples ({stats.skipped} skipped, {stats.truncated} truncated "
        f"to {data.max_seq_len} tokens), {stats.tokens:,d} tokens, {stats.label_tokens:,d} with loss")
    eval_rows: list[dict[str, Any]] = []
    data_card = [("train", str(data.train), 0)]
    if data.eval is not None:
        eval_rows, estats = load_examples(data.eval, tokenizer, **kw)
        say(f"data: {data.eval}: {estats.rows:,d} eval examples ({estats.skipped} skipped, "
            f"{estats.truncated} truncated), {estats.tokens:,d} tokens")
        data_card.append(("eval", str(data.eval), len(eval_rows)))
    elif data.eval_fraction > 0:
        train_rows, eval_rows = split_eval(train_rows, data.eval_fraction, seed)
        say(f"data: held out {len(eval_rows)} of them for eval (data.eval_fraction={data.eval_fraction})")
        data_card.append(("eval", f"{data.train} (held out, fraction {data.eval_fraction})", len(eval_rows)))
    data_card[0] = ("train", str(data.train), len(train_rows))
    if data.packing:
        n = len(train_rows)
        train_rows = pack_examples(train_rows, data.max_seq_len)
        eval_rows = pack_examples(eval_rows, data.max_seq_len) if eval_rows else []
        say(f"data: packed {n:,d} examples into {len(train_rows):,d} rows of <= {data.max_seq_len} tokens")
    eval_batches = make_batches(eval_rows, batch_size, seed, 0, shuffle=False) if eval_rows else []
    return RunData(train_rows, eval_rows, eval_batches, data_card)
