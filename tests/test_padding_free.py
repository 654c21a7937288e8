"""Padding-free batches (lorakit.padding_free): one row of real tokens, attention per example.

The reference is the padded batch run as transformers runs it (SDPA, with its padding or
block-diagonal packing mask), in float64: loss and every LoRA gradient must agree to float
rounding, and the flat path must really have run (one attention call per example).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_mod
from conftest import make_llama
from transformers import AttentionInterface

import lorakit
from lorakit import padding_free
from lorakit.errors import ConfigError
from lorakit.examples import collate
from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
from lorakit.padding_free import (
    ATTENTION,
    disable_padding_free,
    enable_padding_free,
    flatten_batch,
    padding_free_blocker,
    setup_padding_free,
)
from lorakit.train.batching import pack_examples
from lorakit.train.config import RunConfig
from lorakit.train.lm_loss import causal_lm_loss
from lorakit.train.recompute import enable_checkpointing
from lorakit.train.report import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

CPU = torch.device("cpu")


def _rows(lengths, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * min(2, n) + ids[2:]})  # a prompt, then labels
    return rows


def _lora_model(checkpointing=False):
    model = make_llama(layers=2).double()
    model.config._attn_implementation = "sdpa"
    lorakit.inject(
        model,
        lorakit.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    with torch.no_grad():  # B = 0 would leave every adapter gradient but B's at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    fuse_swiglu_mlps(model)
    fuse_shared_inputs(model)
    if checkpointing:
        enable_checkpointing(model, say=lambda msg: None)
    return model.train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def attention_calls(monkeypatch):
    """The query lengths of every transformers SDPA call."""
    calls = []
    real = sdpa_mod.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", spy)  # what lorakit.padding_free calls
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)  # what a model with SDPA attention calls
    real_example = padding_free._example_attention

    def spy_example(q, *args):
        calls.append(q.shape[2])
        return real_example(q, *args)

    monkeypatch.setattr(padding_free, "_example_attention", spy_example)  # the padding-free kernel per example
    return calls


def test_flatten_right_padded_batch_layout():
    model = make_llama()
    model.config._attn_implementation = "sdpa"
    batch = collate(_rows([3, 5, 1]), pad_token_id=0, pad_to_multiple_of=8)
    given = {k: v for k, v in batch.items() if k != "labels"}
    assert flatten_batch(given, model) is None  # not made padding-free: nothing changes
    enable_padding_free(model)
    flat = flatten_batch(given, model)
    ids = batch["input_ids"]
    assert flat.inputs["input_ids"].tolist() == [ids[0, :3].tolist() + ids[1, :5].tolist() + ids[2, :1].tolist()]
    assert flat.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert flat.inputs["lorakit_segments"] == (0, 3, 8, 9)
    assert flat.index[1].tolist() == [3, 4, 5, 6, 7, -1, -1, -1]
    assert flat.index[2].tolist() == [8] + [-1] * 7


def test_flatten_packed_rows_splits_at_position_restarts():
    model = make_llama()
    model.config._attn_implementation = "sdpa"
    enable_padding_free(model)
    rows = pack_examples(_rows([3, 4, 2]), max_seq_len=8)
    batch = collate(rows, pad_token_id=0)
    flat = flatten_batch({k: v for k, v in batch.items() if k != "labels"}, model)
    starts = [i for i, p in enumerate(batch["position_ids"].flatten().tolist()) if p == 0]
    assert list(flat.inputs["lorakit_segments"][:-1]) == starts
    assert flat.inputs["lorakit_segments"][-1] == batch["input_ids"].numel()  # packed rows keep every position


@pytest.mark.parametrize(
    "case",
    [
        {"inputs_embeds": None},  # extra inputs: not a batch it knows
        "left",
        "unpadded_single",
    ],
)
def test_flatten_declines_what_it_cannot_do(case):
    model = make_llama()
    model.config._attn_implementation = "sdpa"
    enable_padding_free(model)
    batch = collate(_rows([3, 5]), pad_token_id=0)
    given = {k: v for k, v in batch.items() if k != "labels"}
    if case == "left":
        given["attention_mask"] = given["attention_mask"].flip(1)
    elif case == "unpadded_single":
        given = {k: v[1:] for k, v in given.items()}
    else:
        given["token_type_ids"] = torch.zeros_like(given["input_ids"])
    assert flatten_batch(given, model) is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_right_padded_loss_and_grads_equal_the_padded_batch_float64(checkpointing, attention_calls):
    model = _lora_model(checkpointing)
    batch = collate(_rows([7, 12, 3, 9]), pad_token_id=0, pad_to_multiple_of=8)
    ref_loss, ref_n, ref = _loss_and_grads(model, batch)
    assert attention_calls == [16] * (4 if checkpointing else 2)  # one call per layer (forward, reruns)
    attention_calls.clear()
    enable_padding_free(model)
    loss, n, got = _loss_and_grads(model, batch)
    # one attention call per example per layer; the checkpoint rerun gets the bounds again
    assert attention_calls == [7, 12, 3, 9] * (4 if checkpointing else 2)
    assert n == ref_n and torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-9, atol=1e-12), k


def test_packed_rows_equal_the_block_diagonal_mask_float64(attention_calls):
    """Packed rows: transformers' block-diagonal mask (the reference) against one attention call per example."""
    model = _lora_model()
    rows = pack_examples(_rows([5, 6, 4, 9, 3], seed=1), max_seq_len=16)
    batch = collate(rows, pad_token_id=0)
    ref_loss, ref_n, ref = _loss_and_grads(model, batch)
    enable_padding_free(model)
    attention_calls.clear()
    loss, n, got = _loss_and_grads(model, batch)
    assert len(attention_calls) > 2 * len(rows)  # per example, not per row
    assert n == ref_n and torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-9, atol=1e-12), k


