"""QLoRA bases (lorakit.quant): 4-bit storage, dequantization and the LoRA op over it.

Independent references: the packed codes decoded in float64 from the published NF4 /
FP4 tables (QLoRA paper; bitsandbytes' FP4 bit patterns), the float64 LoRA formula under
autograd, transformers' BitsAndBytesConfig for what gets quantized, and PEFT's own
bitsandbytes LoRA layer for outputs.
"""

from __future__ import annotations

import sys
import weakref

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from tiny import count_dequantized  # noqa: E402

from lorakit import quant, quant_model  # noqa: E402
from lorakit.errors import ConfigError, ModelLoadError, ModelMismatchError, UnsupportedModuleError  # noqa: E402

NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
FP4 = [v / 12 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)]
KINDS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def reference_absmax(state) -> torch.Tensor:
    """The per-block scales in float64 (decoded from 8 bits with double quantization)."""
    if not state.nested:
        return state.absmax.double()
    s2 = state.state2  # absmax stored 8-bit (dynamic map) in blocks of 256, plus a mean offset
    q = state.absmax.reshape(-1).to(torch.int64)
    return s2.code.double()[q] * s2.absmax.double().repeat_interleave(s2.blocksize)[: q.numel()] + float(state.offset)


def reference_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    """Decode bitsandbytes' 4-bit storage in float64: two codes per byte, high nibble first."""
    table = torch.tensor(NF4 if state.quant_type == "nf4" else FP4, dtype=torch.float64)
    b = packed.reshape(-1).to(torch.int64)
    idx = torch.stack([b >> 4, b & 0xF], 1).reshape(-1)
    absmax = reference_absmax(state)
    n = state.shape.numel()
    w = table[idx[:n]] * absmax.repeat_interleave(state.blocksize)[:n]
    return w.reshape(state.shape)


def linear4bit(
    out_f: int, in_f: int, kind: str, dq: bool, bias: bool = True, seed: int = 0, compute: str = "fp32"
) -> tuple[nn.Module, nn.Linear]:
    """A 4-bit Linear made by lorakit.quantize, and the full-precision Linear it came from."""
    torch.manual_seed(seed)
    full = nn.Linear(in_f, out_f, bias=bias)
    keep = nn.Linear(in_f, out_f, bias=bias)
    keep.load_state_dict(full.state_dict())
    model = nn.Sequential(full)
    quant_model.quantize(model, kind, dq, compute_dtype=compute)
    return model[0], keep


# ----------------------------------------------------------------------------- storage and dequantization


@pytest.mark.parametrize("kind,dq", KINDS)
def test_dequantize_matches_float64_decoding(kind, dq):
    torch.manual_seed(0)
    W = torch.randn(48, 320) * 0.05
    W[3, :64] *= 40  # one block with a large absmax
    packed, state = quant.quantize_weight_4bit(W, kind, dq)
    assert packed.dtype == torch.uint8 and packed.numel() == W.numel() // 2  # 4 bits per weight
    ref = reference_dequant(packed, state)
    weight = sys.modules["bitsandbytes"].nn.Params4bit(
        packed, requires_grad=False, quant_state=state, quant_type=kind, bnb_quantized=True
    )
    got32 = quant.dequantize_4bit(weight, torch.float32)
    torch.testing.assert_close(got32.double(), ref, rtol=2e-7, atol=1e-9)
    # bf16 / fp16 come straight from the kernel, equal to the fp32 values rounded.
    assert torch.equal(quant.dequantize_4bit(weight, torch.bfloat16), got32.to(torch.bfloat16))
    assert torch.equal(quant.dequantize_4bit(weight, torch.float16), got32.to(torch.float16))
    # And it is a quantization of W: each weight within half the widest code gap of its block's scale,
    # plus what storing that scale in 8 bits (double quantization) moved it.
    table = torch.tensor(NF4 if kind == "nf4" else FP4, dtype=torch.float64).sort().values
    gap = (table[1:] - table[:-1]).max()
    block_max = W.double().reshape(-1, 64).abs().amax(1, keepdim=True)
    stored = reference_absmax(state).reshape(-1, 1)
    err = (ref - W.double()).reshape(-1, 64).abs()
    assert (err <= stored * gap / 2 + (stored - block_max).abs() + 1e-7).all()


