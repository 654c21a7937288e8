"""Fused SwiGLU MLP routing: same numbers as the model's own forward, less saved memory, clean fallback."""

from __future__ import annotations

import copy

import torch
from conftest import make_llama
from torch import nn

import lorakit
from lorakit import routing
from lorakit.fusion import fuse_swiglu_mlps, unfuse_mlps


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def saved_bytes(model, ids):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total


def test_fused_mlp_matches_own_forward_float64(input_ids):
    model = lorakit.inject(
        make_llama(bias=True).double(), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    ).train()
    twin = copy.deepcopy(model)
    assert fuse_swiglu_mlps(model) == 2
    ref_loss, ref_grads = loss_and_grads(twin, input_ids)
    loss, grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-12, msg=k)


def test_fused_mlp_saves_memory_and_falls_back(input_ids):
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear")).train()
    before = saved_bytes(model, input_ids)
    fuse_swiglu_mlps(model)
    assert saved_bytes(model, input_ids) < before
    # Two active adapters: the model's own forward runs (and gives the unfused result).
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False))
    lorakit.set_adapter(model, ["default", "b"])
    with torch.no_grad():
        fused_out = model(input_ids=input_ids).logits
        unfuse_mlps(model)
        torch.testing.assert_close(model(input_ids=input_ids).logits, fused_out)
    assert routing.forward_owner(model.model.layers[0].mlp) is None


def test_merge_and_unload_of_fused_model_is_plain(input_ids):
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    fuse_swiglu_mlps(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    plain = lorakit.merge_and_unload(model)
    assert routing.forward_owner(plain.model.layers[0].mlp) is None
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)