def test_a_padding_free_model_still_runs_ordinary_batches():
    """Eval and generation pass masks (left padding): the model answers as SDPA does."""
    model = make_llama()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        enable_padding_free(model)
        assert model.model.layers[0].self_attn.config._attn_implementation == ATTENTION
        got = model(input_ids=ids, attention_mask=mask).logits
        got_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    assert torch.equal(got_gen, ref_gen)
    disable_padding_free(model)
    assert model.config._attn_implementation == "sdpa"


def test_blockers_and_modes():
    model = make_llama()
    model.config._attn_implementation = "eager"
    assert "'eager'" in padding_free_blocker(model)
    with pytest.raises(ConfigError, match="padding_free: off"):
        enable_padding_free(model)
    with pytest.raises(ConfigError, match="train.padding_free is on, but its attention is 'eager'"):
        setup_padding_free(model, "on", CPU)
    assert setup_padding_free(model, "auto", CPU) == ""  # auto: quietly off
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 4
    assert "sliding-window" in padding_free_blocker(model)
    model.config.sliding_window = None
    assert padding_free_blocker(model) is None
    with pytest.raises(ConfigError, match="CUDA graphs"):
        setup_padding_free(model, "on", CPU, graphs=True)
    assert setup_padding_free(model, "auto", torch.device("cuda")) == ""  # auto: CPU runs only
    with pytest.raises(ConfigError, match="method dpo keeps its own batch layout"):  # the run's own reason
        setup_padding_free(model, "on", CPU, run_blocker="method dpo keeps its own batch layout (pack_pairs)")
    assert setup_padding_free(model, "auto", CPU, run_blocker="method dpo keeps its own layout") == ""
    assert model.config._attn_implementation == "sdpa"
    assert setup_padding_free(model, "off", CPU) == ""
    assert setup_padding_free(model, "auto", CPU) == "padding-free batches"
    assert model.config._attn_implementation == ATTENTION


def test_config_key():
    base = {"data": {"train": "x.jsonl"}}
    assert RunConfig.model_validate(base).train.padding_free == "auto"
    assert RunConfig.model_validate({**base, "train": {"padding_free": "off"}}).train.padding_free == "off"
    with pytest.raises(Exception, match="padding_free"):
        RunConfig.model_validate({**base, "train": {"padding_free": "yes please"}})


