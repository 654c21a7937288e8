"""Preference pairs: JSONL rows of a prompt, a preferred and a rejected answer, tokenized.

A row is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` in one of two forms
(TRL's names and layouts):

- strings: ``{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I can't."}``
- conversational: ``prompt`` a list of chat messages, ``chosen`` / ``rejected`` an
  assistant message list or a plain assistant string::

      {"prompt": [{"role": "user", "content": "Name a colour."}],
       "chosen": [{"role": "assistant", "content": "Blue."}],
       "rejected": [{"role": "assistant", "content": "I can't."}]}

Tokenizing follows TRL's ``DPOTrainer`` (1.16): the prompt is rendered with the chat
template and its generation prompt, prompt + answer without it, and the answer is
what follows their common prefix (with the template's end-of-turn marker). String
rows go through the chat template as one user turn and one assistant turn when the
tokenizer has one, as lorakit's prompt / completion rows do; without a template
they are plain text with eos appended to each answer (TRL's non-conversational form).

Truncation is TRL's ``keep_start``: a prompt longer than ``max_prompt_len`` keeps its
first ``max_prompt_len`` tokens, then prompt + answer keeps its first ``max_seq_len``
tokens; both are counted in :class:`PairStats`. A pair with nothing of an answer left
is an error with its ``file:line`` (TRL drops it silently).

A tokenized pair is a dict ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (answer
ids after truncation) plus ``input_ids``: the longer of the two full sequences, which
is what length bucketing (:func:`lorakit.train.batching.make_batches`) reads.
:func:`collate_pairs` makes one batch of ``2B`` rows, the chosen sequences first
(TRL's concatenated layout), labels -100 except on answer tokens. :func:`pack_pairs`
lays the same pairs out with each prompt once and no padding between pairs (the
layout :func:`lorakit.preference.pair_logps` scores with a prefix-sharing mask). Both
live in :mod:`lorakit.pair_batches` and are re-exported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .examples import render_chat
from .pair_batches import PACKED_ROW_TOKENS, collate_pairs, pack_pairs
from .rows import RowError, parse_messages, read_jsonl

__all__ = [
    "PAIR_KEYS",
    "PairRow",
    "PairStats",
    "parse_pair",
    "read_pairs",
    "tokenize_pair",
    "load_pairs",
    "collate_pairs",
    "PACKED_ROW_TOKENS",
    "pack_pairs",
    "first_pair_line",
]

PAIR_KEYS = ("prompt", "chosen", "rejected")
_EXPECTED = (
    '{"prompt": ..., "chosen": ..., "rejected": ...} with strings, or prompt a list of chat messages '
    "and chosen / rejected assistant messages or strings"
)
_SFT_KEYS = ("messages", "completion", "instruction", "output", "text")


@dataclass(frozen=True)
class PairRow:
    """One preference row, validated.

    Attributes:
        source: ``"file:line"`` of the row, for messages.
        prompt: The prompt as chat messages (conversational rows) or a string.
        chosen: The preferred answer: assistant messages, or a string.
        rejected: The rejected answer, in the same form as ``chosen``.
    """

    source: str
    prompt: list[dict[str, str]] | str
    chosen: list[dict[str, str]] | str
    rejected: list[dict[str, str]] | str

    @property
    def conversational(self) -> bool:
        """True when the prompt is a list of messages."""
        return isinstance(self.prompt, list)


@dataclass
class PairStats:
    """What :func:`load_pairs` did with a file.

    Attributes:
        rows: Pairs returned.
        skipped: Malformed rows skipped (``on_error="skip"``).
        prompt_truncated: Prompts cut to ``max_prompt_len`` tokens.
        truncated: Sequences (chosen or rejected) cut to ``max_seq_len`` tokens.
        tokens: Tokens of all chosen and rejected sequences.
        completion_tokens: Answer tokens (those scored).
    """

    rows: int = 0
    skipped: int = 0
    prompt_truncated: int = 0
    truncated: int = 0
    tokens: int = 0
    completion_tokens: int = 0


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _answer(obj: dict[str, Any], key: str, conversational: bool) -> list[dict[str, str]] | str:
    value = obj[key]
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}] if conversational else value
    if not isinstance(value, list):
        raise RowError(f"{key!r} must be a string or a list of assistant messages, got {_short(value)}")
    if not conversational:
        raise RowError(
            f"{key!r} is a message list but 'prompt' is a string; give the prompt as messages too, "
            "or both answers as strings"
        )
    messages = parse_messages(value)
    if any(m["role"] != "assistant" for m in messages):
        raise RowError(f"{key!r} must hold assistant messages only, got roles {[m['role'] for m in messages]}")
    return messages


def parse_pair(obj: dict[str, Any], source: str) -> PairRow:
    """Validates one JSON object as a preference row (see the module doc).

    Args:
        obj: The row's JSON object.
        source: Its ``"file:line"``.

    Returns:
        The :class:`PairRow`.

    Raises:
        RowError: a key is missing, a value has the wrong type, the row is an SFT row,
            or chosen and rejected are identical.
    """
    missing = [k for k in PAIR_KEYS if k not in obj]
    if missing:
        sft = [k for k in _SFT_KEYS if k in obj]
        if sft:
            raise RowError(
                f"this is a supervised (SFT) row with keys {sorted(obj)}, but method: dpo needs "
                f"{_EXPECTED}; train it with method: sft, or convert it to pairs"
            )
        raise RowError(f"missing key(s) {', '.join(map(repr, missing))}; a preference row needs {_EXPECTED}")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        prompt = parse_messages(prompt)
    elif not isinstance(prompt, str):
        raise RowError(f"'prompt' must be a string or a list of chat messages, got {_short(prompt)}")
    conversational = isinstance(prompt, list)
    chosen, rejected = _answer(obj, "chosen", conversational), _answer(obj, "rejected", conversational)
    if chosen == rejected:
        raise RowError("'chosen' and 'rejected' are identical; a pair must prefer one answer over a different one")
    return PairRow(source, prompt, chosen, rejected)


def read_pairs(path: str | Path, on_error: str = "raise") -> tuple[list[PairRow], int, str | None]:
    """Reads and validates a JSONL file of preference rows.

    Args:
        path: The JSONL file.
        on_error: ``"raise"`` on the first malformed row, or ``"skip"`` it.

    Returns:
        ``(rows, skipped, first skip message or None)``.

    Raises:
        DataError: the file is missing, a row is malformed (``file:line``), or none is valid.
        ConfigError: ``on_error`` is not ``"raise"`` or ``"skip"``.
    """
    records = read_jsonl(path, parse_pair, on_error=on_error, expected=_EXPECTED)
    return records.items, records.skipped, records.first_skip


def first_pair_line(path: str | Path) -> int:
    """The line of a JSONL file's first row when that row is a preference pair, else 0.

    A row is a pair when it has ``chosen`` and ``rejected`` keys. Unreadable files,
    files without rows and files whose first row is something else give 0.

    Args:
        path: The file.

    Returns:
        The 1-based line number of the first row, or 0.
    """
    try:
        with Path(path).open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    obj = json.loads(line)
                    return lineno if isinstance(obj, dict) and "chosen" in obj and "rejected" in obj else 0
    except (OSError, ValueError):
        return 0
    return 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _as_messages(value: list[dict[str, str]] | str, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def tokenize_pair(tokenizer: Any, row: PairRow) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` of one row, untruncated (see the module doc).

    Args:
        tokenizer: A transformers tokenizer; its chat template is used when it has one.
        row: The row.

    Returns:
        The prompt's ids and each answer's ids (what follows the prompt).

    Raises:
        DataError: conversational rows meet a tokenizer without a chat template.
    """
    templated = getattr(tokenizer, "chat_template", None) is not None
    if row.conversational or templated:
        if not templated:
            raise DataError(
                f"{row.source}: conversational rows need a tokenizer with a chat template, and this "
                "tokenizer has none; set tokenizer.chat_template or give prompt and answers as strings"
            )
        prompt = _as_messages(row.prompt, "user")
        prompt_ids = render_chat(tokenizer, prompt, True)
        full_c = render_chat(tokenizer, prompt + _as_messages(row.chosen, "assistant"), False)
        full_r = render_chat(tokenizer, prompt + _as_messages(row.rejected, "assistant"), False)
    else:
        eos = tokenizer.eos_token or ""
        chosen, rejected = (a if a.endswith(eos) else a + eos for a in (row.chosen, row.rejected))
        prompt_ids = _ids(tokenizer, row.prompt)
        full_c, full_r = _ids(tokenizer, row.prompt + chosen), _ids(tokenizer, row.prompt + rejected)
    # The answer starts where prompt and prompt + answer diverge (TRL: not always after the whole prompt).
    n = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
    return prompt_ids[:n], full_c[n:], full_r[n:]


