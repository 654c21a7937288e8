"""Preference pairs: row validation with file:line errors, tokenization, keep_start truncation, collation."""

from __future__ import annotations

import json

import pytest
from tiny import make_tokenizer

from lorakit.errors import DataError
from lorakit.pairs import collate_pairs, first_pair_line, load_pairs, read_pairs

PAIR = {"prompt": "say abc", "chosen": "abc abc", "rejected": "no"}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p", "rejected": "b"}, "missing key(s) 'chosen'"),
        ({"prompt": "p", "chosen": "a"}, "missing key(s) 'rejected'"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "supervised (SFT) row"),
        ({"prompt": "p", "completion": "c"}, "train it with method: sft"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list of chat messages"),
        (
            {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
            "'chosen' is a message list but 'prompt' is a string",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": "b",
            },
            "must hold assistant messages only",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path / "pairs.jsonl", [PAIR, row])
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_skip_counts_bad_rows(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [PAIR, {"prompt": "p", "chosen": "x", "rejected": "x"}, "not json", PAIR])
    rows, skipped, first = read_pairs(path, on_error="skip")
    assert (len(rows), skipped) == (2, 2)
    assert first.startswith(f"{path}:2: ")


def test_string_rows_use_the_chat_template_and_mask_the_prompt(tmp_path):
    tok = make_tokenizer()
    path = write(tmp_path / "pairs.jsonl", [PAIR])
    (pair,), stats = load_pairs(path, tok)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "say abc"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(pair["prompt_ids"]) == prompt
    assert tok.decode(pair["chosen_ids"]) == "abc abc<|im_end|>\n"
    assert tok.decode(pair["rejected_ids"]) == "no<|im_end|>\n"
    assert stats.completion_tokens == len(pair["chosen_ids"]) + len(pair["rejected_ids"])
    # The conversational form of the same row tokenizes the same.
    conv = {
        "prompt": [{"role": "user", "content": "say abc"}],
        "chosen": "abc abc",
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    (same,), _ = load_pairs(write(tmp_path / "conv.jsonl", [conv]), tok)
    assert same == pair
    batch = collate_pairs([pair, same], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    n_prompt = len(pair["prompt_ids"])
    assert (batch["labels"][:, :n_prompt] == -100).all()
    assert batch["labels"][0, n_prompt : n_prompt + len(pair["chosen_ids"])].tolist() == pair["chosen_ids"]
    assert batch["labels"][2, n_prompt : n_prompt + len(pair["rejected_ids"])].tolist() == pair["rejected_ids"]


def test_without_template_answers_end_with_eos(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    (pair,), _ = load_pairs(write(tmp_path / "pairs.jsonl", [PAIR]), tok)
    assert tok.decode(pair["prompt_ids"]) == "say abc"
    assert tok.decode(pair["chosen_ids"]) == "abc abc<|im_end|>"
    conv = {"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        load_pairs(write(tmp_path / "conv.jsonl", [conv]), tok)


def test_keep_start_truncation_is_counted(tmp_path):
    tok = make_tokenizer()
    long = {"prompt": "x" * 80, "chosen": "y" * 40, "rejected": "z"}
    (pair,), stats = load_pairs(write(tmp_path / "pairs.jsonl", [long]), tok, max_seq_len=100, max_prompt_len=64)
    assert len(pair["prompt_ids"]) == 64 and stats.prompt_truncated == 1
    assert len(pair["prompt_ids"]) + len(pair["chosen_ids"]) == 100 and stats.truncated == 1
    assert tok.decode(pair["chosen_ids"]) == "y" * 36  # the start of the answer is kept
    assert tok.decode(pair["rejected_ids"]) == "z<|im_end|>\n"


def test_prompt_that_leaves_no_answer_is_an_error(tmp_path):
    tok = make_tokenizer()
    path = write(tmp_path / "pairs.jsonl", [PAIR, {"prompt": "x" * 200, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as err:
        load_pairs(path, tok, max_seq_len=64)
    assert str(err.value).startswith(f"{path}:2: the prompt is ")
    assert "max_seq_len=64" in str(err.value) and "max_prompt_len" in str(err.value)
    pairs, stats = load_pairs(path, tok, max_seq_len=64, max_prompt_len=32)  # a prompt limit below it makes room
    assert stats.prompt_truncated == 2 and all(len(p["prompt_ids"]) == 32 for p in pairs)


def test_first_pair_line(tmp_path):
    assert first_pair_line(write(tmp_path / "p.jsonl", ["", PAIR])) == 2
    assert not first_pair_line(write(tmp_path / "s.jsonl", [{"prompt": "p", "completion": "c"}]))
    assert not first_pair_line(tmp_path / "missing.jsonl")
