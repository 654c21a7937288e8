"""Shared-input fusion (q/k/v as one op): same numbers as the per-module path, fewer autograd nodes,
clean fallbacks (other inputs, several adapters, merged, disabled, eval), checkpointing, copies, undo."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import make_llama
from transformers import BartConfig, BartForConditionalGeneration

import lorakit
from lorakit import ops, routing
from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps, unfuse_mlps, unfuse_shared_inputs
from lorakit.layers import LoraLinear


def lora_llama(dropout=0.0, targets="all-linear"):
    model = make_llama(bias=True).double()
    torch.manual_seed(1)
    return lorakit.inject(
        model,
        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=False),
    ).train()


def lora_fn_nodes(loss):
    """How many _LoraLinearFn nodes the autograd graph of ``loss`` holds."""
    seen, todo, count = set(), [loss.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_LoraLinearFnBackward"
        todo += [nxt for nxt, _ in node.next_functions]
    return count


def run(model, ids, seed=7):
    """Loss, LoRA grads and the number of _LoraLinearFn nodes of one forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout seeds come from the global RNG
    loss = model(input_ids=ids, labels=ids).loss
    nodes = lora_fn_nodes(loss)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, nodes


def assert_same(a, b, tol=1e-12):
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=tol, msg=name)


def groups(model):
    return {m.shared_input for m in model.modules() if isinstance(m, LoraLinear) and m.shared_input is not None}


def test_fused_matches_per_module_float64(input_ids):
    plain = lora_llama()
    mlp_only, both = copy.deepcopy(plain), copy.deepcopy(plain)
    assert fuse_swiglu_mlps(mlp_only) == 2
    assert fuse_swiglu_mlps(both) == 2
    assert fuse_shared_inputs(both) == 4  # q/k/v per layer, and gate/up (inert while the MLP op runs)
    ref, mid, fused = run(plain, input_ids), run(mlp_only, input_ids), run(both, input_ids)
    assert_same(ref, mid)
    assert_same(ref, fused)
    assert (ref[2], mid[2], fused[2]) == (14, 8, 4)  # per layer: 7 Linears -> q,k,v,o -> qkv,o
    assert all(g.x is None and not g.stash and not g.off for g in groups(both))  # nothing held after forward


def test_dropout_in_a_fused_model(input_ids):
    plain = lora_llama(dropout=0.1)
    fused = copy.deepcopy(plain)
    fuse_shared_inputs(fused)
    a, b = run(plain, input_ids), run(fused, input_ids)
    assert b[2] == a[2] - 2 * 3 and all(torch.isfinite(g).all() for g in b[1].values())
    assert not torch.equal(a[0], b[0])  # one mask per group instead of one per module: other draws
    for m in (plain, fused):
        m.eval()  # dropout off: the per-module path, exactly
    assert torch.equal(run(plain, input_ids)[0], run(fused, input_ids)[0])


def test_gate_up_group_without_lora_on_down(input_ids):
    plain = lora_llama(targets=["q_proj", "v_proj", "gate_proj", "up_proj"])
    fused = copy.deepcopy(plain)
    assert fuse_swiglu_mlps(fused) == 0  # down_proj has no LoRA: the SwiGLU op does not apply
    assert fuse_shared_inputs(fused) == 4  # (q, v) and (gate, up) per layer
    ref, got = run(plain, input_ids), run(fused, input_ids)
    assert_same(ref, got)
    assert (ref[2], got[2]) == (8, 4)


