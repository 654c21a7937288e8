"""The int8 output head for inference (lorakit.int8_head): against float64 of the same codes, the paths it takes,
rounding, gradients, the switch-off, and what --quantize int8 does with a model's head.

Independent references: float64 products of the same int8 codes and scales (only fp32 summation rounds), the
half-a-step rounding bound of the codes against the fp32 weight, autograd through the dequantized weight, and
torch's profiler (which path ran).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_model_dir  # noqa: E402

from lorakit import int8, int8_head, int8_model  # noqa: E402
from lorakit.int8_head import BLOCK, ROWS_MAX, Int8Head  # noqa: E402
from lorakit.io import touches_output_head  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def head_and_rows(v=2 * BLOCK + 37, k=96, bias=False, seed=0):
    """A head wider than two blocks (the last one partial), rows of very different size."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, v, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(v, k, generator=g) * torch.rand(v, 1, generator=g))
        lin.weight[3] = 0.0  # an all-zero vocabulary row: scale 1, codes 0
        if bias:
            lin.bias.copy_(torch.randn(v, generator=g))
    x = torch.randn(40, k, generator=g) * torch.rand(40, 1, generator=g) * 4
    return lin, x


def load(path: Path, tied: bool):
    """The tiny model, its head tied to the input embedding or not (the checkpoint stores both untied)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, tie_word_embeddings=tied)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def reference(head: Int8Head, x: torch.Tensor) -> torch.Tensor:
    w64 = head.qweight.double() * head.weight_scale.double()[:, None]
    y = x.double() @ w64.t()
    return y if head.bias is None else y + head.bias.double()


def test_codes_round_to_nearest_within_half_a_step():
    lin, _ = head_and_rows()
    head = Int8Head.from_linear(lin)
    W = lin.weight.detach().double()
    assert head.qweight.dtype == torch.int8 and int(head.qweight.abs().max()) == 127  # 8 bits on every CPU
    assert float(head.weight_scale[3]) == 1.0 and not head.qweight[3].any()
    err = (head.dequantized(torch.float64) - W).abs()
    assert (err <= head.weight_scale.double()[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, ROWS_MAX, ROWS_MAX + 1, 40])
def test_matches_float64_of_the_same_codes(rows, bias):
    lin, x = head_and_rows(bias=bias)
    head = Int8Head.from_linear(lin)
    with torch.inference_mode():
        got = head(x[:rows])
    want = reference(head, x[:rows])
    assert got.dtype == torch.float32 and got.shape == (rows, lin.out_features) and got.is_contiguous()
    # fp32 sums of 96 products: a few ulps of the sum of magnitudes
    bound = 1e-6 * (x[:rows].double().abs() @ head.dequantized(torch.float64).abs().t()) + 1e-6
    assert ((got.double() - want).abs() <= bound).all()
    with torch.inference_mode():  # leading dims are kept; another dtype comes back in that dtype
        y3 = head(x[:rows].view(1, rows, -1))
        yb = head(x[:rows].to(torch.bfloat16))
    assert y3.shape == (1, rows, lin.out_features) and torch.equal(y3[0], got)
    assert yb.dtype == torch.bfloat16


def test_few_rows_run_the_compiled_loop_and_more_rows_the_blocks():
    assert int8_head.one_row_kernel_runs()  # a CPU with a C++ compiler: inductor builds it
    lin, x = head_and_rows()
    head = Int8Head.from_linear(lin)
    for rows, compiled in ((1, True), (ROWS_MAX, True), (ROWS_MAX + 1, False)):
        with torch.inference_mode(), torch.profiler.profile() as prof:
            head(x[:rows])
        names = [e.name for e in prof.events()]
        assert any("Compiled" in n for n in names) == compiled, (rows, sorted(set(names)))
        blocks = sum(n in ("aten::mm", "aten::linear", "aten::matmul") for n in names)
        assert (blocks == 0) if compiled else (blocks >= 3), (rows, blocks)  # 3 blocks of the vocabulary


def test_gradient_with_respect_to_the_input():
    """With autograd recording the head takes the block path: dL/dx equals autograd's through the dequantized W."""
    lin, x = head_and_rows(bias=True)
    head = Int8Head.from_linear(lin)
    for rows in (1, 12):
        xr = x[:rows].clone().requires_grad_()
        head(xr).square().sum().backward()
        x64 = x[:rows].double().requires_grad_()
        F.linear(x64, head.dequantized(torch.float64), head.bias.double()).square().sum().backward()
        assert ((xr.grad.double() - x64.grad).norm() / x64.grad.norm()).item() < 1e-6  # fp32 sums over the vocabulary
    assert not any(b.requires_grad for b in head.buffers())


def test_switched_off_the_head_stays_fp32(monkeypatch, tmp_path):
    path = make_tiny_model_dir(tmp_path / "m", hidden=64)
    monkeypatch.setenv("LORAKIT_INT8_FUSED", "0")
    int8_head._row_kernel.cache_clear()
    try:
        assert not int8_head.one_row_kernel_runs()
        model = load(path, tied=False)
        assert not int8_model.quantize_head_int8(model)  # its eager blocks would be slower than fp32 for decoding
        assert type(model.lm_head) is torch.nn.Linear
    finally:
        int8_head._row_kernel.cache_clear()


@pytest.mark.skipif(int8.int8_support() is not None, reason=f"no int8 kernels: {int8.int8_support()}")
@pytest.mark.parametrize("tied", [False, True])
def test_quantize_for_inference_gives_the_head_int8_weights(tmp_path, tied):
    path = make_tiny_model_dir(tmp_path / "m", hidden=64)
    fp = load(path, tied).eval()
    emb = fp.get_input_embeddings().weight.detach().clone()
    q = int8_model.quantize_for_inference(load(path, tied), "int8")
    kept = int8_model.quantize_for_inference(load(path, tied), "int8", head=False)
    assert isinstance(q.lm_head, Int8Head) and type(kept.lm_head) is torch.nn.Linear
    assert torch.equal(q.get_input_embeddings().weight, emb)  # a tied embedding keeps its fp32 weight
    assert "head int8 weights with fp32 activations" in int8_model.describe_int8(q)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got, base = kept(ids).logits, q(ids).logits, fp(ids).logits
        out = q.generate(ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # one-row steps
    assert out.shape == (1, 12)

    def kl(a, b):
        return F.kl_div(a.log_softmax(-1).flatten(0, 1), b.log_softmax(-1).flatten(0, 1), log_target=True).item()

    # the int8 head moves the int8 model's logits by far less than the int8 backbone moves fp32's
    assert kl(got, want) < 0.25 * kl(want, base) + 1e-4


def test_an_adapter_that_adapts_or_replaces_the_head_keeps_it_fp32(tmp_path):
    path = make_tiny_model_dir(tmp_path / "m")
    layer = "model.layers.0.self_attn.q_proj"
    for tied in (False, True):
        model = load(path, tied)
        assert not touches_output_head(model, [f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"])
        assert touches_output_head(model, ["lm_head.lora_A.weight"])  # LoRA on the head
        assert touches_output_head(model, ["lm_head.weight"])  # modules_to_save: a retrained head
        # a retrained input embedding matters only where the head is tied to it
        assert touches_output_head(model, ["model.embed_tokens.weight"]) == tied
