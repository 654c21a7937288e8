"""LoRA-aware gradient checkpointing: same gradients as no checkpointing, minus the MLP-output rerun."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_llama
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import lorakit
from lorakit import ops, rerun
from lorakit.fusion import fuse_swiglu_mlps
from lorakit.train.recompute import disable_checkpointing, enable_checkpointing

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    head_dim=8,
)


class MatmulCounter(TorchDispatchMode):
    """Counts matmul kernels dispatched while active."""

    NAMES = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.NAMES:
            self.n += 1
        return func(*args, **(kwargs or {}))


def lora(model, dropout=0.0):
    torch.manual_seed(1)
    return lorakit.inject(
        model,
        lorakit.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False
        ),
    ).train()


def run(model, ids, seed=7):
    """Loss, LoRA grads and the number of matmuls in backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout seeds come from the global RNG
    loss = model(input_ids=ids, labels=ids).loss
    with MatmulCounter() as count:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, count.n


def stock_checkpointing(model):
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def assert_same(a, b, tol=1e-10):
    assert torch.allclose(a[0], b[0], atol=tol, rtol=0)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-mlp", "per-module"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grads_equal_no_checkpointing_and_mlp_output_skipped(input_ids, fused, dropout):
    base = lora(make_llama(bias=True).double(), dropout)
    if fused:
        assert fuse_swiglu_mlps(base) == 2
    plain, stock, ours = base, copy.deepcopy(base), copy.deepcopy(base)
    stock_checkpointing(stock)
    assert enable_checkpointing(ours) == 2
    ref, with_stock, with_ours = run(plain, input_ids), run(stock, input_ids), run(ours, input_ids)
    assert_same(ref, with_stock)
    assert_same(ref, with_ours)
    # stock reruns every forward matmul; ours skips down_proj's base matmul and its LoRA up-projection
    assert with_stock[2] - with_ours[2] == 2 * 2
    assert with_stock[2] > ref[2]


def test_skip_only_inside_recompute_and_disable_restores(input_ids):
    model = lora(make_llama().double())
    enable_checkpointing(model)
    layer = model.model.layers[0]
    assert rerun.is_marked(layer.mlp) and rerun.is_marked(layer.mlp.down_proj)
    assert not rerun.in_rerun() and not rerun.output_unread(layer.mlp)
    with torch.no_grad():  # an ordinary forward of a marked model computes real outputs
        model.eval()
        out = model(input_ids=input_ids).logits
        model.train()
    disable_checkpointing(model)
    assert not any(rerun.is_marked(m) for m in model.modules())
    assert not model.model.layers[0].gradient_checkpointing
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=input_ids).logits, out)


def test_compute_output_false_keeps_backward_inputs():
    """compute_output=False saves what backward needs: the grads match a full forward's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W, A, B = (torch.randn(s, dtype=torch.float64, generator=g) for s in [(5, 8), (3, 8), (5, 3)])
    A.requires_grad_(), B.requires_grad_()
    dy = torch.randn(6, 5, dtype=torch.float64, generator=g)
    grads = []
    for compute in (True, False):
        y = ops.lora_linear(x, W, None, A, B, 0.5, compute_output=compute)
        grads.append(torch.autograd.grad(y, (x, A, B), dy))
    for full, skipped in zip(*grads):
        torch.testing.assert_close(full, skipped)


@pytest.mark.parametrize(
    "make, marked",
    [
        (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)), 2),
        (lambda: GemmaForCausalLM(GemmaConfig(**SMALL)), 2),  # gelu MLP: per-module down_proj path
        (lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL)), 0),  # a norm after the MLP saves its output: no skip
    ],
    ids=["qwen2", "gemma", "gemma2"],
)
def test_other_layouts(input_ids, make, marked):
    torch.manual_seed(0)
    base = lora(make().double())
    fuse_swiglu_mlps(base)
    ours = copy.deepcopy(base)
    assert enable_checkpointing(ours) == marked
    assert_same(run(base, input_ids), run(ours, input_ids))


def test_every_n_layers(input_ids):
    base = lora(make_llama(layers=4).double())
    fuse_swiglu_mlps(base)
    ours = copy.deepcopy(base)
    assert enable_checkpointing(ours, every_n_layers=2) == 2
    assert [layer.gradient_checkpointing for layer in ours.model.layers] == [True, False, True, False]
    assert [rerun.is_marked(layer.mlp) for layer in ours.model.layers] == [True, False, True, False]
    every = copy.deepcopy(base)
    enable_checkpointing(every)
    ref, half, full = run(base, input_ids), run(ours, input_ids), run(every, input_ids)
    assert_same(ref, half)
    assert ref[2] < half[2] < full[2]  # half the layers rerun
    with pytest.raises(lorakit.ConfigError, match="at least 1"):
        enable_checkpointing(copy.deepcopy(base), every_n_layers=0)