def test_quantize_equals_transformers_bitsandbytes(tmp_path):
    from tiny import make_tiny_model_dir
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = make_tiny_model_dir(tmp_path / "m")
    for kind, dq in [("nf4", True), ("fp4", False)]:
        ours = quant_model.quantize(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), kind, dq, "bf16")
        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=kind,
            bnb_4bit_use_double_quant=dq,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
        a, b = ours.state_dict(), theirs.state_dict()
        assert sorted(a) == sorted(b)  # same modules 4-bit (lm_head and embeddings not), same quant-state keys
        for k in a:
            va, vb = a[k], b[k].float() if b[k].dtype == torch.bfloat16 else b[k]
            assert torch.equal(va, vb), k
        # As prepare_model_for_kbit_training leaves it: norms, embeddings, head in fp32; everything frozen.
        for name, p in ours.named_parameters():
            assert not p.requires_grad
            assert p.dtype == (torch.uint8 if p.__class__.__name__ == "Params4bit" else torch.float32), name
        assert quant_model.quantization_info(ours) == {
            "quantization": kind,
            "double_quant": dq,
            "compute_dtype": "bf16",
            "layers": 14,
        }
        assert type(ours.lm_head) is nn.Linear and ours.is_loaded_in_4bit


def test_public_entry_point_and_lazy_import():
    import subprocess

    import lorakit

    assert lorakit.quantize is quant_model.quantize
    code = "import sys, lorakit; assert 'bitsandbytes' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr  # import lorakit never loads bitsandbytes


def test_quantize_frees_each_full_precision_weight():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    refs = [weakref.ref(m.weight) for m in model]
    quant_model.quantize(model, "nf4", compute_dtype="fp32")
    assert all(r() is None for r in refs)
    assert all(type(m).__name__ == "Linear4bit" for m in model)


# ----------------------------------------------------------------------------- the LoRA op


