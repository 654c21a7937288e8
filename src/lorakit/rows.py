"""Data files: JSONL rows, read and validated, not yet tokenized.

Training (:mod:`lorakit.train`) and eval (:mod:`lorakit.evaluation`) read the same
files through :func:`read_row_file` / :func:`read_rows`. Four row formats, one per file
(``format="auto"`` picks it from the first valid row):

- ``chat``: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``
- ``alpaca``: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``
- ``text``: ``{"text": "..."}``

A malformed row is reported with its ``file:line``, what is wrong and what was
expected, or skipped (``on_error="skip"``). Other row kinds (e.g. preference pairs)
reuse the same reader: :func:`read_jsonl` takes a parse function that turns one JSON
object into a row or raises :class:`RowError`, and :func:`parse_messages` validates a
conversation. Tokenizing rows is :mod:`lorakit.examples`' job.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lorakit.errors import ConfigError, DataError

__all__ = [
    "FORMATS",
    "ROLES",
    "Row",
    "RowError",
    "RowFile",
    "JsonlRecords",
    "parse_messages",
    "read_jsonl",
    "read_row_file",
    "read_rows",
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


class RowError(Exception):
    """A malformed row: what is wrong and what was expected.

    Raised by the parse functions given to :func:`read_jsonl`, which adds the row's
    ``file:line`` and turns it into a :class:`~lorakit.errors.DataError` (or a skip).
    """


class JsonlRecords(NamedTuple):
    """What :func:`read_jsonl` read.

    Attributes:
        items: One parsed row per valid line, in file order.
        skipped: Malformed lines skipped (``on_error="skip"``).
        first_skip: ``"file:line: what is wrong"`` of the first skipped line, or None.
    """

    items: list[Any]
    skipped: int
    first_skip: str | None


class RowFile(NamedTuple):
    """What :func:`read_row_file` read.

    Attributes:
        rows: The valid rows, normalized.
        format: The file's row format, one of :data:`FORMATS`.
        skipped: Malformed rows skipped (``on_error="skip"``).
        first_skip: ``"file:line: what is wrong"`` of the first skipped row, or None.
    """

    rows: list[Row]
    format: str
    skipped: int
    first_skip: str | None


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
        raise RowError(f"missing key {key!r}; a {fmt} row needs keys {_REQUIRED[fmt]}")
    value = obj[key]
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_messages(value: Any) -> list[dict[str, str]]:
    """Validates a conversation: a non-empty list of ``{"role", "content"}`` objects.

    Args:
        value: The JSON value of a row's ``messages`` key.

    Returns:
        The messages as ``{"role", "content"}`` dicts (other keys dropped).

    Raises:
        RowError: ``value`` is not a non-empty list, a message lacks ``role`` or
            ``content``, a role is not one of :data:`ROLES`, or a content is not a string.
    """
    if not isinstance(value, list) or not value:
        raise RowError(f"'messages' must be a non-empty list of {{role, content}} objects, got {_short(value)}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"messages[{j}] must be an object with 'role' and 'content', got {_short(m)}")
        if m["role"] not in ROLES:
            raise RowError(f"messages[{j}] has unknown role {_short(m['role'])}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f"messages[{j}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _parse(obj: dict[str, Any], fmt: str, source: str) -> Row:
    if fmt == "chat":
        if "messages" not in obj:
            raise RowError(f"missing key 'messages'; a chat row needs keys {_REQUIRED['chat']}")
        return Row(source, fmt, messages=parse_messages(obj["messages"]))
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


def read_jsonl(
    path: str | Path,
    parse: Callable[[dict[str, Any], str], Any],
    *,
    on_error: str = "raise",
    expected: str = "one JSON object per line",
) -> JsonlRecords:
    """Reads a JSONL file line by line, parsing each object with ``parse``.

    Blank lines are ignored. A line that is not a JSON object, or whose object
    ``parse`` rejects with :class:`RowError`, is reported with its ``file:line``
    (``on_error="raise"``) or skipped and counted (``on_error="skip"``).

    Args:
        path: The JSONL file.
        parse: ``parse(obj, source)`` -> the row for one JSON object (``source`` is
            ``"file:line"``); raises :class:`RowError` for a malformed object.
        on_error: ``"raise"`` or ``"skip"``.
        expected: What a valid row looks like, for the error when none is left.

    Returns:
        A :class:`JsonlRecords`.

    Raises:
        DataError: The file is missing, a line is malformed (``on_error="raise"``,
            with ``file:line``), or no valid line is left.
        ConfigError: ``on_error`` is not ``"raise"`` or ``"skip"``.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a JSONL file with one JSON object per line")
    items: list[Any] = []
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
                    raise RowError(
                        f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
                    ) from None
                if not isinstance(obj, dict):
                    raise RowError(f"expected a JSON object, got {type(obj).__name__}: {_short(obj)}")
                items.append(parse(obj, source))
            except RowError as e:
                if on_error == "raise":
                    raise DataError(f"{source}: {e}") from None
                skipped += 1
                first_skip = first_skip or f"{source}: {e}"
    if not items:
        raise DataError(f"{path}: no valid rows ({skipped} malformed skipped); expected {expected}")
    return JsonlRecords(items, skipped, first_skip)


def read_row_file(path: str | Path, format: str = "auto", on_error: str = "raise") -> RowFile:
    """Reads and validates a JSONL data file in one of the four row formats, without warnings.

    Args:
        path: The JSONL file.
        format: ``"auto"`` (detected from the first valid row) or one of :data:`FORMATS`.
        on_error: ``"raise"`` on the first malformed row, or ``"skip"`` it (counted in the result).

    Returns:
        A :class:`RowFile`: the rows, the format, and what was skipped.

    Raises:
        DataError: The file is missing, a row is malformed (with ``file:line``), a row's
            format differs from the file's, or no valid row is left.
        ConfigError: ``format`` or ``on_error`` is not an allowed value.
    """
    if format not in ("auto", *FORMATS):
        raise ConfigError(f"data format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    fmt: str | None = None if format == "auto" else format
    detected_at: int | None = None

    def parse(obj: dict[str, Any], source: str) -> Row:
        nonlocal fmt, detected_at
        kind = _detect(obj)
        if fmt is None:
            if kind is None:
                raise RowError(f"row has keys {sorted(obj)}; expected {_EXPECTED}")
            fmt, detected_at = kind, int(source.rsplit(":", 1)[1])
        elif kind != fmt and detected_at is not None:
            found = f"a {kind} row" if kind else f"keys {sorted(obj)}"
            raise RowError(
                f"found {found}, but this file is {fmt} (detected from line {detected_at}); "
                f"every row must have {_REQUIRED[fmt]}"
            )
        return _parse(obj, fmt, source)

    rows, skipped, first_skip = read_jsonl(path, parse, on_error=on_error, expected=_EXPECTED)
    return RowFile(rows, fmt, skipped, first_skip)


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
    read = read_row_file(path, format, on_error)
    if read.skipped:
        warnings.warn(f"skipped {read.skipped} malformed row(s); first: {read.first_skip}", stacklevel=2)
    return read.rows
