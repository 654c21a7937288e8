"""Quantized bases (4-bit bitsandbytes, int8) inside lorakit's fused ops and fusions.

References: the float64 LoRA formula under autograd over the dequantized weights
(decoded independently: test_quant's NF4 table decoder; int8 codes times scales),
and the same model run unfused (one per-layer op per projection).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from tiny import count_dequantized, swiglu_reference64

pytest.importorskip("bitsandbytes")

from test_quant import linear4bit, reference_dequant  # noqa: E402

import lorakit  # noqa: E402
from lorakit import int8, int8_model, ops, quant, quant_model, swiglu  # noqa: E402
from lorakit.branches import LoraSpec  # noqa: E402
from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps  # noqa: E402

NO_INT8 = int8.int8_support()
KINDS = ["nf4", pytest.param("int8", marks=pytest.mark.skipif(NO_INT8 is not None, reason=str(NO_INT8)))]


def quantized_layer(kind: str, out_f: int, in_f: int, seed: int, bias: bool):
    """(the QuantizedBase, its weight decoded in float64 without lorakit's dequantization)."""
    if kind == "nf4":
        layer, _ = linear4bit(out_f, in_f, "nf4", True, bias=bias, seed=seed)
        return quant.quantized_base(layer), reference_dequant(layer.weight.data, layer.weight.quant_state)
    torch.manual_seed(seed)
    layer = int8.Int8Linear.from_linear(torch.nn.Linear(in_f, out_f, bias=bias))
    return quant.quantized_base(layer), layer.qweight.double() * layer.weight_scale.double()[:, None]


def lora_pair(out_f: int, in_f: int, r: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, in_f, generator=gen) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r, generator=gen) * 0.1).requires_grad_()
    return A, B


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


# int8 quantizes the activations per row (and dY for grad x): about 1% relative error on random data;
# everything that does not pass through the base (grad A, grad B) is exact up to fp32 rounding.
TOL = {"nf4": 1e-5, "int8": 3e-2}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_multi_over_quantized_bases_matches_float64(kind, dropout):
    sizes = [(64, 0, True), (32, 1, False), (32, 2, False)]  # q, k, v: out, seed, bias
    bases, Ws = zip(*[quantized_layer(kind, o, 64, s, b) for o, s, b in sizes])
    pairs = [lora_pair(o, 64, r, 10 + i) for i, ((o, _, _), r) in enumerate(zip(sizes, (4, 8, 2)))]
    specs = [LoraSpec(b, b.bias, A, B, 1.5) for b, (A, B) in zip(bases, pairs)]
    torch.manual_seed(3)
    x = torch.randn(2, 7, 64, requires_grad=True)
    mask = (torch.rand(2, 7, 64) > dropout).float() / (1 - dropout) if dropout else None
    outs = ops.lora_linear_multi(x, specs, dropout_p=dropout, dropout_mask=mask)
    dys = [torch.randn_like(y) for y in outs]
    leaves = [x, *(t for pair in pairs for t in pair)]
    grads = torch.autograd.grad(outs, leaves, dys)

    x64 = x.detach().double().requires_grad_()
    p64 = [(A.detach().double().requires_grad_(), B.detach().double().requires_grad_()) for A, B in pairs]
    xd = x64 * mask.double() if mask is not None else x64
    ref = []
    for base, W, (A, B) in zip(bases, Ws, p64):
        y = x64 @ W.t() + 1.5 * (xd @ A.t()) @ B.t()
        ref.append(y + base.bias.double() if base.bias is not None else y)
    want = torch.autograd.grad(ref, [x64, *(t for pair in p64 for t in pair)], [d.double() for d in dys])
    for y, y64 in zip(outs, ref):
        assert y.dtype == torch.float32 and rel_err(y, y64) < TOL[kind]
    assert rel_err(grads[0], want[0]) < TOL[kind]  # grad x goes through the base
    for g, w in zip(grads[1:], want[1:]):  # grad A, grad B do not
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)

    # The same, one per-layer op per projection: equal up to fp32 rounding.
    singles = [
        quant.lora_linear_quantized(x, b, A, B, 1.5, dropout_p=dropout, dropout_mask=mask)
        for b, (A, B) in zip(bases, pairs)
    ]
    for y, y1 in zip(outs, singles):
        torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(singles, leaves, dys)[0], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_swiglu_over_quantized_bases_matches_float64(kind):
    (gate, Wg), (up, Wu), (down, Wd) = (
        quantized_layer(kind, 128, 64, 0, False),
        quantized_layer(kind, 128, 64, 1, False),
        quantized_layer(kind, 64, 128, 2, False),
    )
    pairs = [lora_pair(128, 64, 4, 5), lora_pair(128, 64, 4, 6), lora_pair(64, 128, 8, 7)]
    specs = [LoraSpec(b, None, A, B, 2.0) for b, (A, B) in zip((gate, up, down), pairs)]
    torch.manual_seed(4)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = swiglu.lora_swiglu_mlp(x, *specs)
    dy = torch.randn_like(y)
    leaves = [x, *(t for pair in pairs for t in pair)]
    grads = torch.autograd.grad(y, leaves, dy)

    x64, p64, _, y64 = swiglu_reference64(x, (Wg, Wu, Wd), pairs, 2.0)
    want = torch.autograd.grad(y64, [x64, *(t for pair in p64 for t in pair)], dy.double())
    assert rel_err(y, y64) < TOL[kind]
    for g, w in zip(grads, want):  # every gradient passes a base here (down's input h comes from gate/up)
        assert rel_err(g, w) < TOL[kind] * (2 if kind == "int8" else 1)


def quantized_llama(kind: str):
    model = make_llama(seed=0)
    if kind == "nf4":
        quant_model.quantize(model, "nf4", True, compute_dtype="fp32")
    else:
        int8_model.quantize_int8(model)
    torch.manual_seed(1)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return lorakit.inject(model, config).train()


def loss_grads_saved(model, ids):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_quantized_model_equals_unfused(kind, input_ids):
    model = quantized_llama(kind)
    twin = quantized_llama(kind)
    assert fuse_swiglu_mlps(model) == 2 and fuse_shared_inputs(model) == 4  # 2 MLPs; q/k/v, gate/up groups
    ref_loss, ref_grads, ref_saved = loss_grads_saved(twin, input_ids)
    loss, grads, saved = loss_grads_saved(model, input_ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert saved < 0.8 * ref_saved  # x once per q/k/v group, g and u only in the MLP


def test_fused_4bit_model_saves_no_weight_and_one_dequantized_at_a_time(monkeypatch, input_ids):
    model = quantized_llama("nf4")
    fuse_swiglu_mlps(model)
    fuse_shared_inputs(model)
    peak, alive = count_dequantized(monkeypatch)
    saved_ptrs = []

    def pack(t):
        saved_ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert len(alive) == 0 or all(r() is None for r in alive)
    assert peak[0] == 1
    codes = {m.weight.data.untyped_storage().data_ptr() for m in model.modules() if type(m).__name__ == "Linear4bit"}
    assert codes and not codes & set(saved_ptrs)  # not even the 4-bit codes are saved for backward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_quantized_model_with_checkpointing_same_grads(kind, input_ids):
    from lorakit.train.recompute import enable_checkpointing

    model, twin = quantized_llama(kind), quantized_llama(kind)
    for m in (model, twin):
        fuse_swiglu_mlps(m)
        fuse_shared_inputs(m)
    enable_checkpointing(model, lambda *a, **k: None)
    ref_loss, ref_grads, _ = loss_grads_saved(twin, input_ids)
    loss, grads, _ = loss_grads_saved(model, input_ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
