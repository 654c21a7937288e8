"""Training data: JSONL rows -> token ids with labels only where the model should learn.

Four row formats, one per file (``format="auto"`` picks it from the first valid row):

- ``chat``: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``
- ``alpaca``: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``
- ``text``: ``{"text": "..."}``

Chat rows go through the tokenizer's chat template; loss is taken on every assistant
turn (its content and end marker), found by rendering the conversation prefix by
prefix: the tokens of ``messages[:i]`` with the generation prompt are a prefix of the
tokens of ``messages[:i+1]``, and the difference is assistant turn ``i``. Prompt /
completion and alpaca rows are rendered as a user turn plus an assistant turn when the
tokenizer has a chat template, else as plain prompt + completion + eos. Text rows are
trained on every token, with eos appended. Labels are unshifted (as transformers'
causal-LM loss expects) and -100 where no loss is taken.

Batching, packing and padding live in :mod:`lorakit.train.batching` and are
re-exported here.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, DataError
from lorakit.train.batching import (
    IGNORE_INDEX,
    collate,
    make_batches,
    pack_examples,
    packed_attention_mask,
    split_eval,
)

__all__ = [
    "FORMATS",
    "ROLES",
    "IGNORE_INDEX",
    "Row",
    "DataStats",
    "read_rows",
    "load_examples",
    "pack_examples",
    "make_batches",
    "collate",
    "packed_attention_mask",
    "split_eval",
]

FORMATS = ("chat", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant", "tool")

_EXPECTED = (
    'one of {"messages": [{"role": ..., "content": ...}, ...]}, {"prompt": ..., "completion": ...}, '
    '{"instruction": ..., "input": ... (optional), "output": ...}, {"text": ...}'
)
_REQUIRED = {
    "chat": "'messages'",
    "prompt_completion": "'prompt' and 'completion'",
    "alpaca": "'instruction', 'output' and optionally 'input'",
    "text": "'text'",
}
_ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


@dataclass(frozen=True)
class Row:
    """One data row, normalized.

    Attributes:
        source: ``"file:line"`` of the row, for messages.
        format: One of :data:`FORMATS`.
        messages: The conversation (chat), or a user turn plus an assistant turn
            (prompt_completion, alpaca); None for text rows.
        prompt: Plain-text prompt used when the tokenizer has no chat template
            (prompt_completion, alpaca; alpaca in the Stanford Alpaca layout).
        completion: The reference answer (prompt_completion, alpaca).
        text: The text of a text row.
    """

    source: str
    format: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    @property
    def prompt_messages(self) -> list[dict[str, str]] | None:
        """The conversation up to the final assistant turn (what an eval would send)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def reference(self) -> str | None:
        """The final assistant turn's content, or the completion; None if there is none."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return self.completion


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


class _RowError(Exception):
    """A malformed row; becomes a DataError, or a skip."""


def _detect(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def _string(obj: dict[str, Any], key: str, fmt: str, optional: bool = False) -> str:
    if key not in obj:
        if optional:
            return ""
        raise _RowError(f"missing key {key!r}; a {fmt} row needs keys {_REQUIRED[fmt]}")
    value = obj[key]
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise _RowError(f"{key!r} must be a string, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _RowError(f"'messages' must be a non-empty list of {{role, content}} objects, got {_short(value)}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _RowError(f"messages[{j}] must be an object with 'role' and 'content', got {_short(m)}")
        if m["role"] not in ROLES:
            raise _RowError(f"messages[{j}] has unknown role {_short(m['role'])}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise _RowError(f"messages[{j}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _parse(obj: dict[str, Any], fmt: str, source: str) -> Row:
    if fmt == "chat":
        if "messages" not in obj:
            raise _RowError(f"missing key 'messages'; a chat row needs keys {_REQUIRED['chat']}")
        return Row(source, fmt, messages=_messages(obj["messages"]))
    if fmt == "text":
        return Row(source, fmt, text=_string(obj, "text", fmt))
    if fmt == "prompt_completion":
        prompt, completion = _string(obj, "prompt", fmt), _string(obj, "completion", fmt)
        user = prompt
    else:
        instruction, completion = _string(obj, "instruction", fmt), _string(obj, "output", fmt)
        context = _string(obj, "input", fmt, optional=True)
        user = instruction + (f"\n\n{context}" if context else "")
        prompt = _ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if context else "",
            instruction=instruction,
            input=f"### Input:\n{context}\n\n" if context else "",
        )
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": completion}]
    return Row(source, fmt, messages=messages, prompt=prompt, completion=completion)


def _read(path: str | Path, format: str, on_error: str) -> tuple[list[Row], int, str, str | None]:
    """Returns (rows, skipped, format, first skip message)."""
    if format not in ("auto", *FORMATS):
        raise ConfigError(f"data format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a JSONL file with one JSON object per line")
    fmt, detected_at = (None, None) if format == "auto" else (format, None)
    rows: list[Row] = []
    skipped, first_skip = 0, None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _RowError(f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line")
                if not isinstance(obj, dict):
                    raise _RowError(f"expected a JSON object, got {type(obj).__name__}: {_short(obj)}")
                kind = _detect(obj)
                if fmt is None:
                    if kind is None:
                        raise _RowError(f"row has keys {sorted(obj)}; expected {_EXPECTED}")
                    fmt, detected_at = kind, lineno
                elif kind != fmt and detected_at is not None:
                    found = f"a {kind} row" if kind else f"keys {sorted(obj)}"
                    raise _RowError(
                        f"found {found}, but this file is {fmt} (detected from line {detected_at}); "
                        f"every row must have {_REQUIRED[fmt]}"
                    )
                rows.append(_parse(obj, fmt, source))
            except _RowError as e:
                if on_error == "raise":
                    raise DataError(f"{source}: {e}") from None
                skipped += 1
                first_skip = first_skip or f"{source}: {e}"
    if not rows:
        raise DataError(f"{path}: no valid rows ({skipped} malformed skipped); expected {_EXPECTED}")
    return rows, skipped, fmt, first_skip


def read_rows(path: str | Path, format: str = "auto", on_error: str = "raise") -> list[Row]:
    """Reads and validates a JSONL data file without tokenizing it.

    Args:
        path: The JSONL file.
        format: ``"auto"`` or one of :data:`FORMATS`.
        on_error: ``"raise"`` on the first malformed row, or ``"skip"`` it (warned once).

    Returns:
        The rows, normalized (see :class:`Row`; ``prompt_messages`` and ``reference``
        give what an eval needs).

    Raises:
        DataError: The file is missing, a row is malformed (with ``file:line``), or no
            valid row is left.
        ConfigError: ``format`` or ``on_error`` is not an allowed value.
    """
    rows, skipped, _, first = _read(path, format, on_error)
    if skipped:
        warnings.warn(f"skipped {skipped} malformed row(s); first: {first}", stacklevel=2)
    return rows


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