def test_train_run_padding_free_matches_padded(tmp_path, capsys):
    """A real `lorakit.train` run: the start line says so, and the losses equal a padded run's."""
    model_dir = make_tiny_model_dir(tmp_path / "m")
    data = write_chat_jsonl(tmp_path / "t.jsonl", n=12)
    losses = {}
    for mode in ("auto", "off"):
        cfg = RunConfig.model_validate(
            {
                "model": str(model_dir),
                "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                "data": {"train": str(data)},
                "train": {"steps": 3, "batch_size": 4, "precision": "fp32", "padding_free": mode},
                "output": {"dir": str(tmp_path / mode)},
            }
        )
        lorakit.train(cfg, device="cpu")
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode / "metrics.jsonl") if "loss" in r]
        captured = capsys.readouterr()
        assert ("padding-free batches" in captured.out + captured.err) == (mode == "auto")
    assert len(losses["auto"]) == 3
    assert losses["auto"] == pytest.approx(losses["off"], rel=1e-5)


def _stock_examples(q, k, v, sizes, scale):
    """The reference: torch's SDPA per example (its own autograd), outputs concatenated."""
    parts = [
        torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale, enable_gqa=True)
        for a, b, c in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), strict=True)
    ]
    return torch.cat([p.transpose(1, 2) for p in parts], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_examples_attention_is_sdpa_bitwise_and_keeps_each_output_once(dtype):
    sizes = [7, 12, 1, 9]
    bounds = (0, 7, 19, 20, 29)
    g = torch.Generator().manual_seed(0)

    def leaf(heads):  # [1, heads, N, d] over a [1, N, heads, d] tensor, as the model's projections give it
        return torch.randn(1, 29, heads, 8, generator=g, dtype=dtype).transpose(1, 2).requires_grad_(True)

    q, k, v = leaf(4), leaf(2), leaf(2)
    attn = torch.nn.Module()
    attn.num_key_value_groups = 2  # what transformers' SDPA function reads for grouped heads
    dout = torch.randn(1, 29, 4, 8, generator=g, dtype=dtype)
    ref = _stock_examples(q, k, v, sizes, 0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _ = padding_free._attention(attn, q, k, v, None, lorakit_segments=bounds, scaling=0.3)
    assert type(out.grad_fn).__name__ == "_ExamplesAttentionBackward"
    assert out.shape == (1, 29, 4, 8) and torch.equal(out, ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), ref_grads, strict=True):
        assert torch.equal(got, want)
    # what backward keeps: q, k, v, the returned output itself (no per-example copy of it) and the logsumexps
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    assert out.untyped_storage().data_ptr() in storages
    big = sorted(n for n in storages.values() if n >= k.numel() * k.element_size())
    assert big == sorted([k.numel() * k.element_size()] * 2 + [q.numel() * q.element_size()] * 2)
    # dropout (or no autograd): transformers' SDPA per example, the same numbers
    with torch.no_grad():
        plain, _ = padding_free._attention(attn, q, k, v, None, lorakit_segments=bounds, scaling=0.3)
    assert torch.equal(plain, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[5, 5, 5, 3, 9, 9], [6, 6, 6, 6], [4, 7, 4]])
def test_adjacent_examples_of_one_length_run_as_one_kernel_batch(sizes, dtype, attention_calls):
    """Runs of adjacent equal-length examples go to the kernel as one batch (views, no copies); every
    example's output and q/k/v gradients equal those of SDPA called per example (the reference) up to
    float rounding (the batched kernel splits its work over threads differently: the last bit moves)."""
    n = sum(sizes)
    bounds = tuple(int(b) for b in torch.tensor([0, *sizes]).cumsum(0))
    g = torch.Generator().manual_seed(1)

    def leaf(heads):  # [1, heads, N, d] over a [1, N, heads, d] tensor, as the model's projections give it
        return torch.randn(1, n, heads, 8, generator=g, dtype=dtype).transpose(1, 2).requires_grad_(True)

    q, k, v = leaf(6), leaf(2), leaf(2)
    attn = torch.nn.Module()
    attn.num_key_value_groups = 3
    dout = torch.randn(1, n, 6, 8, generator=g, dtype=dtype)
    ref = _stock_examples(q, k, v, sizes, 0.25)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out, _ = padding_free._attention(attn, q, k, v, None, lorakit_segments=bounds, scaling=0.25)
    runs = [length for i, length in enumerate(sizes) if i == 0 or sizes[i - 1] != length]
    assert attention_calls == runs  # one kernel call per run of one length
    tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), ref_grads, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
