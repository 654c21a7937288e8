"""lorakit.rows' reusable reader (read_jsonl, read_row_file, parse_messages) and lorakit.examples.tokenize_row.

The four row formats, label masks and their error messages are tested through
load_examples / read_rows in test_examples.py; here: what other row kinds (preference
pairs) build on, checked against rows written by hand.
"""

from __future__ import annotations

import json
import warnings

import pytest
from tiny import make_tokenizer

from lorakit.errors import ConfigError, DataError
from lorakit.examples import IGNORE_INDEX, render_chat, tokenize_row
from lorakit.rows import Row, RowError, parse_messages, read_jsonl, read_row_file, read_rows


def _pair(obj: dict, source: str) -> tuple[str, str, str]:
    """A parse function as a preference reader would write it."""
    if not all(isinstance(obj.get(k), str) for k in ("prompt", "chosen", "rejected")):
        raise RowError("a pair needs string 'prompt', 'chosen' and 'rejected'")
    return source, obj["chosen"], obj["rejected"]


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_parses_each_object_with_its_source(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = _write(tmp_path, [good, "", good])
    read = read_jsonl(path, _pair)
    assert read.items == [(f"{path}:1", "a", "b"), (f"{path}:3", "a", "b")]  # blank line 2 skipped, lines counted
    assert (read.skipped, read.first_skip) == (0, None)


def test_read_jsonl_reports_or_skips_bad_lines_with_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = _write(tmp_path, [good, json.dumps({"prompt": "p"}), "[1, 2]", "{oops", good])
    with pytest.raises(DataError, match=rf"{path}:2: a pair needs string"):
        read_jsonl(path, _pair)
    read = read_jsonl(path, _pair, on_error="skip")
    assert [source for source, _, _ in read.items] == [f"{path}:1", f"{path}:5"]
    assert read.skipped == 3 and read.first_skip.startswith(f"{path}:2: a pair needs")
    with pytest.raises(DataError, match=r"no valid rows \(1 malformed skipped\); expected a pair"):
        read_jsonl(_write(tmp_path, ["{}"]), _pair, on_error="skip", expected="a pair")
    with pytest.raises(ConfigError, match="on_error"):
        read_jsonl(path, _pair, on_error="ignore")
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl", _pair)


def test_read_row_file_says_format_and_skips_without_warning(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"prompt": "a", "completion": "b"}),
            json.dumps({"text": "x"}),
            json.dumps({"prompt": "c", "completion": "d"}),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = read_row_file(path, on_error="skip")
    assert read.format == "prompt_completion" and read.skipped == 1
    assert [r.completion for r in read.rows] == ["b", "d"]
    assert "detected from line 1" in read.first_skip and read.first_skip.startswith(f"{path}:2:")
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        assert read_rows(path, on_error="skip") == read.rows


def test_parse_messages_validates_and_drops_extra_keys():
    assert parse_messages([{"role": "user", "content": "hi", "name": "x"}]) == [{"role": "user", "content": "hi"}]
    for bad, message in [
        ([], "non-empty list"),
        ([{"role": "user"}], r"messages\[0\] must be an object"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": 3}], "must be a string"),
    ]:
        with pytest.raises(RowError, match=message):
            parse_messages(bad)


def test_tokenize_row_labels_only_the_answer():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, labels, fell_back = tokenize_row(tok, Row("f:1", "chat", messages=messages))
    prompt = render_chat(tok, messages[:1], True)
    assert ids == render_chat(tok, messages, False) and ids[: len(prompt)] == prompt and not fell_back
    assert labels == [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    assert tokenize_row(tok, Row("f:1", "chat", messages=messages), train_on_prompt=True).labels == ids


def test_tokenize_row_chat_without_template_names_the_row():
    with pytest.raises(DataError, match=r"f:7: chat rows need a tokenizer with a chat template"):
        row = Row("f:7", "chat", messages=[{"role": "user", "content": "x"}])
        tokenize_row(make_tokenizer(chat_template=None), row)