def load_pairs(
    path: str | Path,
    tokenizer: Any,
    *,
    max_seq_len: int = 1024,
    max_prompt_len: int | None = None,
    on_error: str = "raise",
) -> tuple[list[dict[str, list[int]]], PairStats]:
    """Reads a preference JSONL file and tokenizes it into pairs, truncated as TRL's ``keep_start``.

    Args:
        path: The JSONL file.
        tokenizer: The model's tokenizer.
        max_seq_len: Most tokens of prompt + answer.
        max_prompt_len: Most prompt tokens (None: only ``max_seq_len`` limits).
        on_error: ``"raise"`` on the first malformed row, or ``"skip"`` such rows.

    Returns:
        ``(pairs, stats)``: each pair ``{"prompt_ids", "chosen_ids", "rejected_ids", "input_ids"}``
        (see the module doc).

    Raises:
        DataError: the file is missing or a row is malformed, or nothing of an answer
            is left after truncation (``file:line``).
        ConfigError: ``max_seq_len`` / ``max_prompt_len`` are not allowed.
    """
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    if max_prompt_len is not None and (not isinstance(max_prompt_len, int) or max_prompt_len < 1):
        raise ConfigError(f"max_prompt_len must be a positive int or None, got {max_prompt_len!r}")
    rows, skipped, _ = read_pairs(path, on_error)
    stats = PairStats(skipped=skipped)
    pairs = []
    for row in rows:
        prompt_ids, chosen, rejected = tokenize_pair(tokenizer, row)
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            if not ids:
                raise DataError(f"{row.source}: the {name} answer has no tokens after the prompt; give it some text")
        if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
            prompt_ids = prompt_ids[:max_prompt_len]
            stats.prompt_truncated += 1
        room = max_seq_len - len(prompt_ids)
        if room < 1:
            limit = f"max_prompt_len={max_prompt_len}" if max_prompt_len is not None else "no max_prompt_len"
            raise DataError(
                f"{row.source}: the prompt is {len(prompt_ids)} tokens ({limit}), so nothing of the answers fits in "
                f"max_seq_len={max_seq_len}; raise data.max_seq_len or set data.max_prompt_len below it"
            )
        for ids in (chosen, rejected):
            stats.truncated += len(ids) > room
        chosen, rejected = chosen[:room], rejected[:room]
        longer = chosen if len(chosen) >= len(rejected) else rejected
        pairs.append(
            {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "input_ids": prompt_ids + longer}
        )
        stats.tokens += 2 * len(prompt_ids) + len(chosen) + len(rejected)
        stats.completion_tokens += len(chosen) + len(rejected)
    stats.rows = len(pairs)
    return pairs, stats
