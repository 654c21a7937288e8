"""lorakit.train.batching: packing, deterministic length-bucketed batches, the packed mask, the eval split."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.errors import ConfigError, DataError
from lorakit.examples import collate
from lorakit.train.batching import make_batches, pack_examples, packed_attention_mask, split_eval

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
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        attn_implementation=attn,
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
    assert not torch.allclose(
        leaky[1, n0 : len(second["input_ids"])], packed[1, n0 : len(second["input_ids"])], atol=1e-3
    )


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
        return sum(
            max(len(exs[i]["input_ids"]) for i in b) * len(b) - sum(len(exs[i]["input_ids"]) for i in b)
            for b in batches
        )

    bucketed = padding(make_batches(exs, 8, seed=0, epoch=0, bucket=True))
    plain = padding(make_batches(exs, 8, seed=0, epoch=0, bucket=False))
    assert bucketed < plain / 4


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