def qkv(attn, x):
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def test_dropout_one_mask_per_group_as_lora_linear_multi():
    model = lora_llama(dropout=0.3)
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    specs = [
        ops.LoraSpec(m.weight, m.bias, m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"])
        for m in (attn.q_proj, attn.k_proj, attn.v_proj)
    ]
    torch.manual_seed(3)
    got = qkv(attn, x)
    torch.manual_seed(3)
    ref = ops.lora_linear_multi(x, specs, dropout_p=0.3, training=True)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    # gradients too: the fused op is the same autograd function
    params = [x, *(s.lora_A for s in specs), *(s.lora_B for s in specs)]
    grads_got = torch.autograd.grad(sum(o.square().sum() for o in got), params)
    grads_ref = torch.autograd.grad(sum(o.square().sum() for o in ref), params)
    for g, r in zip(grads_got, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # dropout is on in training (another draw gives another output) and off in eval (per-module, exact)
    torch.manual_seed(4)
    assert not torch.equal(attn.q_proj(x), got[0])
    model.eval()
    with torch.no_grad():
        no_drop = ops.lora_linear_multi(x, specs, dropout_p=0.0, training=False)
        for g, r in zip(qkv(attn, x), no_drop):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert attn.q_proj.shared_input.x is None  # eval did not fuse


def test_sibling_with_another_input_computes_alone_then_group_stops_fusing(input_ids):
    model = lora_llama()
    twin = copy.deepcopy(model)
    fuse_shared_inputs(model)
    attn, ref = model.model.layers[0].self_attn, twin.model.layers[0].self_attn
    x, y = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    group = attn.q_proj.shared_input
    q = attn.q_proj(x)
    assert group.x is x and len(group.stash) == 2
    k = attn.k_proj(y)  # cross-attention-like: k reads other states
    assert group.x is None and not group.stash and group.missed
    v = attn.v_proj(x)  # the stash is gone: computed alone
    for got, want in zip((q, k, v), (ref.q_proj(x), ref.k_proj(y), ref.v_proj(x))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    attn.q_proj(x)  # the next call outside backward: the group no longer fuses
    assert group.off and group.x is None
    assert fuse_shared_inputs(model) == 4  # re-armed
    group = attn.q_proj.shared_input
    x2 = x.clone()
    attn.q_proj(x2)
    x2.add_(1)  # an in-place change after the leader call voids the stash as well
    torch.testing.assert_close(attn.k_proj(x2), ref.k_proj(x2), rtol=1e-12, atol=1e-12)
    assert group.missed


def test_cross_attention_with_checkpointing_matches_per_module():
    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=50,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        dropout=0.0,
    )
    base = BartForConditionalGeneration(cfg).double()
    lorakit.inject(
        base,
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False),
    )
    base.train()
    fused = copy.deepcopy(base)
    assert fuse_shared_inputs(fused) == 3  # encoder self, decoder self, decoder cross
    fused.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # fuse, learn that the cross-attention group reads two inputs, stop fusing it
        ref, got = run(base, ids), run(fused, ids)
        assert_same(ref, got)
    cross = fused.model.decoder.layers[0].encoder_attn.q_proj.shared_input
    own = fused.model.decoder.layers[0].self_attn.q_proj.shared_input
    assert cross.off and not own.off
    assert got[2] == ref[2] - 2 * 2  # the two self-attention groups: 3 nodes -> 1


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_same_grads(input_ids, dropout):
    model = lora_llama(dropout)
    fuse_swiglu_mlps(model)
    fuse_shared_inputs(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref, got = run(model, input_ids), run(checkpointed, input_ids)
    assert_same(ref, got)
    assert got[2] == ref[2] == 4


def test_several_adapters_merged_disabled_take_the_per_module_path(input_ids):
    plain = lora_llama()
    for name, targets in (("b", "all-linear"), ("c", ["q_proj", "k_proj"])):
        lorakit.add_adapter(plain, name, lorakit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    fused = copy.deepcopy(plain)
    fuse_shared_inputs(fused)

    def both(check):
        a, b = run(plain, input_ids), run(fused, input_ids)
        assert torch.equal(a[0], b[0]) and a[2] == b[2], check
        for name in a[1]:
            assert torch.equal(a[1][name], b[1][name]), (check, name)

    for m in (plain, fused):
        lorakit.set_adapter(m, ["default", "b"])
    both("two adapters")
    for m in (plain, fused):
        lorakit.set_adapter(m, "c")  # q and k run "c", v runs nothing: no common adapter
    both("adapter only on q and k")
    for m in (plain, fused):
        lorakit.set_adapter(m, "default")
        lorakit.merge(m)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=input_ids).logits, fused(input_ids=input_ids).logits)
    for m in (plain, fused):
        lorakit.unmerge(m)
    with lorakit.disable_adapters(plain), lorakit.disable_adapters(fused):
        assert torch.equal(
            plain(input_ids=input_ids, labels=input_ids).loss, fused(input_ids=input_ids, labels=input_ids).loss
        )


def test_for_inference_and_back(input_ids):
    plain = lora_llama()
    fused = copy.deepcopy(plain)
    fuse_shared_inputs(fused)
    for m in (plain, fused):
        lorakit.for_inference(m)
    assert routing.forward_owner(fused.model.layers[0].self_attn.q_proj) == "lorakit.layers"  # merged shortcut
    with torch.no_grad():
        assert torch.equal(plain(input_ids=input_ids).logits, fused(input_ids=input_ids).logits)
    for m in (plain, fused):
        lorakit.for_training(m)
    ref, got = run(plain, input_ids), run(fused, input_ids)
    assert_same(ref, got)
    assert got[2] == ref[2] - 2 * 3  # per layer: q,k,v -> 1 node, gate,up -> 1


def test_state_dict_copies_and_undo(input_ids):
    model = lora_llama()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    fuse_swiglu_mlps(model)
    fuse_shared_inputs(model)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert not any("shared_input" in name for name, _ in model.named_modules())
    model.model.layers[0].self_attn.q_proj(torch.randn(1, 3, 32, dtype=torch.float64))  # a live stash
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    ref = run(plain, input_ids)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        group = twin.model.layers[0].self_attn.q_proj.shared_input
        assert group.x is None and not group.stash
        assert group.members[1] is twin.model.layers[0].self_attn.k_proj
        assert twin.model.layers[0].mlp.forward.args[0] is twin.model.layers[0].mlp
        assert routing.forward_owner(twin.model.layers[0].mlp) == "lorakit.fusion"
        got = run(twin, input_ids)
        assert_same(ref, got)
        assert got[2] == 2 * 2  # q,k,v -> 1 node and o per layer; the MLPs run as one _SwigluFn
    unfuse_shared_inputs(model)
    unfuse_mlps(model)
    assert not groups(model)
    assert all("shared_input" not in m.__dict__ and routing.forward_owner(m) is None for m in model.modules())
    assert run(model, input_ids)[2] == ref[2]
    fuse_swiglu_mlps(model)
    fuse_shared_inputs(model)
    merged = lorakit.merge_and_unload(model)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not groups(merged)
