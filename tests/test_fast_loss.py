"""The label-only chunked loss equals the full-logits loss, value and gradients (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lorakit
from conftest import make_gpt2, make_llama
from lorakit.train.fast import causal_lm_loss, split_head


def reference(model, batch):
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def batch_for(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 9:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("factory, targets", [
    (make_llama, ["q_proj", "v_proj", "down_proj"]),
    (make_llama, ["q_proj", "lm_head"]),  # adapted head: generic path
    (make_gpt2, ["c_attn"]),
])
def test_matches_full_logits_float64(factory, targets):
    base = factory().double()
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()  # no dropout
    twin = copy.deepcopy(model)
    batch = batch_for(model.config.vocab_size)
    ours, n = causal_lm_loss(model, batch, chunk_size=7)
    theirs, m = reference(twin, batch)
    assert n == m == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    grads = {k: p.grad for k, p in twin.named_parameters() if p.requires_grad}
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-10, atol=1e-12, msg=k)


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
