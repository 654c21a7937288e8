"""lorakit.examples (with the rows it reads through lorakit.rows): formats, label masks, errors, truncation, collate."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny import make_tokenizer  # CHATML: SmolLM2-Instruct's template, ChatML with a default system prompt
from transformers import PreTrainedTokenizerFast

from lorakit.errors import ConfigError, DataError
from lorakit.examples import DataStats, collate, load_examples
from lorakit.rows import read_rows

# Like templates that strip reasoning from old turns: an assistant turn renders
# differently once it is no longer the last message, which breaks the prefix property.
STRIPPING = (
    "{% for message in messages %}"
    "{% set c = message['content'] if loop.last or message['role'] != 'assistant' else '...' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + c + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def _write(tmp_path, rows, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _labelled(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])


def tok_text(tok, ex) -> str:
    return tok.decode(ex["input_ids"])


def _segments(ex) -> list[tuple[bool, list[int]]]:
    """Maximal runs of (trained?, tokens)."""
    runs: list[tuple[bool, list[int]]] = []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        trained = lab != -100
        if trained:
            assert lab == t
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(t)
        else:
            runs.append((trained, [t]))
    return runs


# --- formats and label masks ---------------------------------------------------------------


def test_chat_multi_turn_labels_exactly_assistant_turns(tmp_path, tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    (ex,), stats = load_examples(_write(tmp_path, [{"messages": messages}]), tok)
    assert stats.format == "chat" and stats.rows == 1 and stats.template_fallbacks == 0
    # Independent construction: the rendered text, with only assistant contents + end markers trained.
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    runs = _segments(ex)
    trained = [tok.decode(ids) for t, ids in runs if t]
    assert trained == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]
    untrained = [tok.decode(ids) for t, ids in runs if not t]
    assert untrained == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    ]
    assert stats.label_tokens == sum(len(ids) for t, ids in runs if t)
    assert stats.tokens == len(ex["input_ids"])


def test_chat_train_on_prompt_labels_everything(tmp_path, tok):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    (ex,), _ = load_examples(path, tok, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_prompt_completion_and_alpaca_use_chat_template(tmp_path, tok):
    path = _write(tmp_path, [{"prompt": "Say hi", "completion": "hi"}])
    (ex,), stats = load_examples(path, tok)
    assert stats.format == "prompt_completion"
    assert tok.decode(ex["input_ids"]).endswith(
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    )
    assert _labelled(tok, ex) == "hi<|im_end|>\n"

    path = _write(
        tmp_path, [{"instruction": "Add", "input": "1 1", "output": "2"}, {"instruction": "Go", "output": "ok"}]
    )
    (a, b), stats = load_examples(path, tok)
    assert stats.format == "alpaca"
    assert "<|im_start|>user\nAdd\n\n1 1<|im_end|>" in tok.decode(a["input_ids"])
    assert "<|im_start|>user\nGo<|im_end|>" in tok.decode(b["input_ids"])
    assert [_labelled(tok, a), _labelled(tok, b)] == ["2<|im_end|>\n", "ok<|im_end|>\n"]


def test_prompt_completion_and_alpaca_without_template(tmp_path):
    plain = make_tokenizer(chat_template=None)
    (ex,), _ = load_examples(_write(tmp_path, [{"prompt": "Q: x\nA:", "completion": " y"}]), plain)
    assert tok_text(plain, ex) == "Q: x\nA: y<|endoftext|>"
    assert _labelled(plain, ex) == " y<|endoftext|>"

    (ex,), _ = load_examples(_write(tmp_path, [{"instruction": "Add", "input": "1 1", "output": "2"}]), plain)
    assert tok_text(plain, ex).endswith("### Instruction:\nAdd\n\n### Input:\n1 1\n\n### Response:\n2<|endoftext|>")
    assert _labelled(plain, ex) == "2<|endoftext|>"


def test_text_rows_train_all_tokens_with_eos(tmp_path, tok):
    (ex,), stats = load_examples(_write(tmp_path, [{"text": "hello world"}]), tok)
    assert stats.format == "text"
    assert tok_text(tok, ex) == "hello world<|im_end|>"
    assert ex["labels"] == ex["input_ids"]


def test_chat_rows_need_a_template(tmp_path):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="chat template"):
        load_examples(path, make_tokenizer(chat_template=None))


def test_template_breaking_prefix_falls_back_to_last_turn(tmp_path):
    tok = make_tokenizer(STRIPPING)
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "second"},
    ]
    with pytest.warns(UserWarning, match="final assistant turn of 1"):
        (ex,), stats = load_examples(_write(tmp_path, [{"messages": messages}]), tok)
    assert stats.template_fallbacks == 1
    assert _labelled(tok, ex) == "second<|im_end|>\n"


def test_explicit_format_and_read_rows(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "completion": "c", "text": "ignored"}])
    (row,) = read_rows(path, format="prompt_completion")
    assert row.source == f"{path}:1" and row.format == "prompt_completion"
    assert row.prompt_messages == [{"role": "user", "content": "p"}] and row.reference == "c"
    (row,) = read_rows(path, format="text")
    assert row.text == "ignored" and row.reference is None
    chat = _write(tmp_path, [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    (row,) = read_rows(chat)
    assert row.prompt_messages == [{"role": "user", "content": "u"}] and row.reference == "a"


# --- malformed rows -------------------------------------------------------------------------

BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"text": "t"}, r"found a text row, but this file is chat \(detected from line 1\)"),
    ({"id": 3}, r"found keys \['id'\], but this file is chat"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with 'role' and 'content'"),
    (
        {"messages": [{"role": "bot", "content": "x"}]},
        r"messages\[0\] has unknown role \"bot\"; expected one of system",
    ),
    ({"messages": [{"role": "user", "content": ["x"]}]}, r"messages\[0\].content must be a string, got list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_malformed_row_raises_with_file_and_line(tmp_path, tok, bad, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _write(tmp_path, [good, "", bad, good])
    with pytest.raises(DataError, match=rf"^{path}:3: .*{message}"):
        load_examples(path, tok)


def test_unknown_first_row_lists_accepted_forms(tmp_path, tok):
    path = _write(tmp_path, [{"foo": 1}])
    with pytest.raises(DataError, match=rf"^{path}:1: row has keys \['foo'\]; expected one of .*\"messages\""):
        load_examples(path, tok)


@pytest.mark.parametrize(
    "fmt, row, message",
    [
        (
            "prompt_completion",
            {"prompt": "p"},
            "missing key 'completion'; a prompt_completion row needs keys 'prompt' and 'completion'",
        ),
        ("prompt_completion", {"prompt": "p", "completion": 5}, "'completion' must be a string, got int 5"),
        ("alpaca", {"instruction": "i", "output": "o", "input": 3}, "'input' must be a string, got int"),
        ("alpaca", {"instruction": "i"}, "missing key 'output'"),
        ("text", {"text": None}, "'text' must be a string, got NoneType"),
        ("chat", {"text": "t"}, "missing key 'messages'"),
    ],
)
def test_wrong_keys_and_types_for_explicit_format(tmp_path, tok, fmt, row, message):
    path = _write(tmp_path, [row])
    with pytest.raises(DataError, match=rf"^{path}:1: {message}"):
        load_examples(path, tok, format=fmt)


def test_skip_mode_counts_and_warns_once(tmp_path, tok):
    good = {"prompt": "p", "completion": "c"}
    path = _write(tmp_path, ["oops", good, {"prompt": 1, "completion": "c"}, {"text": "x"}, good])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, stats = load_examples(path, tok, on_error="skip")
    assert len(examples) == stats.rows == 2 and stats.skipped == 3
    skip_warnings = [w for w in caught if "skipped 3 malformed" in str(w.message)]
    assert len(skip_warnings) == 1 and f"{path}:1: invalid JSON" in str(skip_warnings[0].message)


def test_no_valid_rows_and_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="no valid rows"):
        load_examples(_write(tmp_path, ["", "oops"]), tok, on_error="skip")
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl", tok)
    with pytest.raises(ConfigError, match="on_error"):
        load_examples(_write(tmp_path, [{"text": "a"}]), tok, on_error="ignore")
    with pytest.raises(ConfigError, match="data format"):
        load_examples(_write(tmp_path, [{"text": "a"}]), tok, format="sharegpt")


# --- truncation -----------------------------------------------------------------------------


def test_truncation_keeps_beginning_and_drops_rows_without_labels(tmp_path, tok):
    long_prompt = {"prompt": "x" * 100, "completion": "yes"}  # template ~30 tokens + 100 prompt bytes
    short = {"prompt": "q", "completion": "a"}
    long_text = {"prompt": "q", "completion": "z" * 100}
    path = _write(tmp_path, [long_prompt, short, long_text])
    examples, stats = load_examples(path, tok, max_seq_len=64)
    assert stats == DataStats(
        rows=2,
        skipped=0,
        truncated=2,
        dropped_no_labels=1,
        tokens=stats.tokens,
        label_tokens=stats.label_tokens,
        format="prompt_completion",
    )
    assert all(len(ex["input_ids"]) <= 64 for ex in examples)
    full, _ = load_examples(path, tok, max_seq_len=4096)
    assert examples[1]["input_ids"] == full[2]["input_ids"][:64]  # beginning kept
    assert examples[1]["labels"] == full[2]["labels"][:64]
    with pytest.raises(DataError, match="no examples left"):
        load_examples(_write(tmp_path, [long_prompt], "only.jsonl"), tok, max_seq_len=64)


# --- collate --------------------------------------------------------------------------------


def test_collate_shapes_and_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    batch = collate(rows, pad_token_id=0, pad_to_multiple_of=8)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (2, 8) for k in ("input_ids", "labels", "attention_mask")
    }
    packed = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]}], 0, 8)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2, 3, 4]]
    with pytest.raises(DataError, match="mixes packed"):
        collate([rows[0], {"input_ids": [1], "labels": [1], "position_ids": [0]}], 0)
