"""The label-only chunked loss equals the full-logits loss, value and gradients (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_gpt2, make_llama

import lorakit
from lorakit.logprobs import split_head
from lorakit.train.lm_loss import causal_lm_loss


def reference(model, batch):
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def assert_matches_reference(model, batch, **kwargs):
    """causal_lm_loss on ``model`` equals the full-logits loss of an untouched copy: value, count, LoRA grads."""
    twin = copy.deepcopy(model)
    ours, n = causal_lm_loss(model, batch, **kwargs)
    theirs, m = reference(twin, batch)
    assert n == m == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    grads = {k: p.grad for k, p in twin.named_parameters() if p.requires_grad}
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-10, atol=1e-12, msg=k)


def batch_for(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 9:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(
    "factory, targets",
    [
        (make_llama, ["q_proj", "v_proj", "down_proj"]),
        (make_llama, ["q_proj", "lm_head"]),  # adapted head: generic path
        (make_gpt2, ["c_attn"]),
    ],
)
def test_matches_full_logits_float64(factory, targets):
    base = factory().double()
    model = lorakit.inject(
        base, lorakit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    ).eval()  # no dropout
    assert_matches_reference(model, batch_for(model.config.vocab_size), chunk_size=7)


def test_split_head_refuses_softcapping():
    model = make_llama()
    assert split_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert split_head(model) is None


def test_no_label_tokens_gives_zero():
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    batch = batch_for(96)
    batch["labels"][:] = -100
    loss, n = causal_lm_loss(model, batch)
    assert n == 0 and loss.item() == 0.0


def _backbone_masks(model):
    """Records the attention_mask each backbone call receives."""
    seen = []
    backbone, _ = split_head(model)
    backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    return seen


def _left_padded(batch):
    """The same rows, padding moved to the front (row 2 has 3 padding tokens)."""
    out = {k: v.clone() for k, v in batch.items()}
    for k in out:
        out[k][2] = torch.roll(batch[k][2], 3)
    return out


@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_padding_mask_dropped_only_for_right_padding(padding):
    """Right padding runs mask-free (causal attention never lets a real token see it); the loss and
    gradients still equal the full model called with the mask. Left padding keeps its mask."""
    model = lorakit.inject(
        make_llama().double(),
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False),
    )
    batch = batch_for(model.config.vocab_size)
    if padding == "left":
        batch = _left_padded(batch)
    elif padding == "none":
        batch["attention_mask"][:] = 1
    seen = _backbone_masks(model)
    assert_matches_reference(model, batch)
    assert (seen[0] is None) == (padding != "left")


def test_right_padding_with_sliding_window_float64():
    """A sliding window shorter than the batch: the mask-free causal mask keeps the window."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def qwen2(window: bool):
        torch.manual_seed(0)
        return (
            Qwen2ForCausalLM(
                Qwen2Config(
                    vocab_size=96,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=64,
                    use_sliding_window=window,
                    sliding_window=4,
                    max_window_layers=0,
                )
            )
            .double()
            .eval()
        )

    base = qwen2(window=True)
    assert base.config.layer_types == ["sliding_attention"] * 2
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = batch_for(base.config.vocab_size)
    seen = _backbone_masks(model)
    assert_matches_reference(model, batch)
    assert seen[0] is None
    # and the window matters here: the same weights with full causal attention give another loss
    full = qwen2(window=False)
    assert full.config.layer_types == ["full_attention"] * 2
    assert not torch.allclose(reference(full, batch)[0], reference(qwen2(window=True), batch)[0])


def test_bidirectional_attention_keeps_the_mask():
    """Gemma's use_bidirectional_attention: padding is visible to every token, so the mask must stay."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    base = GemmaForCausalLM(
        GemmaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            use_bidirectional_attention=True,
        )
    ).double()
    assert base.model.layers[0].self_attn.is_causal is False
    model = lorakit.inject(
        base.eval(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    seen = _backbone_masks(model)
    assert_matches_reference(model, batch_for(96))
    assert seen[0] is not None


def test_token_type_ids_keep_the_mask():
    """token_type_ids can mean a prefix-LM mask (PaliGemma); such batches keep their padding mask."""
    model = lorakit.inject(
        make_gpt2().double(), lorakit.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    )
    batch = batch_for(96)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    seen = _backbone_masks(model)
    assert_matches_reference(model, batch)
    assert seen[0] is not None
