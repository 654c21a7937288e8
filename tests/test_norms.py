"""The output-saving RMSNorm route: gradients against float64 autograd, what it saves, which modules it takes,
its call-time fallbacks, a whole LoRA model against the unrouted one, copies and undo."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import make_llama
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import lorakit
from lorakit import routing
from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
from lorakit.norms import route_rms_norms, unroute_rms_norms

OWNER = "lorakit.norms"


def llama_norm(hidden=48, seed=0, low=-1.5, high=1.5):
    """A frozen LlamaRMSNorm with a random weight (signs of both kinds, none near zero)."""
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        w = torch.empty(hidden).uniform_(low, high)
        norm.weight.copy_(torch.where(w.abs() < 0.05, torch.full_like(w, 0.3), w))
    norm.weight.requires_grad_(False)
    return norm


def reference(x, weight, eps, dy):
    """Output and input gradient of ``w x / sqrt(mean(x²) + eps)`` in float64 autograd."""
    x64 = x.detach().double().requires_grad_(True)
    y = weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    y.backward(dy.double())
    return y.detach(), x64.grad


def input_grad(norm, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = norm(x)
    y.backward(dy)
    return y.detach(), x.grad


def test_routed_norm_matches_float64_and_its_own_forward_bitwise():
    norm = llama_norm()
    x, dy = torch.randn(3, 20, 48) * 2, torch.randn(3, 20, 48)
    own_y, own_dx = input_grad(norm, x, dy)
    assert route_rms_norms(norm) == 1 and routing.forward_owner(norm) == OWNER
    y, dx = input_grad(norm, x, dy)
    assert torch.equal(y, own_y)  # the same ops in the same order
    ref_y, ref_dx = reference(x, norm.weight, 1e-5, dy)
    # fp32 against float64: within a few ulps of the gradient's scale, as the stock autograd path is
    scale = ref_dx.abs().max()
    assert (dx.double() - ref_dx).abs().max() <= 4e-7 * scale
    assert (own_dx.double() - ref_dx).abs().max() <= 4e-7 * scale
    assert not torch.equal(dx, torch.zeros_like(dx))


def test_it_saves_the_output_not_the_input():
    norm = llama_norm()
    route_rms_norms(norm)
    x = (torch.randn(64, 48) * 2).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = norm(x * 1.0)  # a fresh tensor as the residual stream would be
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert y.untyped_storage().data_ptr() in ptrs
    assert sum(t.numel() for t in saved) == y.numel() + 64 + 48  # y, rstd [64, 1], the weight
    unroute_rms_norms(norm)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x1 = x * 1.0
        y = norm(x1)
    assert x1.untyped_storage().data_ptr() in {t.untyped_storage().data_ptr() for t in saved}  # stock: input kept


def test_which_modules_are_routed():
    ones = LlamaRMSNorm(16)
    ones.weight.requires_grad_(False)
    gemma = GemmaRMSNorm(16)  # (1 + w): a different formula, left alone
    layer_norm = torch.nn.LayerNorm(16)
    torch_rms = torch.nn.RMSNorm(16, eps=None)  # torch's own, default eps
    zero = llama_norm(16)
    with torch.no_grad():
        zero.weight[3] = 0.0  # x̂ cannot come back through a zero
    model = torch.nn.ModuleList([ones, gemma, layer_norm, torch_rms, zero])
    assert route_rms_norms(model) == 2
    assert [routing.forward_owner(m) for m in model] == [OWNER, None, None, OWNER, None]
    assert route_rms_norms(model) == 0  # already routed: not again
    torch_rms.weight.requires_grad_(False)
    x, dy = torch.randn(5, 16), torch.randn(5, 16)
    y, dx = input_grad(torch_rms, x, dy)
    ref_y, ref_dx = reference(x, torch_rms.weight, torch.finfo(torch.float32).eps, dy)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-5, atol=1e-6)


def test_call_time_fallbacks_run_the_modules_own_forward():
    norm = llama_norm()
    route_rms_norms(norm)
    x, dy = torch.randn(4, 48), torch.randn(4, 48)
    # bf16 input (a bf16 base): the module's own forward
    xb = x.bfloat16().requires_grad_(True)
    yb = norm(xb)
    assert torch.equal(yb, LlamaRMSNorm.forward(norm, xb)) and type(yb.grad_fn).__name__ != "_RmsNormFnBackward"
    # no autograd: no autograd function
    with torch.no_grad():
        assert norm(x).grad_fn is None
    # a trained weight gets its gradient (the route needs a frozen one)
    norm.weight.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    norm(xr).backward(dy)
    assert norm.weight.grad is not None and xr.grad is not None
    norm.weight.requires_grad_(False)
    assert type(norm(xr).grad_fn).__name__ == "_RmsNormFnBackward"
    # a zero written into the weight after routing: seen through its version counter, the own path takes over
    with torch.no_grad():
        norm.weight[0] = 0.0
    y = norm(xr)
    assert type(y.grad_fn).__name__ != "_RmsNormFnBackward"
    y.backward(dy)
    assert torch.isfinite(xr.grad).all()


def lora_model(layers=2):
    model = make_llama(layers=layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    torch.manual_seed(1)
    model = lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    fuse_swiglu_mlps(model)
    fuse_shared_inputs(model)
    return model.train()


def step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_lora_model_routed_trains_as_the_unrouted_one():
    model = lora_model()
    ids = torch.randint(0, 96, (2, 24))
    loss0, grads0 = step(model, ids)
    assert route_rms_norms(model) == 2 * 2 + 1  # two per decoder layer and the final norm
    loss1, grads1 = step(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    # copies keep the route; merge_and_unload hands back the stock modules
    copied = copy.deepcopy(model)
    assert routing.forward_owner(copied.model.norm) == OWNER
    buf = io.BytesIO()
    torch.save(model, buf)
    plain = lorakit.merge_and_unload(model)
    assert all(routing.forward_owner(m) is None for m in plain.modules())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_routed_norms_under_the_training_loop_setup(checkpointing):
    from lorakit.train.recompute import enable_checkpointing

    model = lora_model()
    ids = torch.randint(0, 96, (2, 24))
    loss0, grads0 = step(model, ids)
    route_rms_norms(model)
    if checkpointing:
        enable_checkpointing(model, lambda msg: None)
    loss1, grads1 = step(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_in_place_write_to_the_output_is_an_error_not_a_wrong_gradient():
    norm = llama_norm()
    route_rms_norms(norm)
    x = torch.randn(4, 48, requires_grad=True)
    y = norm(x)
    y.mul_(2.0)  # the saved output changed under autograd's feet
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