@pytest.mark.parametrize("kind,dq", KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_op_matches_float64(kind, dq, dropout):
    layer, _ = linear4bit(40, 64, kind, dq, bias=True)
    layer.bias.requires_grad_(True)
    base = quant.quantized_base(layer)
    W64 = reference_dequant(layer.weight.data, layer.weight.quant_state)
    torch.manual_seed(1)
    x = torch.randn(2, 5, 64, requires_grad=True)
    A = (torch.randn(8, 64) * 0.1).requires_grad_()
    B = (torch.randn(40, 8) * 0.1).requires_grad_()
    mask = (torch.rand(2, 5, 64) > dropout).float() / (1 - dropout) if dropout else None
    y = quant.lora_linear_quantized(x, base, A, B, 0.75, dropout_p=dropout, dropout_mask=mask)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, A, B, layer.bias], dy)

    x64, A64, B64, b64 = (t.detach().double().requires_grad_() for t in (x, A, B, layer.bias))
    xd = x64 * mask.double() if mask is not None else x64
    y64 = x64 @ W64.t() + b64 + 0.75 * (xd @ A64.t()) @ B64.t()
    ref = torch.autograd.grad(y64, [x64, A64, B64, b64], dy.double())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_lora_op_bf16_compute_close_to_float64():
    layer, _ = linear4bit(64, 128, "nf4", True, bias=False, compute="bf16")
    base = quant.quantized_base(layer)
    W64 = reference_dequant(layer.weight.data, layer.weight.quant_state)
    torch.manual_seed(2)
    x = torch.randn(16, 128, requires_grad=True)
    A, B = (torch.randn(8, 128) * 0.1).requires_grad_(), (torch.randn(64, 8) * 0.1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quant.lora_linear_quantized(x, base, A, B, 2.0)
    assert y.dtype == torch.float32  # x's dtype, autocast or not (as bitsandbytes' Linear4bit)
    assert quant.lora_linear_quantized(x, base, A, B, 2.0).dtype == torch.float32
    gx, gA, gB = torch.autograd.grad(y.float().sum(), [x, A, B])
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = x64 @ W64.t() + 2.0 * (x64 @ A64.t()) @ B64.t()
    rx, rA, rB = torch.autograd.grad(y64.sum(), [x64, A64, B64])
    for got, want in [(y, y64), (gx, rx), (gA, rA), (gB, rB)]:
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-2, err  # bf16 has 8 bits of mantissa
    assert gA.dtype == gB.dtype == torch.float32  # fp32 masters get fp32 grads


def test_lora_op_keeps_no_weight_and_at_most_one_dequantized_alive(monkeypatch):
    """Forward and backward of a stack of 4-bit LoRA layers: the weight is never saved for backward,
    and no more than one dequantized weight exists at any time."""
    layers = [linear4bit(96, 96, "nf4", True, bias=False, seed=i)[0] for i in range(4)]
    bases = [quant.quantized_base(m) for m in layers]
    peak, alive = count_dequantized(monkeypatch)
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    torch.manual_seed(0)
    h = torch.randn(4, 7, 96, requires_grad=True)
    params = [(torch.randn(4, 96, requires_grad=True), torch.zeros(96, 4, requires_grad=True)) for _ in bases]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for base, (A, B) in zip(bases, params):
            h = torch.tanh(quant.lora_linear_quantized(h, base, A, B, 1.0))
    h.sum().backward()
    assert (96, 96) not in saved_shapes  # no [out, in] weight saved for backward
    assert len([r for r in alive if r() is not None]) == 0
    assert peak[0] == 1
    assert all(p.grad is not None for pair in params for p in pair)


def test_lora_op_shape_errors():
    layer, _ = linear4bit(40, 64, "nf4", True)
    base = quant.quantized_base(layer)
    with pytest.raises(ModelMismatchError, match=r"quantized base \[40, 64\]"):
        quant.lora_linear_quantized(torch.randn(3, 64), base, torch.zeros(4, 64), torch.zeros(41, 4), 1.0)
    with pytest.raises(ConfigError, match="lora_dropout"):
        quant.lora_linear_quantized(
            torch.randn(3, 64), base, torch.zeros(4, 64), torch.zeros(40, 4), 1.0, dropout_p=1.0
        )


def test_matches_peft_bitsandbytes_lora_layer(tmp_path):
    """PEFT's LoRA layer on transformers' 4-bit base (bitsandbytes' matmul) against lorakit's op on that base."""
    from peft import LoraConfig, get_peft_model
    from tiny import make_tiny_model_dir
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = make_tiny_model_dir(tmp_path / "m")
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.train()  # bitsandbytes repacks weights for an inference kernel in eval mode; train mode keeps them
    torch.manual_seed(0)
    checked = 0
    for name, module in peft_model.named_modules():
        if type(module).__name__ != "Linear4bit" or not hasattr(module, "lora_A"):
            continue
        base = quant.quantized_base(module.base_layer)
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        x = torch.randn(3, 5, base.in_features)
        with torch.no_grad():
            want = module(x)
            got = quant.lora_linear_quantized(x, base, A, B, module.scaling["default"], training=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked == 14


# ----------------------------------------------------------------------------- settings and errors


def test_compute_dtype_resolution(monkeypatch, tmp_path):
    assert quant.resolve_compute_dtype("bf16")[0] == torch.bfloat16
    assert quant.resolve_compute_dtype(torch.float16)[0] == torch.float16
    assert quant.resolve_compute_dtype("auto", precision="fp32") == (
        torch.float32,
        "auto: follows train.precision (fp32)",
    )
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu sse avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(quant, "_CPUINFO", info)
    assert quant.resolve_compute_dtype("auto", "cpu") == (torch.bfloat16, "auto: the CPU has avx512_bf16")
    info.write_text("flags\t: fpu sse avx2\n")
    assert quant.resolve_compute_dtype("auto", "cpu")[0] == torch.float32


@pytest.mark.parametrize("bad", ["int3", "nf8", ""])
def test_unknown_quantization(bad):
    with pytest.raises(ConfigError, match=r"unknown quantization .*use one of nf4, fp4"):
        quant_model.quantize(nn.Sequential(nn.Linear(64, 64)), bad)


@pytest.mark.parametrize("bad", ["fp8", "float64", torch.float64])
def test_unknown_compute_dtype(bad):
    with pytest.raises(ConfigError, match=r"unknown compute_dtype .*use auto, fp32, bf16, fp16"):
        quant_model.quantize(nn.Sequential(nn.Linear(64, 64)), "nf4", compute_dtype=bad)


def test_layer_kind_that_cannot_be_quantized():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64))
    with pytest.raises(UnsupportedModuleError, match=r"cannot quantize 0 \(torch.nn.modules.sparse.Embedding\)"):
        quant_model.quantize(model, "nf4", modules=["0"])
    with pytest.raises(UnsupportedModuleError, match="no nn.Linear layer to quantize"):
        quant_model.quantize(nn.Sequential(nn.Conv1d(4, 4, 3)), "nf4")
    with pytest.raises(ConfigError, match="not found"):
        quant_model.quantize(model, "nf4", modules=["proj"])


def test_quantize_after_lora_is_an_error():
    import lorakit

    model = nn.Sequential(nn.Linear(64, 64))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="quantize the base first, then inject LoRA"):
        quant_model.quantize(model, "nf4")


def test_bitsandbytes_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ModelLoadError, match=r"pip install bitsandbytes==0\.50\.2"):
        quant_model.quantize(nn.Sequential(nn.Linear(64, 64)), "nf4")
    assert quant.quantized_base(nn.Linear(4, 4)) is None
