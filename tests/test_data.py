"""Tests of lorakit.rows, lorakit.examples and lorakit.train.batching: formats, label masks, errors, truncation, packing, batching."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit.errors import ConfigError, DataError
from lorakit.examples import DataStats, collate, load_examples
from lorakit.rows import read_rows
from lorakit.train.batching import make_batches, pack_examples, packed_attention_mask, split_eval

from tiny import CHATML  # SmolLM2-Instruct's template: ChatML with a default system prompt  # noqa: E402

# Like templates that strip reasoning from old turns: an assistant turn renders
# differently once it is no longer the last message, which breaks the prefix property.
STRIPPING = (
    "{% for message in messages %}"
    "{% set c = message['content'] if loop.last or message['role'] != 'assistant' else '...' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + c + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: one token per byte, plus ChatML specials."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer()


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
    assert tok.decode(ex["input_ids"]).endswith("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n")
    assert _labelled(tok, ex) == "hi<|im_end|>\n"

    path = _write(tmp_path, [{"instruction": "Add", "input": "1 1", "output": "2"}, {"instruction": "Go", "output": "ok"}])
    (a, b), stats = load_examples(path, tok)
    assert stats.format == "alpaca"
    assert "<|im_start|>user\nAdd\n\n1 1<|im_end|>" in tok.decode(a["input_ids"])
    assert "<|im_start|>user\nGo<|im_end|>" in tok.decode(b["input_ids"])
    assert [_labelled(tok, a), _labelled(tok, b)] == ["2<|im_end|>\n", "ok<|im_end|>\n"]


def test_prompt_completion_and_alpaca_without_template(tmp_path):
    plain = _tokenizer(chat_template=None)
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
        load_examples(path, _tokenizer(chat_template=None))


def test_template_breaking_prefix_falls_back_to_last_turn(tmp_path):
    tok = _tokenizer(STRIPPING)
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
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] has unknown role \"bot\"; expected one of system"),
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
        ("prompt_completion", {"prompt": "p"}, "missing key 'completion'; a prompt_completion row needs keys 'prompt' and 'completion'"),
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
        rows=2, skipped=0, truncated=2, dropped_no_labels=1, tokens=stats.tokens,
        label_tokens=stats.label_tokens, format="prompt_completion",
    )
    assert all(len(ex["input_ids"]) <= 64 for ex in examples)
    full, _ = load_examples(path, tok, max_seq_len=4096)
    assert examples[1]["input_ids"] == full[2]["input_ids"][:64]  # beginning kept
    assert examples[1]["labels"] == full[2]["labels"][:64]
    with pytest.raises(DataError, match="no examples left"):
        load_examples(_write(tmp_path, [long_prompt], "only.jsonl"), tok, max_seq_len=64)


# --- packing --------------------------------------------------------------------------------


def test_pack_examples_layout():
    exs = [{"input_ids": [1] * n, "labels": [2] * n} for n in (5, 3, 7, 2, 4)]
    packed = pack_examples(exs, max_seq_len=8)
    # best-fit decreasing: 7 -> new row, 5 -> new row, 4 -> new row, 3 -> the 5's row (full), 2 -> the 4's row
    assert [len(r["input_ids"]) for r in packed] == [7, 8, 6]
    assert [_lengths(r["position_ids"]) for r in packed] == [[7], [5, 3], [4, 2]]
    for r in packed:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][i] == -100 for i in starts)  # no cross-example target
        assert len(r["labels"]) == len(r["input_ids"]) == len(r["position_ids"])
    with pytest.raises(DataError, match="max_seq_len=4"):
        pack_examples(exs, max_seq_len=4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_separate_runs(attn):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn
    a = torch.randint(0, 100, (6,)).tolist()
    b = torch.randint(0, 100, (4,)).tolist()
    c = torch.randint(0, 100, (9,)).tolist()
    exs = [{"input_ids": x, "labels": x} for x in (a, b, c)]
    rows = pack_examples(exs, max_seq_len=12)  # [c], [a, b]
    batch = collate(rows, pad_token_id=0, pad_to_multiple_of=16)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 16)
    with torch.no_grad():
        alone = {tuple(x): model(torch.tensor([x])).logits[0] for x in (a, b, c)}
        packed = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
        explicit = model(
            input_ids=batch["input_ids"],
            attention_mask=packed_attention_mask(batch["position_ids"]),
            position_ids=batch["position_ids"],
        ).logits
        # With the config's default use_cache=True, transformers makes a cache and skips
        # packed-sequence detection: the second example then attends to the first.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    for out in (packed, explicit):
        for r, row in enumerate(rows):
            start = 0
            for n in _lengths(row["position_ids"]):
                ids = tuple(row["input_ids"][start : start + n])
                torch.testing.assert_close(out[r, start : start + n], alone[ids], atol=1e-5, rtol=0)
                start += n
    second = rows[1]
    n0 = _lengths(second["position_ids"])[0]
    assert not torch.allclose(leaky[1, n0 : len(second["input_ids"])], packed[1, n0 : len(second["input_ids"])], atol=1e-3)


def _lengths(position_ids: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


# --- batching -------------------------------------------------------------------------------


def _varied(n: int = 400) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 200, (n,), generator=g).tolist()
    return [{"input_ids": [1] * k, "labels": [1] * k} for k in lengths]


def test_make_batches_deterministic_and_complete():
    exs = _varied()
    first = make_batches(exs, 8, seed=3, epoch=0)
    assert first == make_batches(exs, 8, seed=3, epoch=0)
    assert first != make_batches(exs, 8, seed=4, epoch=0)
    assert first != make_batches(exs, 8, seed=3, epoch=1)
    assert make_batches(exs, 8, seed=1, epoch=0) != make_batches(exs, 8, seed=0, epoch=1)
    for bucket in (True, False):
        batches = make_batches(exs, 8, seed=3, epoch=0, bucket=bucket)
        assert sorted(i for b in batches for i in b) == list(range(len(exs)))
        assert all(len(b) == 8 for b in batches)  # 400 / 8
    assert make_batches(exs, 7, seed=0, epoch=0, shuffle=False, bucket=False)[0] == list(range(7))


def test_bucketing_reduces_padding():
    exs = _varied()

    def padding(batches):
        return sum(max(len(exs[i]["input_ids"]) for i in b) * len(b) - sum(len(exs[i]["input_ids"]) for i in b) for b in batches)

    bucketed = padding(make_batches(exs, 8, seed=0, epoch=0, bucket=True))
    plain = padding(make_batches(exs, 8, seed=0, epoch=0, bucket=False))
    assert bucketed < plain / 4


def test_collate_shapes_and_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    batch = collate(rows, pad_token_id=0, pad_to_multiple_of=8)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 8) for k in ("input_ids", "labels", "attention_mask")}
    packed = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]}], 0, 8)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2, 3, 4]]
    with pytest.raises(DataError, match="mixes packed"):
        collate([rows[0], {"input_ids": [1], "labels": [1], "position_ids": [0]}], 0)


def test_packed_attention_mask_is_block_diagonal_causal():
    mask = packed_attention_mask(torch.tensor([[0, 1, 0, 1, 2]]))
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_split_eval():
    items = list(range(100))
    train, evals = split_eval(items, 0.1, seed=0)
    assert len(evals) == 10 and sorted(train + evals) == items
    assert train == sorted(train) and evals == sorted(evals)
    assert split_eval(items, 0.1, seed=0) == (train, evals)
    assert split_eval(items, 0.1, seed=1)[1] != evals
    assert len(split_eval([1, 2], 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_eval(items, 1.0, seed=0)
